"""Seeded fuzz captions for the tokeniser (tests/test_tokenizer.py, benchmarks/tokenizer_fuzz.py).

    fuzz_cases(n, seed) -> [(kind, caption), ...]

Each caption is made by one generator ``kind`` (KINDS): quotes, contractions, dashes, digits,
final periods, colons and commas, letters of many scripts, combining marks, emoji, control
characters, whitespace of all kinds, capital sigma contexts, random code points, or a mix of all.
Pieces are joined by spaces, nothing, or other whitespace, and a caption is sometimes upper- or
title-cased (the tokeniser lower-cases first).

Characters come from blocks assigned long ago (Unicode <= 10), whose properties no later Unicode
version changes, so the nltk comparison means the same under any Python. Only ``random_any``
draws from every code point; it is used only when the running Python's Unicode version is the
one the rules were made with (``RULES_UNICODE``), as the oracle (nltk on this Python) otherwise
sees newer characters differently from the frozen rules, by design. Lone surrogates are never
drawn: a caption comes from UTF-8 text, which cannot hold them.

``nltk_tokenize`` is the oracle: the pinned nltk's ``word_tokenize(caption.lower(), preserve_line=True)``.
"""
from __future__ import annotations

import random
import unicodedata

RULES_UNICODE = "14.0.0"  # the Unicode version of the Python the rules were made with (runtime/tokenizer.json)

WORDS = ["a", "dog", "man", "The", "CAT", "it", "is", "was", "don", "can", "not", "na", "me", "ta", "ye",
         "n", "t", "s", "re", "ve", "ll", "m", "d", "O", "I", "you", "they", "wan", "gon", "got", "lem", "gim",
         "more", "what", "cha", "whad", "dd", "ya", "x", "Z", "hello", "world", "e.g", "u.s.a", "mr", "st",
         "tis", "twas", "em", "cause", "rock", "n", "roll", "y", "all", "o", "clock", "ss", "ß", "İ", "ı", "ſ"]
QUOTES = ['"', "'", "''", "'''", "``", "`", "«", "»", "“", "”", "‘", "’", "„", "‹", "›", "‚", "‛", "‟",
          "＂", "＇", '""', "\"'", "'\"", "´", "′", "″"]
CONTRACTIONS = ["n't", "N'T", "n'T", "'s", "'S", "'m", "'M", "'d", "'D", "'ll", "'LL", "'Ll", "'re", "'RE",
                "'ve", "'VE", "cannot", "CanNot", "d'ye", "D'YE", "gimme", "gonna", "gotta", "lemme", "more'n",
                "wanna", "WANNA", "'tis", "'twas", "'TIS", "'Twas", "'t", "whaddya", "whatcha", "don't", "can't",
                "won't", "it's", "y'all", "o'clock", "rock'n'roll", "'em", "'cause", "'tiſ", "'tıs", "gımme",
                "'Tİs", "'n", "'", "s'", "dogs'", "'re'", "''tis", "'ll've", "n'", "'tisn't", "wanna'", "cannot's"]
DASHES = ["-", "--", "---", "----", "‒", "–", "—", "―", "‐", "‑", "−", "﹘", "－", "_", "-–", "—-", "⸺", "⸻"]
PUNCT = [".", "..", "...", "....", "…", ",", ",,", ":", "::", ";", "!", "?", "?!", "(", ")", "[", "]", "{", "}",
         "<", ">", "*", "**", "@", "#", "$", "%", "&", "/", "\\", "|", "~", "^", "+", "=", "¿", "¡", "·", "•",
         "。", "、", "，", "：", "；", "！", "？", "（", "）", "【", "】", "﹐", "﹕", "︰", "꞉", "‧"]
DIGITS = ["0", "1", "42", "3.14", "1,000", "1,5", ",5", "5,", "12:30", ":3", "2020/01/02", "٣", "٠١", "३", "০",
          "๓", "０", "１２", "²", "³", "½", "Ⅵ", "ⅻ", "𝟎", "𝟗", "፩", "①", "⑴", "𐒠", "߁", "᠑", "꘠", "¹", "₂"]
SCRIPTS = [(0xC0, 0xFF), (0x100, 0x24F), (0x250, 0x2AF), (0x2B0, 0x2FF), (0x370, 0x3FF), (0x400, 0x52F),
           (0x531, 0x587), (0x5D0, 0x5EA), (0x620, 0x64A), (0x671, 0x6D3), (0x900, 0x97F), (0x980, 0x9FF),
           (0xB80, 0xBFF), (0xE00, 0xE7F), (0xF00, 0xFD4), (0x10A0, 0x10FF), (0x1100, 0x11FF),
           (0x1200, 0x137C), (0x13A0, 0x13FD), (0x1780, 0x17F9), (0x1C80, 0x1C88), (0x1D00, 0x1DBF),
           (0x1E00, 0x1EFF), (0x1F00, 0x1FFE), (0x2100, 0x214F), (0x2150, 0x218B), (0x2460, 0x24FF),
           (0x2C00, 0x2C5E), (0x2C60, 0x2C7F), (0x2C80, 0x2CF3), (0x2D00, 0x2D25), (0x3041, 0x3096),
           (0x30A1, 0x30FA), (0x3131, 0x318E), (0x4E00, 0x9FCC), (0xA640, 0xA69D), (0xA722, 0xA7AD),
           (0xAB30, 0xAB65), (0xAB70, 0xABBF), (0xAC00, 0xD7A3), (0xFB00, 0xFB4F), (0xFE70, 0xFEFC),
           (0xFF01, 0xFF5E), (0x10400, 0x1044F), (0x104B0, 0x104FB), (0x10C80, 0x10CF2), (0x118A0, 0x118F2),
           (0x1D400, 0x1D7FF), (0x1E900, 0x1E95F), (0x20000, 0x2A6D6)]
COMBINING = [(0x300, 0x36F), (0x483, 0x489), (0x591, 0x5BD), (0x610, 0x61A), (0x64B, 0x65F), (0x93A, 0x94F),
             (0xE31, 0xE3A), (0x1AB0, 0x1ABE), (0x1DC0, 0x1DF5), (0x20D0, 0x20F0), (0xFE00, 0xFE0F),
             (0xFE20, 0xFE2F), (0x1D165, 0x1D169), (0x1D17B, 0x1D182), (0xE0100, 0xE01EF)]
EXTRA_MARKS = ["\u0345", "\u200c", "\u200d", "\u0f39", "\u3099", "\u309a", "\u302a"]
EMOJI = ["😀", "👍", "👍🏽", "🐕", "🐈", "❤️", "❤", "☺", "☺️", "👨\u200d👩\u200d👧", "🇫🇷", "🇺🇸", "1️⃣", "#️⃣",
         "©", "®", "™", "🏳️\u200d🌈", "🤷\u200d♀️", "🦄", "🧑🏿\u200d🚀", "⌚", "⭐", "🀄", "🏿", "\ufe0f", "\u20e3",
         "🔟", "🅰", "🆗", "㊙", "〽", "✂", "✔", "➰", "🗿", "🙏🏻", "💯"]
EMOJI_RANGES = [(0x1F300, 0x1F64F), (0x1F680, 0x1F6D2), (0x1F900, 0x1F9C0), (0x2600, 0x27BF)]
CONTROL = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x200B, 0x2010), 0x2028, 0x2029,
                            *range(0x202A, 0x202F), *range(0x2060, 0x2065), 0xFEFF, 0xAD, 0x180E, 0xFFF9,
                            0xFFFA, 0xFFFB, 0xFFFC, 0xFFFD, 0xE0001, *range(0xE0020, 0xE0080, 7), 0xE000, 0xF8FF,
                            0xF0000, 0x10FFFD]]
WHITESPACE = [chr(c) for c in [0x9, 0xA, 0xB, 0xC, 0xD, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680,
                               *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0x180E, 0x200B,
                               0x2060, 0xFEFF]]
SIGMA_PIECES = ["Σ", "σ", "ς", "ΟΔΟΣ", "ΣΑ", "ΑΣ", "Σ'", "'Σ", "ΑΣ'", "Α'Σ", "ΑΣ.Β", "Α.Σ", "ΑΣ\u0301", "Α\u0301Σ",
                "ΣΣ", "ΑΣΣ", "ΑΣ\u0345", "\u0345Σ", "ΑΣ:Β", "AΣ", "ÅΣ", "ΣΑ\u00ad", "Α\u00adΣ", "Σ\u200dΑ", "ΣΑΣ",
                "ΣΑΣ'", "ΑΣ\u02b0", "\u02b0Σ", "ﬁΣ", "ᾼΣ", "ǅΣ", "ΣǄ"]
SEPARATORS = [" "] * 12 + ["", "", "  ", "\t", "\n", " \n", "\r\n", "\u00a0", "\u3000", "\u2009", "\x1c", "\x85",
                           "\u200b"]

KINDS = ("quotes", "contractions", "dashes", "digits", "final_period", "colon_comma", "scripts", "combining",
         "emoji", "control", "whitespace", "sigma", "random_stable", "random_any", "mixed")


def _assigned(ranges, current: bool = True) -> list[str]:
    """Characters in ``ranges`` assigned in this Python's Unicode (and in 3.2 unless ``current``)."""
    out = []
    for a, b in ranges:
        for cp in range(a, b + 1):
            ch = chr(cp)
            if unicodedata.category(ch) != "Cn" and (current or unicodedata.ucd_3_2_0.category(ch) != "Cn"):
                out.append(ch)
    return out


class _Pools:
    def __init__(self):
        self.script = _assigned(SCRIPTS)
        self.combining = _assigned(COMBINING) + EXTRA_MARKS
        self.emoji = EMOJI + _assigned(EMOJI_RANGES)
        # every code point assigned in Unicode 3.2 (stable under every Python), surrogates excluded
        self.stable = [chr(cp) for cp in range(0x110000)
                       if not 0xD800 <= cp <= 0xDFFF and unicodedata.ucd_3_2_0.category(chr(cp)) != "Cn"]


_POOLS: list[_Pools] = []


def _pools() -> _Pools:
    if not _POOLS:
        _POOLS.append(_Pools())
    return _POOLS[0]


def _letters(rng: random.Random, pool: list[str], low: int = 1, high: int = 6) -> str:
    return "".join(rng.choice(pool) for _ in range(rng.randint(low, high)))


def _random_code_point(rng: random.Random) -> str:
    while True:
        cp = rng.randrange(0x110000) if rng.random() < 0.3 else rng.randrange(0x10000)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def _piece(kind: str, rng: random.Random, pools: _Pools, random_any: bool) -> str:
    """One piece of a caption of generator ``kind``: often a plain word, else the kind's material."""
    if kind == "mixed":
        kind = rng.choice([k for k in KINDS if k not in ("mixed", "random_any") or random_any and k == "random_any"])
    r = rng.random()
    if r < 0.3:
        return rng.choice(WORDS)
    if kind == "quotes":
        q = rng.choice(QUOTES)
        return rng.choice([q, q + rng.choice(WORDS), rng.choice(WORDS) + q, q + rng.choice(WORDS) + rng.choice(QUOTES)])
    if kind == "contractions":
        c = rng.choice(CONTRACTIONS)
        return rng.choice([c, rng.choice(WORDS) + c, c + rng.choice(WORDS), c + rng.choice(PUNCT + QUOTES)])
    if kind == "dashes":
        d = rng.choice(DASHES)
        return rng.choice([d, rng.choice(WORDS) + d + rng.choice(WORDS), d + rng.choice(WORDS), rng.choice(WORDS) + d])
    if kind == "digits":
        d = rng.choice(DIGITS)
        return rng.choice([d, d + rng.choice(PUNCT), rng.choice([",", ":"]) + d, d + rng.choice(WORDS)])
    if kind == "final_period":
        tail = "".join(rng.choice(["'", '"', ")", "]", "}", ">", "»", "”", "’", " ", " ", "\t", "\n", "\u00a0",
                                   "\x1c", "\u3000", "."]) for _ in range(rng.randint(0, 4)))
        return rng.choice(WORDS + PUNCT + QUOTES) + "." + tail
    if kind == "colon_comma":
        return rng.choice([",", ":"]) + rng.choice(["", "\n", " ", rng.choice(WORDS), rng.choice(DIGITS),
                                                    rng.choice(pools.script), rng.choice(CONTROL)])
    if kind == "scripts":
        return _letters(rng, pools.script)
    if kind == "combining":
        return rng.choice(["", rng.choice(WORDS), _letters(rng, pools.script, 1, 2), rng.choice(QUOTES + PUNCT)]) + \
            _letters(rng, pools.combining, 1, 3) + rng.choice(["", rng.choice(WORDS), "'s", "n't", "."])
    if kind == "emoji":
        return rng.choice(["", rng.choice(WORDS)]) + _letters(rng, pools.emoji, 1, 3) + rng.choice(["", "'s", "."])
    if kind == "control":
        return rng.choice(["", rng.choice(WORDS)]) + _letters(rng, CONTROL, 1, 2) + rng.choice(["", rng.choice(WORDS), "."])
    if kind == "whitespace":
        return _letters(rng, WHITESPACE, 1, 3) + rng.choice(["", rng.choice(WORDS), ".", ",", "'", '"', "'s"])
    if kind == "sigma":
        return _letters(rng, SIGMA_PIECES, 1, 3) + rng.choice(["", "", "'s", ".", rng.choice(pools.combining)])
    if kind == "random_stable":
        return _letters(rng, pools.stable, 1, 4)
    if kind == "random_any":
        return "".join(_random_code_point(rng) for _ in range(rng.randint(1, 4)))
    raise ValueError(f"unknown kind {kind!r}")


def fuzz_cases(n: int, seed: int = 0, random_any: bool | None = None) -> list[tuple[str, str]]:
    """``n`` (kind, caption) pairs, the same for a given ``seed``. ``random_any`` (default: when this
    Python's Unicode is RULES_UNICODE) lets the kinds draw from every code point."""
    if random_any is None:
        random_any = unicodedata.unidata_version == RULES_UNICODE
    kinds = [k for k in KINDS if random_any or k != "random_any"]
    rng, pools, out = random.Random(seed), _pools(), []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        pieces = [_piece(kind, rng, pools, random_any) for _ in range(rng.randint(1, 12))]
        text = pieces[0]
        for piece in pieces[1:]:
            text += rng.choice(SEPARATORS) + piece
        case = rng.random()
        if case < 0.15:
            text = text.upper()
        elif case < 0.25:
            text = text.title()
        if rng.random() < 0.1:
            text = rng.choice(SEPARATORS + WHITESPACE) + text + rng.choice(SEPARATORS + WHITESPACE)
        out.append((kind, text))
    return out


def nltk_tokenize(caption: str) -> list[str]:
    """The oracle: the pinned nltk's ``word_tokenize(caption.lower(), preserve_line=True)``."""
    from nltk.tokenize import word_tokenize
    return word_tokenize(caption.lower(), preserve_line=True)
