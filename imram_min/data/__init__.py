"""Data: precomputed region features + captions (the SCAN "precomp" layout), vocabulary, tokens.

A data folder DIR holds, for each split (train, dev, test):

    DIR/{split}_ims.npy  or  DIR/{split}_feat.npy   float (n_img, n_region, img_dim)
    DIR/{split}_caps.txt   UTF-8, one caption a line, grouped by image in image order
    DIR/{split}_cap2img.txt  only for a split that does not hold 5 (or 1) captions per image:
                           one line per line of {split}_caps.txt, the 0-based row of its image
                           in {split}_ims.npy (non-decreasing; every image has >= 1 caption)
    DIR/vocab.json         SCAN vocabulary JSON (SCAN's own name, *_precomp_vocab.json, also works)

As in the original, a dataset item is one *caption*; its image is caption_index // 5 in the SCAN
layout (5 per image, or 1), else the row the sidecar {split}_cap2img.txt gives. A sidecar that
describes the SCAN layout is the SCAN layout (same training, same metrics).

The data set builders live beside this module (``synthetic``: the built-in data, read with this
file; ``emoji``, ``features``, ``prepare``); they import it, it imports none of them. Commands
(``python -m imram_min.data -h``; the dispatcher is imram_min/data/__main__.py):

    python -m imram_min.data prepare PICTURES CAPTIONS --out DIR
                                                  a data folder from your pictures + captions (imram_min.data.prepare)
    python -m imram_min.data vocab DIR [--min-count N]
                                                  DIR/vocab.json from DIR/train_caps.txt (words seen >= N times, 4)
    python -m imram_min.data synthetic --out DIR  the built-in synthetic data (imram_min.data.synthetic)
    python -m imram_min.data emoji --out DIR      a small real-picture data set (imram_min.data.emoji; needs npm)
"""
from __future__ import annotations

import glob
import os

import numpy as np
import torch

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


def cap2img_path(data_dir: str | os.PathLike, split: str) -> str:
    """The sidecar of a split with any number of captions per image: DIR/{split}_cap2img.txt."""
    return os.path.join(data_dir, f"{split}_cap2img.txt")


def _sidecar_of(caps_path: str | os.PathLike) -> str:
    caps_path = os.fspath(caps_path)
    stem = caps_path[:-len("_caps.txt")] if caps_path.endswith("_caps.txt") else os.path.splitext(caps_path)[0]
    return stem + "_cap2img.txt"


def blank_lines_note(captions: list[str], path: str | os.PathLike) -> str:
    """"; line N of PATH is blank (...)" for the first blank caption line, "" if none (1-based lines)."""
    blank = [k + 1 for k, c in enumerate(captions) if not c]
    if not blank:
        return ""
    more = f" ({len(blank) - 1} more blank lines follow)" if len(blank) > 1 else ""
    return f"; line {blank[0]} of {os.fspath(path)} is blank{more}: one caption a line, no blank lines"


def captions_per_image(n_img: int, n_cap: int, path: str | os.PathLike, captions: list[str] | None = None) -> int:
    """5 if there are five captions per image, 1 if one; anything else is an error naming ``path``, the
    counts, the sidecar to add (``{split}_cap2img.txt``) and the first blank line of ``captions`` if any."""
    if n_img > 0 and n_cap == 5 * n_img:
        return 5
    if n_img > 0 and n_cap == n_img:
        return 1
    sidecar = os.path.basename(_sidecar_of(path))
    raise DataError(f"{os.fspath(path)}: expected 5 or 1 captions per image, got {n_cap} captions "
                    f"for {n_img} images" + blank_lines_note(captions or [], path) +
                    f"; for another number of captions per image add {sidecar} (one line per caption: the "
                    "0-based row of its image) or make the folder with: python -m imram_min.data prepare")


def read_cap2img(path: str | os.PathLike, n_img: int, captions: list[str], caps_path: str | os.PathLike) -> np.ndarray:
    """The sidecar ``path``: (n_cap,) int64, the image row of each caption; checked to be one line per
    caption, rows 0 .. n_img - 1, non-decreasing, every image with a caption. DataError naming the line."""
    path, n_cap = os.fspath(path), len(captions)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: must be UTF-8 text, one image row a line ({e})") from None
    if len(lines) != n_cap:
        raise DataError(f"{path}: {len(lines)} lines for the {n_cap} captions of {os.fspath(caps_path)}; one line "
                        "per caption, the 0-based row of its image" + blank_lines_note(captions, caps_path)
                        + blank_lines_note(lines, path))
    rows = np.empty(n_cap, dtype=np.int64)
    previous = 0
    for k, line in enumerate(lines):
        if not (line.isascii() and line.isdigit()):
            got = "a blank line" if not line else repr(line[:40])
            raise DataError(f"{path}: line {k + 1}: expected the 0-based row of an image (0 to {n_img - 1}), got {got}")
        row = int(line)
        if row >= n_img:
            raise DataError(f"{path}: line {k + 1}: image row {row}, but the split has {n_img} images (rows 0 to "
                            f"{n_img - 1})")
        if row < previous:
            raise DataError(f"{path}: line {k + 1}: image row {row} after {previous}: captions must be grouped by "
                            "image in image order (non-decreasing rows)")
        if row > previous + (k > 0):
            missing = previous + (k > 0)
            raise DataError(f"{path}: image row {missing} has no caption (every image needs at least one)")
        rows[k], previous = row, row
    if n_cap and rows[-1] != n_img - 1:
        raise DataError(f"{path}: image row {rows[-1] + 1} has no caption (every image needs at least one)")
    if not n_cap:
        raise DataError(f"{path}: no captions")
    return rows


def caption_layout(n_img: int, captions: list[str], caps_path: str | os.PathLike,
                   sidecar: str | os.PathLike | None = None) -> tuple[np.ndarray, int | None]:
    """(image_of_caption (n_cap,) int64, caps_per_image 5 / 1, or None for any other layout) of a split.

    With the sidecar (default: the one next to ``caps_path``) its rows; else the SCAN rule
    (5 or 1 per image, ``captions_per_image``). A sidecar giving the SCAN layout reports 5 / 1.
    A blank last line of the captions file is refused, naming it."""
    sidecar = _sidecar_of(caps_path) if sidecar is None else os.fspath(sidecar)
    n_cap = len(captions)
    if n_cap and not captions[-1]:
        raise DataError(f"{os.fspath(caps_path)}: line {n_cap} (the last line) is blank: one caption a line, "
                        "remove the trailing blank line")
    if os.path.exists(sidecar):
        rows = read_cap2img(sidecar, n_img, captions, caps_path)
        for cpi in (5, 1):
            if n_cap == cpi * n_img and np.array_equal(rows, np.arange(n_cap) // cpi):
                return rows, cpi
        return rows, None
    cpi = captions_per_image(n_img, n_cap, caps_path, captions)
    return np.arange(n_cap, dtype=np.int64) // cpi, cpi


def whole_images_captions(image_of_caption: np.ndarray, max_captions: int) -> int:
    """How many of the first captions to keep for at most ``max_captions``, cut back to whole images
    (a layout grouped by image): 0 when even the first image has more captions."""
    n_cap = len(image_of_caption)
    if max_captions >= n_cap:
        return n_cap
    return int(np.searchsorted(image_of_caption, image_of_caption[max_captions], side="left"))


def encode_captions_batch(captions: list[str], vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> tokens (n_cap, n_word_max) int64 padded with <pad>=0, lengths (n_cap,) int64."""
    padded, lengths = vocab.encode_batch(captions)
    tokens = np.asarray(padded, dtype=np.int64).reshape(len(captions), max(lengths, default=0))
    return tokens, np.asarray(lengths, dtype=np.int64)


class PrecompDataset(torch.utils.data.Dataset):
    """One item per caption of a split, with the features of its image.

    Attributes: ``images`` (n_images, n_region, img_dim) memmap, ``captions`` list[str],
    ``tokens`` list[list[int]] (encoded, with <start>/<end>), ``image_of_caption`` (n_captions,)
    int64 (the image row of each caption), ``caps_per_image`` (5 or 1: the SCAN layout; None: any
    other number per image, from DIR/{split}_cap2img.txt), ``n_images`` = the images the kept
    captions cover. ``max_captions`` keeps the first captions only (the original evaluates dev on
    its first 5000): in the SCAN layout a multiple of the captions per image; in another layout
    cut back to whole images.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, vocab: Vocabulary, max_captions: int | None = None):
        images = load_features(data_dir, split)
        self.captions = load_captions(data_dir, split)
        caps_path = os.path.join(data_dir, f"{split}_caps.txt")
        self.image_of_caption, self.caps_per_image = caption_layout(images.shape[0], self.captions, caps_path)
        if max_captions is not None:
            cpi = self.caps_per_image
            if max_captions <= 0 or (cpi is not None and max_captions % cpi):
                raise ValueError(f"max_captions must be a positive multiple of {cpi or 1} "
                                 f"(whole images), got {max_captions}")
            keep = whole_images_captions(self.image_of_caption, max_captions)
            if keep == 0:
                raise ValueError(f"max_captions {max_captions} holds no whole image: the first image of {caps_path} "
                                 f"has {int(np.sum(self.image_of_caption == 0))} captions")
            self.captions, self.image_of_caption = self.captions[:keep], self.image_of_caption[:keep]
        self.n_images = int(self.image_of_caption[-1]) + 1 if len(self.captions) else 0
        self.images = images[: self.n_images]
        self.tokens = [vocab.encode(c) for c in self.captions]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        """-> (region_feats (n_region, img_dim) float32, token_ids (n_word,) int64, caption id, image id)."""
        if not 0 <= i < len(self):
            raise IndexError(f"caption index {i} out of range [0, {len(self)})")
        img_id = int(self.image_of_caption[i])
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
