"""Write runtime/tokenizer.json: nltk's word tokeniser as data (see docs/tokenizer.md).

    python scripts/tokenizer_rules.py [--check]

How the rules were made, kept so that a new rules version can be made the same way. It needs the
oracle the rules reproduce: nltk 3.10.4 (its NLTKWordTokenizer runs most patterns on the
``regex`` engine and the contractions on ``re``), the ``regex`` module and Python 3.11 (Unicode
14.0, for ``re``, ``str.lower`` and ``str.split``). Every character class the patterns need
(``\\w``, ``\\s``, ``\\d`` of each engine, the letters ``(?i)`` matches, the properties of the
final-sigma rule) is computed here by running the engine over every code point, and written out
as code point ranges, so that no client depends on its own engine's Unicode tables.
With --check: exit 1 if runtime/tokenizer.json differs from what would be written.
"""
from __future__ import annotations

import json
import os
import re
import sys

import regex

RULES_VERSION = 1
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "runtime", "tokenizer.json")
ALL = "".join(map(chr, range(0x110000)))
SIGMA = 0x03A3


def ranges(points) -> str:
    """Sorted code points -> "0041-005A 005F ..." (hex, inclusive ranges, single points alone)."""
    out, points = [], sorted(set(points))
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        out.append(f"{points[i]:04X}" if i == j else f"{points[i]:04X}-{points[j]:04X}")
        i = j + 1
    return " ".join(out)


def matched(pattern) -> list[int]:
    """Code points a one-character pattern (compiled, either engine) matches."""
    return [ord(m.group()) for m in pattern.finditer(ALL)]


def lowercase_table() -> tuple[dict, list[int], list[int]]:
    """(code point -> its str.lower() where that differs, Case_Ignorable, Cased) for the final
    sigma rule: which characters it skips and which it needs (as CPython's handle_capital_sigma)."""
    table, ignorable, cased = {}, [], []
    for cp in range(0x110000):
        ch = chr(cp)
        low = ch.lower()
        if low != ch and cp != SIGMA:
            table[f"{cp:04X}"] = " ".join(f"{ord(c):04X}" for c in low)
        alone = (ch + "\u03a3").lower()[-1] == "\u03c2"  # not ignorable, and cased
        behind = ("A" + ch + "\u03a3").lower()[-1] == "\u03c2"  # ignorable, or cased
        if behind and not alone:
            ignorable.append(cp)
        if alone:
            cased.append(cp)
    return table, ignorable, cased


def caseless(engine, letters: str) -> str:
    """``letters`` as the engine's ``(?i)`` reads them: each letter a class of what it matches."""
    out = []
    for letter in letters:
        points = matched(engine.compile("(?i)" + re.escape(letter)))
        out.append(letter if len(points) == 1 else "[" + "".join(sorted(map(chr, points))) + "]")
    return "".join(out)


def substitutions() -> list[dict]:
    """nltk 3.10.4 NLTKWordTokenizer.tokenize, in order, in the portable subset (docs/tokenizer.md)."""
    R = lambda word: caseless(regex, word)  # (?i) on the regex engine  # noqa: E731
    P = lambda word: caseless(re, word)  # (?i) on the re engine  # noqa: E731
    end = "(?![{:any:}])"  # the end of the text ($ differs between engines: before a final \n or not)
    subs = [
        # STARTING_QUOTES
        ("STARTING_QUOTES[0]", "([«“‘„]|`+)", " $1 "),
        ("STARTING_QUOTES[1]", '^"', "``"),
        ("STARTING_QUOTES[2]", "(``)", " $1 "),
        ("STARTING_QUOTES[3]", "([ \\(\\[\\{<])(\"|'{2})", "$1 `` "),
        ("STARTING_QUOTES[4]",
         "(^|[^{:word_regex:}])(')(?!(?:" + "|".join(R(w) for w in ("re", "ve", "ll", "m", "t", "s", "d", "n"))
         + ")(?![{:word_regex:}]))(?=[{:word_regex:}])", "$1$2 "),
        # PUNCTUATION
        ("PUNCTUATION[0]", "([^\\.])(\\.)(?=([\\]\\)\\}>\"'»”’ ]*))\\3[{:space_regex:}]*" + end, "$1 $2 $3 "),
        ("PUNCTUATION[1]", "([:,])([^{:digit_regex:}])", " $1 $2"),
        ("PUNCTUATION[2]", "([:,])(?=\\n?" + end + ")", " $1 "),
        ("PUNCTUATION[3]", "\\.{2,}", " $0 "),
        ("PUNCTUATION[4]", "[;@#$%&]", " $0 "),
        ("PUNCTUATION[5]", "[\\u2012-\\u2015]", " $0 "),
        ("PUNCTUATION[6]", "([^\\.])(\\.)([\\]\\)\\}>\"']*)[{:space_regex:}]*" + end, "$1 $2$3 "),
        ("PUNCTUATION[7]", "[?!]", " $0 "),
        ("PUNCTUATION[8]", "([^'])' ", "$1 ' "),
        ("PUNCTUATION[9]", "[*]", " $0 "),
        ("PARENS_BRACKETS", "[\\]\\[\\(\\)\\{\\}<>]", " $0 "),
        ("DOUBLE_DASHES", "--", " -- "),
        ("pad", None, " "),
        # ENDING_QUOTES
        ("ENDING_QUOTES[0]", "([»”’])", " $1 "),
        ("ENDING_QUOTES[1]", "''", " '' "),
        ("ENDING_QUOTES[2]", '"', " '' "),
        ("ENDING_QUOTES[3]", "[{:space_regex:}]+", " "),
        ("ENDING_QUOTES[4]", "([^' ])('[sS]|'[mM]|'[dD]|') ", "$1 $2 "),
        ("ENDING_QUOTES[5]", "([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", "$1 $2 "),
    ]
    for i, (a, b) in enumerate([("can", "not"), ("d", "'ye"), ("gim", "me"), ("gon", "na"), ("got", "ta"),
                                ("lem", "me"), ("more", "'n"), ("wan", "na")]):
        after = "(?=[{:space_re:}])" if a == "wan" else "(?![{:word_re:}])"
        subs.append((f"CONTRACTIONS2[{i}]", f"(^|[^{{:word_re:}}])({P(a)})({P(b)}){after}", "$1 $2 $3 "))
    for i, (a, b) in enumerate([("'t", "is"), ("'t", "was")]):
        subs.append((f"CONTRACTIONS3[{i}]", f" ({P(a)})({P(b)})(?![{{:word_re:}}])", " $1 $2 "))
    steps = []
    for source, pattern, replace in subs:
        if pattern is None:
            steps.append({"op": "pad", "text": replace, "nltk": "text = ' ' + text + ' '"})
        else:
            steps.append({"op": "sub", "pattern": pattern, "replace": replace, "nltk": source})
    return steps


def rules() -> dict:
    import nltk

    table, ignorable, cased = lowercase_table()
    classes = {
        "any": "0000-10FFFF",
        "word_regex": ranges(matched(regex.compile(r"\w", regex.U))),
        "space_regex": ranges(matched(regex.compile(r"\s", regex.U))),
        "digit_regex": ranges(matched(regex.compile(r"\d", regex.U))),
        "word_re": ranges(matched(re.compile(r"\w"))),
        "space_re": ranges(cp for cp in range(0x110000) if chr(cp).isspace()),
    }
    assert classes["space_re"] == ranges(matched(re.compile(r"\s")))
    import unicodedata
    return {
        "format": "imram-min-tokenizer",
        "rules_version": RULES_VERSION,
        "reproduces": (f"nltk {nltk.__version__} word_tokenize(caption.lower(), preserve_line=True) "
                       f"(regex {regex.__version__}, Python {sys.version_info[0]}.{sys.version_info[1]}, "
                       f"Unicode {unicodedata.unidata_version})"),
        "doc": "docs/tokenizer.md: the steps, the pattern subset, how a client applies them",
        "lowercase": {
            "map": table,
            "final_sigma": {"char": f"{SIGMA:04X}", "final": "03C2", "other": "03C3",
                            "case_ignorable": ranges(ignorable), "cased": ranges(cased)},
        },
        "classes": classes,
        "steps": substitutions(),
        "split": "space_re",
    }


def dump(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def main() -> int:
    text = dump(rules())
    if "--check" in sys.argv[1:]:
        with open(OUT, encoding="utf-8") as f:
            same = f.read() == text
        print("runtime/tokenizer.json is up to date" if same else "runtime/tokenizer.json differs")
        return 0 if same else 1
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.normpath(OUT)} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
