"""Captions -> token ids. One piece of code for training and for the torch-free runtime.

Standard library only (``re``, ``json``): no nltk, no numpy, no torch.

Tokenisation follows SCAN / IMRAM, which tokenise with ``nltk.tokenize.word_tokenize(caption.lower())``,
i.e. nltk's ``NLTKWordTokenizer`` (an improved Treebank tokenizer; not ``TreebankWordTokenizer``
itself, which splits some captions differently), with one difference: the line is not split into
sentences first (nltk's ``preserve_line=True``; punkt's sentence model needs data files, and a
download at run time is not acceptable for a runtime). So a period *inside* a caption stays with its
word: "a dog. a cat" gives ['a', 'dog.', 'a', 'cat'] here and ['a', 'dog', '.', 'a', 'cat'] in the
original. A final period is split off in both.

The tokeniser is owned: its rules are data, ``runtime/tokenizer.json`` (a rules version, the
lower-case mapping, character classes spelled out as code point ranges, ordered regex substitutions
in a subset that Python ``re``, JavaScript, Java and .NET read the same way, and the whitespace set
to split on), written by scripts/tokenizer_rules.py from nltk 3.10.4 and checked against it in
tests/test_tokenizer.py (docs/tokenizer.md). ``python -m export`` copies the rules into every
model folder (MODEL_DIR/tokenizer.json), and the runtime tokenises with the folder's copy, so a
model folder means the same token ids in every language and under every nltk version.

The vocabulary file is the SCAN JSON format::

    {"word2idx": {"<pad>": 0, "<start>": 1, ...}, "idx2word": {"0": "<pad>", ...}, "idx": N}

with the four special tokens at ids 0..3 (``<pad>`` must be 0: batches are padded with it).
"""
from __future__ import annotations

import bisect
import json
import os
import re
from collections import Counter
from typing import Callable, Iterable, Sequence

from runtime.atomic import atomic_open


SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = 0, 1, 2, 3

TOKENIZER_FILE = "tokenizer.json"  # the rules' name in a model folder
RULES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), TOKENIZER_FILE)  # the built-in rules
RULES_FORMAT = "imram-min-tokenizer"
KNOWN_RULES_VERSIONS = (1,)  # rules versions this runtime tokenises with (docs/tokenizer.md)
MAX_CODE_POINT = 0x10FFFF
_CLASS_REF = re.compile(r"\{:([a-z_]+):\}")  # a class named in a pattern: [^{:word_re:}]
_TEMPLATE_PART = re.compile(r"\$(\$|[0-9])")  # $N: group N (0: the whole match); $$: a dollar sign
_NOT_AFTER = re.compile(r"\(\^\|\[\^\{:[a-z_]+:\}\]\)")  # (^|[^{:word_re:}]) opening a pattern: no lookbehind


class VocabularyError(ValueError):
    """A vocabulary file that is not a valid SCAN vocabulary."""


class TokenizerError(ValueError):
    """A tokenizer.json that is unreadable, malformed, or of a rules version this runtime does not know."""


def _code_point_ranges(spec: str, where: str) -> list[tuple[int, int]]:
    """ "0041-005A 005F" -> [(0x41, 0x5A), (0x5F, 0x5F)]; TokenizerError naming ``where``."""
    out = []
    for item in spec.split():
        low, _, high = item.partition("-")
        try:
            a, b = int(low, 16), int(high or low, 16)
        except ValueError:
            raise TokenizerError(f"{where}: {item!r} is not a hex code point or range") from None
        if not 0 <= a <= b <= MAX_CODE_POINT:
            raise TokenizerError(f"{where}: {item!r} is not a range of code points")
        out.append((a, b))
    return out


def _class_body(spans: list[tuple[int, int]]) -> str:
    """Code point ranges as the body of a Python ``re`` character class: characters as themselves
    (parsed 10x faster than escapes), ASCII punctuation and controls escaped."""
    def char(cp: int) -> str:
        return "\\" + chr(cp) if cp < 128 and not chr(cp).isalnum() else chr(cp)
    return "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in spans)


def _python_template(replace: str, where: str) -> str:
    """A rules replacement ($N: group N, 0 the whole match; $$: a dollar sign; all else literal) as a
    Python ``re.sub`` template."""
    out, i = [], 0
    while i < len(replace):
        char = replace[i]
        if char == "$":
            m = _TEMPLATE_PART.match(replace, i)
            if m is None:
                raise TokenizerError(f"{where}: '$' must be followed by a digit or '$' in {replace!r}")
            out.append("$" if m.group(1) == "$" else f"\\g<{m.group(1)}>")
            i = m.end()
        else:
            out.append("\\\\" if char == "\\" else char)
            i += 1
    return "".join(out)


class Tokenizer:
    """nltk's word tokeniser as data: the rules of a tokenizer.json (docs/tokenizer.md).

    ``tokenize(caption)``: lower-case with the rules' table (and the final-sigma rule), apply the
    ordered substitutions, split on the rules' whitespace set. ``rules_version``: the version the
    file declares (one of KNOWN_RULES_VERSIONS). ``Tokenizer.load(path)`` reads a file (a model
    folder's), ``Tokenizer.builtin()`` the rules shipped with the runtime (runtime/tokenizer.json).
    """

    def __init__(self, rules: dict, where: str = "tokenizer rules"):
        def bad(what: str) -> TokenizerError:
            return TokenizerError(f"{where}: {what}")

        if not isinstance(rules, dict) or rules.get("format") != RULES_FORMAT:
            raise bad(f'not tokeniser rules (expected a JSON object with "format": "{RULES_FORMAT}")')
        version = rules.get("rules_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise bad(f"rules_version must be an integer, got {version!r}")
        if version not in KNOWN_RULES_VERSIONS:
            raise bad(f"tokeniser rules version {version} is not known to this runtime (it knows "
                      f"{', '.join(map(str, KNOWN_RULES_VERSIONS))}): use an imram-min that knows it, "
                      f"or re-export the model with this one")
        self.rules_version = version
        self.rules = rules
        try:
            classes = {name: _code_point_ranges(spec, f"{where}: classes.{name}")
                       for name, spec in dict(rules["classes"]).items()}
            lowercase = rules["lowercase"]
            self._lower = {int(cp, 16): "".join(chr(int(x, 16)) for x in low.split())
                           for cp, low in dict(lowercase["map"]).items()}
            sigma = lowercase["final_sigma"]
            self._sigma, self._sigma_final, sigma_other = (chr(int(sigma[k], 16)) for k in ("char", "final", "other"))
            self._lower[ord(self._sigma)] = sigma_other
            self._case_ignorable = sorted(_code_point_ranges(sigma["case_ignorable"], f"{where}: final_sigma.case_ignorable"))
            self._cased = sorted(_code_point_ranges(sigma["cased"], f"{where}: final_sigma.cased"))
            steps = list(rules["steps"])
            split = rules["split"]
        except TokenizerError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"malformed rules ({type(e).__name__}: {e})") from None
        bodies = {name: _class_body(spans) for name, spans in classes.items()}

        def expand(pattern: str, what: str) -> str:
            def body(m: re.Match) -> str:
                if m.group(1) not in bodies:
                    raise bad(f"{what} names the class {m.group(1)!r}, which classes does not define")
                return bodies[m.group(1)]
            return _CLASS_REF.sub(body, pattern)

        # (pattern or None for a pad, template or pad text, probe or None): a pattern that opens with
        # (^|[^{:class:}]) cannot match where the rest of it finds nothing; ``re`` searches for that
        # rest 10x faster (it starts with a literal), so the rest is tried first (same result)
        self._steps: list[tuple[re.Pattern | None, str, re.Pattern | None]] = []
        for i, step in enumerate(steps):
            what = f"steps[{i}]"
            if not isinstance(step, dict) or step.get("op") not in ("sub", "pad"):
                raise bad(f'{what} must be an object with "op": "sub" or "pad"')
            if step["op"] == "pad":
                if not isinstance(step.get("text"), str):
                    raise bad(f'{what}: "pad" needs a "text"')
                self._steps.append((None, step["text"], None))
                continue
            pattern, replace = step.get("pattern"), step.get("replace")
            if not isinstance(pattern, str) or not isinstance(replace, str):
                raise bad(f'{what}: "sub" needs a "pattern" and a "replace"')
            try:
                compiled = re.compile(expand(pattern, what))
            except re.error as e:
                raise bad(f"{what}: pattern does not compile ({e})") from None
            template = _python_template(replace, f"{where}: {what}")
            used = [int(n) for n in re.findall(r"\$([0-9])", replace.replace("$$", ""))]
            if any(n > compiled.groups for n in used):
                raise bad(f"{what}: the replacement refers to a group the pattern does not have")
            opening = _NOT_AFTER.match(pattern)
            rest = pattern[opening.end():] if opening else ""
            probe = re.compile(expand(rest, what)) if opening and not re.search(r"\\[1-9]", rest) else None
            self._steps.append((compiled, template, probe))
        if not isinstance(split, str) or split not in bodies:
            raise bad(f"split must name a class, got {split!r}")
        self._words = re.compile(f"[^{bodies[split]}]+")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a tokenizer.json. Raises TokenizerError naming the file (unreadable, malformed, or
        of a rules version this runtime does not know)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                rules = json.load(f)
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise TokenizerError(f"{path}: cannot read the tokeniser rules ({e})") from None
        return cls(rules, path)

    @classmethod
    def builtin(cls) -> "Tokenizer":
        """The rules shipped with the runtime (runtime/tokenizer.json), read once."""
        return _builtin()

    # ------------------------------------------------------------------ applying the rules
    @staticmethod
    def _is_in(char: str, spans: list[tuple[int, int]]) -> bool:
        """Whether ``char`` is in the sorted, disjoint code point ranges ``spans``."""
        i = bisect.bisect_right(spans, (ord(char), MAX_CODE_POINT + 1)) - 1
        return i >= 0 and spans[i][0] <= ord(char) <= spans[i][1]

    def _final(self, text: str, i: int) -> bool:
        """Whether the capital sigma at text[i] is word-final (Unicode's Final_Sigma, as CPython):
        a cased letter before it and none after it, case-ignorable characters skipped."""
        j = i - 1
        while j >= 0 and self._is_in(text[j], self._case_ignorable):
            j -= 1
        if j < 0 or not self._is_in(text[j], self._cased):
            return False
        j = i + 1
        while j < len(text) and self._is_in(text[j], self._case_ignorable):
            j += 1
        return j == len(text) or not self._is_in(text[j], self._cased)

    def lower(self, text: str) -> str:
        """``text`` lower-cased by the rules (the table, then the final-sigma rule)."""
        if self._sigma not in text:
            return text.translate(self._lower)
        parts, start = [], 0
        for i, char in enumerate(text):
            if char == self._sigma:
                parts.append(text[start:i].translate(self._lower))
                parts.append(self._sigma_final if self._final(text, i) else self._lower[ord(char)])
                start = i + 1
        parts.append(text[start:].translate(self._lower))
        return "".join(parts)

    def tokenize(self, caption: str) -> list[str]:
        """Lower-case and split a caption into words and punctuation.

        >>> Tokenizer.builtin().tokenize("A dog, running. I don't know.")
        ['a', 'dog', ',', 'running.', 'i', 'do', "n't", 'know', '.']
        """
        text = self.lower(caption)
        for pattern, template, probe in self._steps:
            if pattern is None:
                text = template + text + template
            elif probe is None or probe.search(text):
                text = pattern.sub(template, text)
        return self._words.findall(text)


_BUILTIN: list[Tokenizer] = []


def _builtin() -> Tokenizer:
    if not _BUILTIN:
        _BUILTIN.append(Tokenizer.load(RULES_FILE))
    return _BUILTIN[0]


def tokenize(caption: str) -> list[str]:
    """Lower-case and split a caption into words and punctuation, with the built-in rules.

    >>> tokenize("A dog, running. I don't know.")
    ['a', 'dog', ',', 'running.', 'i', 'do', "n't", 'know', '.']
    """
    return _builtin().tokenize(caption)


class Vocabulary:
    """Word <-> id mapping. Ids 0..3 are the special tokens, words follow from 4.

    word2idx: dict[str, int]; idx2word: dict[int, str]. Unknown words map to ``<unk>`` (3).
    """

    def __init__(self, words: Iterable[str] = ()):
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        for word in SPECIAL_TOKENS:
            self.add_word(word)
        for word in words:
            self.add_word(word)

    def add_word(self, word: str) -> int:
        """Give ``word`` the next free id (no-op if present); returns its id."""
        if word not in self.word2idx:
            idx = len(self.word2idx)
            self.word2idx[word] = idx
            self.idx2word[idx] = word
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.word2idx)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.word2idx == other.word2idx

    def __call__(self, word: str) -> int:
        """Id of ``word``; ``<unk>`` (3) if the word is unknown."""
        return self.word2idx.get(word, UNK)

    def encode(self, caption: str, tokenize: Callable[[str], list[str]] | None = None) -> list[int]:
        """Caption -> [<start>, word ids..., <end>], as the original dataset's __getitem__.
        ``tokenize``: a Tokenizer's (a model folder's rules); default the built-in rules."""
        words = tokenize(caption) if tokenize is not None else _builtin().tokenize(caption)
        return [START] + [self(token) for token in words] + [END]

    def encode_batch(self, captions: Sequence[str], tokenize: Callable[[str], list[str]] | None = None
                     ) -> tuple[list[list[int]], list[int]]:
        """Captions -> (token ids padded with <pad>=0 to the longest, (n,) lengths).

        Plain lists, so both sides can wrap them: np.asarray(...) or torch.tensor(...).
        """
        encoded = [self.encode(c, tokenize) for c in captions]
        lengths = [len(ids) for ids in encoded]
        n_word = max(lengths, default=0)
        return [ids + [PAD] * (n_word - len(ids)) for ids in encoded], lengths

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words (specials included). An id outside the vocabulary is a KeyError."""
        return [self.idx2word[int(i)] for i in ids]

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> "Vocabulary":
        """Vocabulary of the words seen at least ``threshold`` times (the original build_vocab).

        Specials first, then the kept words in order of first appearance in ``captions``
        (which is what the original's Counter gives under Python >= 3.7), so the result is
        deterministic for a given caption list.
        """
        return cls.from_token_lists((tokenize(caption) for caption in captions), threshold)

    @classmethod
    def from_token_lists(cls, token_lists: Iterable[Sequence[str]], threshold: int = 4) -> "Vocabulary":
        """``build`` on captions already tokenised (same order and threshold rules)."""
        counts = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        return cls(word for word, count in counts.items() if count >= threshold)

    # ------------------------------------------------------------------ files
    def to_json_dict(self) -> dict:
        """The SCAN format: idx2word keys are strings (JSON object keys always are)."""
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in self.idx2word.items()},
            "idx": len(self),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the SCAN vocabulary JSON atomically (temp file in the same folder, then rename)."""
        with atomic_open(path, "w") as f:
            json.dump(self.to_json_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read and validate a SCAN vocabulary JSON. Raises VocabularyError naming the file."""
        path = os.fspath(path)

        def bad(what: str) -> VocabularyError:
            return VocabularyError(f"{path}: not a valid SCAN vocabulary: {what}")

        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise bad(f"cannot parse JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("word2idx"), dict) \
                or not isinstance(data.get("idx2word"), dict):
            raise bad('expected a JSON object with "word2idx" and "idx2word" objects')

        word2idx = data["word2idx"]
        for word, idx in word2idx.items():
            if type(idx) is not int:
                raise bad(f"word2idx[{word!r}] is {idx!r}, expected an integer id")
        idx2word = {}
        for key, word in data["idx2word"].items():
            try:
                idx = int(key)
            except ValueError:
                raise bad(f"idx2word key {key!r} is not an integer") from None
            if not isinstance(word, str):
                raise bad(f"idx2word[{key!r}] is {word!r}, expected a word")
            idx2word[idx] = word

        n = len(word2idx)
        if sorted(word2idx.values()) != list(range(n)):
            raise bad(f"word2idx ids must be exactly 0..{n - 1} (each once)")
        if len(idx2word) != n or any(idx2word.get(i) != w for w, i in word2idx.items()):
            raise bad("word2idx and idx2word disagree")
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if word2idx.get(token) != expected_id:
                raise bad(f"special token {token!r} must have id {expected_id}, "
                          f"found {word2idx.get(token)!r} (expected specials {SPECIAL_TOKENS} at 0..3)")
        if "idx" in data and data["idx"] != n:
            raise bad(f'"idx" is {data["idx"]!r} but there are {n} words')

        vocab = cls()
        for idx in range(len(SPECIAL_TOKENS), n):
            vocab.add_word(idx2word[idx])
        return vocab
