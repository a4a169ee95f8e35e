"""Up-front checks of the training-side commands (train, evaluate, convert, features, export).

Every command checks everything the user gave it (flags, devices, data splits, checkpoints,
output paths) before any long work and before it writes anything; a failed check raises
``runtime.cli.UserError`` (one ``error: ...`` line naming the file or flag and what was
expected, exit status 2, see runtime/cli.py). ``USER_ERRORS`` are the exception classes of the
libraries below that also mean bad input; each command passes them to ``cli.run``.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import torch

from imram_min.engineering import tiling
from imram_min.engineering.checkpoint import CheckpointError
from imram_min.data import (DataError, caption_layout, cap2img_path, features_paths, load_captions, load_features,
                            load_vocab, whole_images_captions)
from runtime import inputs
from runtime.cli import UserError
from runtime.text import Vocabulary, VocabularyError

USER_ERRORS = (DataError, VocabularyError, CheckpointError)
MAX_WORKERS = max(1, os.cpu_count() or 1) * 4  # data-loader processes / threads: more only exhausts the machine
MAX_BATCH = 1 << 16  # items per batch: beyond it a batch is a memory hazard, not a speed-up


def device(name: str, flag: str = "--device") -> torch.device:
    """auto / cpu / cuda / cuda:N -> torch.device, refused unless it is present on this machine."""
    try:
        dev = tiling.resolve_device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name}: CUDA is not available on this machine; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise UserError(f"{flag} {name}: only cpu and cuda devices are supported")
    return dev


def data_folder(path: str, flag: str = "--data") -> str:
    if not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise UserError(f"{flag} {path} {what}; expected a data folder (precomp layout, see imram_min.data)")
    return path


def vocabulary(data_dir: str) -> Vocabulary:
    """The data folder's vocabulary; a missing or malformed one is a UserError naming the file."""
    try:
        return load_vocab(data_dir)
    except FileNotFoundError as e:  # raised with a message, not an errno
        raise UserError(e.strerror and f"{e.strerror}: {e.filename}" or str(e)) from None


@dataclass
class Split:
    """What a split holds, read from the .npy header and the captions file (no features loaded)."""

    name: str
    features: str  # path of the features file
    captions: str  # path of the captions file
    n_images: int
    n_region: int
    img_dim: int
    dtype: str
    n_captions: int
    caps_per_image: int | None  # 5 or 1: the SCAN layout; None: another layout, from the sidecar
    image_of_caption: np.ndarray  # (n_captions,) int64: the image row of each caption
    cap2img: str | None = None  # the sidecar's path, if the split has one

    def kept_images(self, max_captions: int | None) -> int:
        """Images covered by the first ``max_captions`` captions (None: all), whole images only."""
        if max_captions is None:
            return self.n_images
        keep = whole_images_captions(self.image_of_caption, max_captions)
        return int(self.image_of_caption[keep - 1]) + 1 if keep else 0


def available_splits(data_dir: str) -> list[str]:
    found = {os.path.basename(p).rsplit("_", 1)[0] for pattern in ("*_ims.npy", "*_feat.npy")
             for p in glob.glob(os.path.join(glob.escape(data_dir), pattern))}
    return sorted(found)


def split(data_dir: str, name: str, flag: str = "--split") -> Split:
    """Check a split's features (3-d float array) and captions (UTF-8; 5 or 1 per image, or any number
    with DIR/{name}_cap2img.txt). The features' values are not read (``finite_features`` does)."""
    paths = features_paths(data_dir, name)
    if not any(os.path.exists(p) for p in paths):
        have = available_splits(data_dir)
        raise UserError(f"{flag} {name}: no split {name!r} in {data_dir} (neither {os.path.basename(paths[0])} nor "
                        f"{os.path.basename(paths[1])}); splits there: {', '.join(have) if have else 'none'}")
    try:
        feats = load_features(data_dir, name)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    path = next(p for p in paths if os.path.exists(p))
    caps = os.path.join(data_dir, f"{name}_caps.txt")
    if not os.path.isfile(caps):
        raise UserError(f"{caps}: no such captions file (split {name!r} has features {path})")
    if not all(feats.shape):
        raise UserError(f"{path}: expected shape (n_img, n_region, img_dim) with no zero size, got {feats.shape}")
    captions = load_captions(data_dir, name)
    image_of_caption, cpi = caption_layout(int(feats.shape[0]), captions, caps)
    sidecar = cap2img_path(data_dir, name)
    return Split(name, path, caps, int(feats.shape[0]), int(feats.shape[1]), int(feats.shape[2]),
                 str(feats.dtype), len(captions), cpi, image_of_caption, sidecar if os.path.exists(sidecar) else None)


def finite_features(s: Split) -> None:
    """Every region feature of the split finite (and below runtime.inputs.MAX_FEATURE in magnitude),
    read in chunks of the memory-mapped file (runtime.inputs.check_region_feats): a UserError naming
    the file and the image row otherwise."""
    feats = load_features(os.path.dirname(s.features) or ".", s.name)
    try:
        inputs.check_region_feats(feats, s.img_dim, name=s.features)
    except inputs.InputError as e:
        raise UserError(str(e)) from None


def same_features(a: Split, b: Split) -> None:
    """Two splits a model sees (train and dev) must share the region feature size."""
    if a.img_dim != b.img_dim:
        raise UserError(f"{b.features}: region features of size {b.img_dim}, but {a.features} has {a.img_dim}: "
                        "every split of a data folder must have the same img_dim")


def max_captions(value: int | None, s: Split, flag: str) -> None:
    """A caption limit must cover whole images: in the SCAN layout a positive multiple of the captions
    per image; in another layout it is cut back to whole images, and must hold the first one."""
    if value is None:
        return
    if value <= 0 or (s.caps_per_image is not None and value % s.caps_per_image):
        raise UserError(f"{flag} must be a positive multiple of {s.caps_per_image or 1} (whole images of "
                        f"{s.captions}), got {value}")
    if s.kept_images(value) == 0:
        raise UserError(f"{flag} {value}: fewer captions than the first image of {s.captions} has "
                        f"({int(np.sum(s.image_of_caption == 0))}, per {s.cap2img}); the limit keeps whole images")


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def finite(value: float, flag: str) -> float:
    if not np.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    return value
