"""``python -m imram_min.data COMMAND``: make the files of a data folder (see imram_min.data).

    python -m imram_min.data prepare PICTURES CAPTIONS --out DIR   your pictures + captions (imram_min.data.prepare)
    python -m imram_min.data vocab DIR [--min-count N]              DIR/vocab.json from DIR/train_caps.txt
    python -m imram_min.data synthetic --out DIR [--overwrite]      the built-in synthetic data (data/synthetic.py)
    python -m imram_min.data emoji --out DIR [--overwrite]          emoji pictures (imram_min.data.emoji; needs npm)

The dispatcher lives here, apart from imram_min.data (the loaders), because the builders import the
loaders: imram_min.data imports none of them, so there is no import cycle.
"""
from __future__ import annotations

import os
import sys

from imram_min.data import emoji, prepare, synthetic
from imram_min.data import VOCAB_THRESHOLD, DataError, build_vocab
from runtime import cli

COMMANDS = ("prepare", "vocab", "synthetic", "emoji")


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m imram_min.data", description="Make the files of a data folder.")
    commands = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    prepare.add_arguments(commands.add_parser(
        "prepare", help="a data folder from a folder of your pictures and their captions (imram_min.data.prepare)",
        description="Pictures + captions (TSV path<TAB>caption, or JSON lines) -> a data folder: splits by "
                    "picture, grid features, captions, vocabulary, a training recipe (see imram_min/data/prepare.py)."))
    vocab = commands.add_parser("vocab", help=f"DIR/vocab.json from DIR/train_caps.txt (words seen >= "
                                              f"--min-count times, default {VOCAB_THRESHOLD})")
    vocab.add_argument("dir", help="data folder holding train_caps.txt")
    vocab.add_argument("--min-count", dest="min_count", type=int, default=VOCAB_THRESHOLD,
                       help=f"words seen at least this often in train_caps.txt are kept (default {VOCAB_THRESHOLD}, "
                            "as SCAN; small data: 1 or 2)")
    vocab.add_argument("--overwrite", action="store_true", help="replace an existing DIR/vocab.json")
    synthetic.add_arguments(commands.add_parser("synthetic", help="the built-in synthetic data (the default)"))
    emoji_command = commands.add_parser("emoji",
                                        help="emoji pictures with their names (imram_min.data.emoji; needs npm)")
    emoji_command.add_argument("--out", required=True, help="folder to write")
    emoji_command.add_argument("--overwrite", action="store_true", help="replace the emoji data files already in --out")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        return prepare.run_from_args(args)
    if args.command == "vocab":
        if not os.path.isdir(args.dir):
            raise cli.UserError(f"{args.dir}: no such folder")
        cli.check_count(args.min_count, "--min-count", 1)
        cli.check_output_file(os.path.join(args.dir, "vocab.json"), [os.path.join(args.dir, "train_caps.txt")],
                              "the vocabulary", overwrite=args.overwrite)
        vocab = build_vocab(args.dir, threshold=args.min_count)
        print(f"wrote {os.path.join(args.dir, 'vocab.json')}: {len(vocab)} words (4 special tokens and the words "
              f"of train_caps.txt seen >= {args.min_count} times)")
    elif args.command == "emoji":
        cli.check_output_folder(args.out, "--out", overwrite=args.overwrite, outputs=emoji.OUTPUTS)
        emoji.build_emoji_dataset(args.out)
        print(f"wrote the emoji dataset to {args.out}")
    else:
        return synthetic.write_from_args(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, user_errors=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
