"""Print each caption's token ids, as a model folder's tokeniser and vocabulary make them.

    python -m runtime.tokenize MODEL_DIR CAPTIONS.txt [--tokens]

One JSON array a line, one line per caption: the ids the text encoder is given, [<start>=1,
word ids..., <end>=2] with <unk>=3 for a word not in the vocabulary (``Vocabulary.encode``), or
with --tokens the words themselves (``Tokenizer.tokenize``), compact (``[1,4,5,2]``), UTF-8.
``node clients/node/tokenize.js MODEL_DIR CAPTIONS.txt`` prints the same bytes: a port of the
tokeniser (docs/tokenizer.md) can be checked against either.

MODEL_DIR: written by ``python -m export`` (its files checked against the manifest's SHA-256; a
folder of format 1 or 2 has no tokenizer.json and is read with the built-in rules). CAPTIONS.txt
("-": standard input): runtime.score's rules (UTF-8, one caption a line, whitespace stripped, no
blank lines, at most MAX_WORDS tokens a line). Bad input: one ``error: ...`` line, exit status 2,
nothing printed.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from . import cli
from .modeldir import ModelDirError, load_manifest, load_tokenizer
from .inputs import read_captions
from .text import Tokenizer, TokenizerError, Vocabulary, VocabularyError


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m runtime.tokenize",
                           description="Print one JSON array of token ids per caption line, as the model "
                                       "folder's tokeniser and vocabulary give them.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model folder written by python -m export")
    p.add_argument("captions", metavar="CAPTIONS.txt", help="UTF-8 text, one caption a line ('-': standard input)")
    p.add_argument("--tokens", action="store_true", help="print the words (tokens) instead of their ids")
    return p


def load_model_text(model_dir: str) -> tuple[Vocabulary, Tokenizer]:
    """(vocabulary, tokeniser) of MODEL_DIR, its files checked against the manifest (ModelDirError)."""
    manifest = load_manifest(model_dir)
    vocab_path = os.path.join(model_dir, manifest["vocab"]["file"])
    try:
        vocab = Vocabulary.load(vocab_path)
    except (OSError, VocabularyError) as e:
        raise ModelDirError(str(e)) from None
    return vocab, load_tokenizer(model_dir, manifest)


def token_lines(vocab: Vocabulary, tokenizer: Tokenizer, captions: Sequence[str], tokens: bool = False) -> list[str]:
    """The output lines (without newlines): each caption's ids, or with ``tokens`` its words, as JSON."""
    rows = (tokenizer.tokenize(c) if tokens else vocab.encode(c, tokenizer.tokenize) for c in captions)
    return [json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in rows]


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    vocab, tokenizer = load_model_text(args.model_dir)  # the model folder first, then the captions
    lines = token_lines(vocab, tokenizer, read_captions(args.captions), args.tokens)
    sys.stdout.flush()
    sys.stdout.buffer.write("".join(line + "\n" for line in lines).encode("utf-8"))
    sys.stdout.buffer.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv, user_errors=(ModelDirError, TokenizerError))


if __name__ == "__main__":
    sys.exit(main())
