"""Captions -> token ids. One piece of code for training and for the torch-free runtime.

Standard library + nltk only (no numpy, no torch), so both sides tokenise identically.

Tokenisation follows SCAN / IMRAM: ``nltk.tokenize.word_tokenize(caption.lower())``, with one
difference: we pass ``preserve_line=True``. The original first splits the caption into
sentences with the punkt model, which needs the ``punkt_tab`` data files (not installable
here, and a download at run time is not acceptable for a runtime). With ``preserve_line=True``
the Treebank tokenizer sees the whole caption as one line and nothing else changes, except
for a period *inside* a caption: "a dog. a cat" gives ['a', 'dog.', 'a', 'cat'] here and
['a', 'dog', '.', 'a', 'cat'] in the original. A final period is split off in both.

The vocabulary file is the SCAN JSON format::

    {"word2idx": {"<pad>": 0, "<start>": 1, ...}, "idx2word": {"0": "<pad>", ...}, "idx": N}

with the four special tokens at ids 0..3 (``<pad>`` must be 0: batches are padded with it).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterable, Sequence

from nltk.tokenize import word_tokenize  # needs no data files with preserve_line=True

from runtime.atomic import atomic_open


SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = 0, 1, 2, 3


class VocabularyError(ValueError):
    """A vocabulary file that is not a valid SCAN vocabulary."""


def tokenize(caption: str) -> list[str]:
    """Lower-case and split a caption into words and punctuation.

    >>> tokenize("A dog, running. I don't know.")
    ['a', 'dog', ',', 'running.', 'i', 'do', "n't", 'know', '.']
    """
    return word_tokenize(caption.lower(), preserve_line=True)


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

    def encode(self, caption: str) -> list[int]:
        """Caption -> [<start>, word ids..., <end>], as the original dataset's __getitem__."""
        return [START] + [self(token) for token in tokenize(caption)] + [END]

    def encode_batch(self, captions: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Captions -> (token ids padded with <pad>=0 to the longest, (n,) lengths).

        Plain lists, so both sides can wrap them: np.asarray(...) or torch.tensor(...).
        """
        encoded = [self.encode(c) for c in captions]
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
