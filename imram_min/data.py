"""Data: precomputed region features + captions (the SCAN "precomp" layout), vocabulary, tokens.

A data folder DIR holds, for each split (train, dev, test):

    DIR/{split}_ims.npy  or  DIR/{split}_feat.npy   float (n_img, n_region, img_dim)
    DIR/{split}_caps.txt   UTF-8, one caption a line, in image order, 5 (or 1) per image
    DIR/vocab.json         SCAN vocabulary JSON (SCAN's own name, *_precomp_vocab.json, also works)

As in the original, a dataset item is one *caption*; its image is caption_index // 5.

Commands (``python -m imram_min.data -h``):

    python -m imram_min.data vocab DIR            DIR/vocab.json from DIR/train_caps.txt (words seen >= 4 times)
    python -m imram_min.data synthetic --out DIR  the built-in synthetic data (= python -m imram_min.synthetic)
    python -m imram_min.data emoji --out DIR      a small real-picture data set (imram_min.emoji; needs npm)

``python -m imram_min.data --out DIR`` (no command) is the synthetic one, as before it had its own module.
"""
from __future__ import annotations

import glob
import os
import sys

import numpy as np
import torch

from runtime import cli
from runtime.text import PAD, Vocabulary

SPLITS = ("train", "dev", "test")
VOCAB_THRESHOLD = 4  # the original's build_vocab: words seen at least 4 times in the training captions


class DataError(ValueError):
    """A data file that exists but does not hold what is expected. The message names the file."""


# --------------------------------------------------------------------------- loading
def features_paths(data_dir: str | os.PathLike, split: str) -> tuple[str, str]:
    """The two accepted names of a split's features: DIR/{split}_ims.npy, DIR/{split}_feat.npy."""
    return (os.path.join(data_dir, f"{split}_ims.npy"), os.path.join(data_dir, f"{split}_feat.npy"))


def load_features(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """Region features of a split, memory-mapped read-only: (n_img, n_region, img_dim).

    Reads DIR/{split}_ims.npy, or DIR/{split}_feat.npy if the first is absent. Any float
    dtype is accepted (the standard features are float32); items are cast to float32.
    """
    paths = features_paths(data_dir, split)
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        raise FileNotFoundError(f"no features for split {split!r}: neither {paths[0]} nor {paths[1]} exists")
    try:
        feats = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read as a plain .npy array ({e})") from None
    if not isinstance(feats, np.ndarray):
        raise DataError(f"{path}: expected a single .npy array, got {type(feats).__name__}")
    if feats.ndim != 3:
        raise DataError(f"{path}: expected shape (n_img, n_region, img_dim), got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise DataError(f"{path}: expected float features, got dtype {feats.dtype}")
    return feats


def load_captions(data_dir: str | os.PathLike, split: str) -> list[str]:
    """Captions of a split from DIR/{split}_caps.txt: one a line, whitespace stripped (as the original)."""
    path = os.path.join(data_dir, f"{split}_caps.txt")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: captions must be UTF-8 text ({e})") from None


def vocab_path(data_dir: str | os.PathLike) -> str:
    """The vocabulary file of a data folder: DIR/vocab.json, else the one DIR/*_precomp_vocab.json.

    Raises FileNotFoundError, saying which command makes one, when there is neither.
    """
    path = os.path.join(data_dir, "vocab.json")
    if os.path.exists(path):
        return path
    pattern = os.path.join(data_dir, "*_precomp_vocab.json")
    found = sorted(glob.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no vocabulary in {os.fspath(data_dir)}: neither {path} nor a file matching "
                                f"{pattern} exists; make one with: python -m imram_min.data vocab {os.fspath(data_dir)}")
    if len(found) > 1:
        raise DataError(f"several vocabularies match {pattern}: {found}; keep one or add {path}")
    return found[0]


def load_vocab(data_dir: str | os.PathLike) -> Vocabulary:
    """The vocabulary of a data folder (``vocab_path``)."""
    return Vocabulary.load(vocab_path(data_dir))


def build_vocab(data_dir: str | os.PathLike, threshold: int = VOCAB_THRESHOLD) -> Vocabulary:
    """Write DIR/vocab.json (atomically) from DIR/train_caps.txt, as the original's vocabulary script.

    The training captions are tokenised (``runtime.text.tokenize``) and counted; the words seen at
    least ``threshold`` times are kept, after the 4 special tokens, in order of first appearance.
    Raises FileNotFoundError / DataError (naming the file) for a missing, non-UTF-8 or empty file.
    """
    path = os.path.join(data_dir, "train_caps.txt")
    captions = load_captions(data_dir, "train")
    if not any(captions):
        raise DataError(f"{path}: holds no captions")
    vocab = Vocabulary.build(captions, threshold=threshold)
    vocab.save(os.path.join(data_dir, "vocab.json"))
    return vocab


def captions_per_image(n_img: int, n_cap: int, path: str | os.PathLike) -> int:
    """5 if there are five captions per image, 1 if one; anything else is an error naming ``path``."""
    if n_img > 0 and n_cap == 5 * n_img:
        return 5
    if n_img > 0 and n_cap == n_img:
        return 1
    raise DataError(f"{os.fspath(path)}: expected 5 or 1 captions per image, got {n_cap} captions "
                    f"for {n_img} images")


def encode_captions_batch(captions: list[str], vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> tokens (n_cap, n_word_max) int64 padded with <pad>=0, lengths (n_cap,) int64."""
    padded, lengths = vocab.encode_batch(captions)
    tokens = np.asarray(padded, dtype=np.int64).reshape(len(captions), max(lengths, default=0))
    return tokens, np.asarray(lengths, dtype=np.int64)


class PrecompDataset(torch.utils.data.Dataset):
    """One item per caption of a split, with the features of its image.

    Attributes: ``images`` (n_images, n_region, img_dim) memmap, ``captions`` list[str],
    ``tokens`` list[list[int]] (encoded, with <start>/<end>), ``caps_per_image`` (5 or 1),
    ``n_images`` = the images the kept captions cover. ``max_captions`` keeps the first
    captions only (the original evaluates dev on its first 5000); it must cover whole images.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, vocab: Vocabulary, max_captions: int | None = None):
        images = load_features(data_dir, split)
        self.captions = load_captions(data_dir, split)
        caps_path = os.path.join(data_dir, f"{split}_caps.txt")
        self.caps_per_image = captions_per_image(images.shape[0], len(self.captions), caps_path)
        if max_captions is not None:
            if max_captions <= 0 or max_captions % self.caps_per_image:
                raise ValueError(f"max_captions must be a positive multiple of {self.caps_per_image} "
                                 f"(whole images), got {max_captions}")
            self.captions = self.captions[:max_captions]
        self.n_images = len(self.captions) // self.caps_per_image
        self.images = images[: self.n_images]
        self.tokens = [vocab.encode(c) for c in self.captions]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        """-> (region_feats (n_region, img_dim) float32, token_ids (n_word,) int64, caption id, image id)."""
        if not 0 <= i < len(self):
            raise IndexError(f"caption index {i} out of range [0, {len(self)})")
        img_id = i // self.caps_per_image
        region_feats = torch.from_numpy(np.array(self.images[img_id], dtype=np.float32))
        return region_feats, torch.tensor(self.tokens[i], dtype=torch.int64), i, img_id


def collate(batch):
    """List of items -> (region_feats (B, n_region, img_dim), tokens (B, n_word_max) int64 padded
    with 0, lengths (B,) int64, cap_ids (B,) int64, img_ids (B,) int64), in the batch's order.

    (The original sorts a batch by length for pack_padded_sequence; the model packs with
    enforce_sorted=False, so no sorting is needed.)
    """
    region_feats = torch.stack([item[0] for item in batch])
    lengths = torch.tensor([len(item[1]) for item in batch], dtype=torch.int64)
    tokens = torch.full((len(batch), int(lengths.max())), PAD, dtype=torch.int64)
    for row, item in enumerate(batch):
        tokens[row, : len(item[1])] = item[1]
    cap_ids = torch.tensor([item[2] for item in batch], dtype=torch.int64)
    img_ids = torch.tensor([item[3] for item in batch], dtype=torch.int64)
    return region_feats, tokens, lengths, cap_ids, img_ids


# --------------------------------------------------------------------------- commands
COMMANDS = ("vocab", "synthetic", "emoji")


def build_parser() -> cli.ArgumentParser:
    from imram_min import synthetic
    p = cli.ArgumentParser(prog="python -m imram_min.data", description="Make the files of a data folder.")
    commands = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    vocab = commands.add_parser("vocab", help="DIR/vocab.json from DIR/train_caps.txt (words seen >= 4 times)")
    vocab.add_argument("dir", help="data folder holding train_caps.txt")
    synthetic.add_arguments(commands.add_parser("synthetic", help="the built-in synthetic data (the default)"))
    emoji = commands.add_parser("emoji", help="emoji pictures with their names (imram_min.emoji; needs npm)")
    emoji.add_argument("--out", required=True, help="folder to write")
    return p


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["synthetic", *argv]  # no command: the synthetic data, as this command always made
    args = build_parser().parse_args(argv)
    if args.command == "vocab":
        if not os.path.isdir(args.dir):
            raise cli.UserError(f"{args.dir}: no such folder")
        vocab = build_vocab(args.dir)
        print(f"wrote {os.path.join(args.dir, 'vocab.json')}: {len(vocab)} words (4 special tokens and the words "
              f"of train_caps.txt seen >= {VOCAB_THRESHOLD} times)")
    elif args.command == "emoji":
        from imram_min.emoji import build_emoji_dataset
        build_emoji_dataset(args.out)
        print(f"wrote the emoji dataset to {args.out}")
    else:
        from imram_min import synthetic
        return synthetic.write_from_args(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, user_errors=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
