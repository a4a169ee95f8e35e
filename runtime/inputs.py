"""Checks of what the user gives the engine: region features, captions, image paths, counts.

Limits (input beyond them is refused with InputError, never attempted):
  * MAX_WORDS tokens per caption (runtime.text's tokenisation, without <start> / <end>): the
    matcher's memory grows with the square of the caption length, outside any sharding
    (10,000 words take 1.5 GB in one call, 100,000 words 40 GB). Captions of COCO and Flickr30K
    have at most ~80 tokens; the shard budget (``Engine.per_pair``) is sized for MAX_WORDS.
  * MAX_FEATURE: region features of larger magnitude are refused (squares of their embeddings
    would overflow float32 and give NaN scores). Real features are below ~1e3.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

CHECK_BYTES = 64 << 20  # features read per chunk by the NaN/Inf scan
MAX_WORDS = 256  # tokens per caption, at most (see the module docstring)
MAX_FEATURE = 1e12  # |region feature|, at most: squares of (1e12 x weights x fan-in) stay in float32


class InputError(ValueError):
    """Region features or captions that cannot be scored (the message says which and where)."""


def check_region_feats(region_feats, img_dim: int, name: str = "region features") -> np.ndarray:
    """Check (n_img, n_region, img_dim) float features, finite and within +-MAX_FEATURE; returns
    them as an ndarray (a memmap stays a memmap: the scan reads it in chunks). Raises InputError."""
    if not isinstance(region_feats, np.ndarray):
        region_feats = np.asarray(region_feats)
    if region_feats.dtype.hasobject:
        raise InputError(f"{name}: holds Python objects; expected a float array")
    if region_feats.ndim != 3:
        raise InputError(f"{name}: expected shape (n_img, n_region, {img_dim}), got {region_feats.shape} "
                         f"({region_feats.ndim} dimensions)")
    n_img, n_region, dim = region_feats.shape
    if dim != img_dim:
        raise InputError(f"{name}: features have size {dim}, the model expects {img_dim} "
                         f"(shape {region_feats.shape})")
    if not np.issubdtype(region_feats.dtype, np.floating):
        raise InputError(f"{name}: expected float features, got dtype {region_feats.dtype}")
    if n_img == 0:
        raise InputError(f"{name}: no images (shape {region_feats.shape})")
    if n_region == 0:
        raise InputError(f"{name}: no regions per image (shape {region_feats.shape})")
    step = max(1, CHECK_BYTES // max(1, n_region * dim * 4))
    as32 = "" if region_feats.dtype == np.float32 else " (as float32)"
    for i in range(0, n_img, step):
        with np.errstate(all="ignore"):
            chunk = np.abs(np.asarray(region_feats[i:i + step], dtype=np.float32)).reshape(-1, n_region * dim)
        bad = ~np.isfinite(chunk).all(1)
        if bad.any():
            raise InputError(f"{name}: image {i + int(np.argmax(bad))} has NaN or Inf features{as32}")
        big = chunk.max(1) > MAX_FEATURE
        if big.any():
            j = int(np.argmax(big))
            raise InputError(f"{name}: image {i + j} has a feature of magnitude {chunk[j].max():.3g}, over "
                             f"{MAX_FEATURE:.0e} (float32 arithmetic would overflow)")
    return region_feats


def check_captions(captions: Sequence[str], name: str = "captions") -> list[str]:
    """Captions as a list of stripped strings; none may be blank, none over MAX_WORDS
    whitespace-separated words (tokens are checked by ``Engine.tokenize``). Raises InputError."""
    if isinstance(captions, str):
        raise InputError(f"{name}: expected a list of captions, got one string")
    captions = list(captions)
    if not captions:
        raise InputError(f"{name}: no captions")
    out = []
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise InputError(f"{name}: caption {i} is a {type(caption).__name__}, expected a string")
        out.append(caption.strip())
        n = len(out[-1].split(maxsplit=MAX_WORDS))
        if n > MAX_WORDS:
            raise too_long(name, i, f"more than {MAX_WORDS} words")
    blank = [i for i, c in enumerate(out) if not c]
    if blank:
        raise InputError(f"{name}: blank captions at {list_some(blank)}")
    return out


def too_long(name: str, i: int, length: str) -> InputError:
    return InputError(f"{name}: caption {i} (line {i + 1}) has {length}; captions may have at most "
                      f"{MAX_WORDS} words (MAX_WORDS)")


def image_paths_or_none(images) -> list[str] | None:
    """``images`` as a list of path strings if it is a list or tuple of str / os.PathLike (an
    empty list counts: ``check_image_paths`` refuses it), else None (an array of features)."""
    if isinstance(images, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in images):
        return [os.fspath(p) for p in images]
    return None


def check_image_paths(paths: Sequence[str | os.PathLike], name: str = "images") -> list[str]:
    """A non-empty list of image file paths as strings. Raises InputError."""
    found = image_paths_or_none(list(paths) if not isinstance(paths, (str, os.PathLike)) else paths)
    if found is None:
        raise InputError(f"{name}: expected a list of image file paths")
    if not found:
        raise InputError(f"{name}: no images")
    return found


def check_count(value, name: str, high: int) -> int:
    """An integer in 1..high (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an integer in 1..{high}, got {value!r}")
    return int(value)


def list_some(items: Sequence[int], n: int = 10) -> str:
    """'1, 4, 9' or '1, 4, ... (25 in all)'."""
    shown = ", ".join(str(i) for i in items[:n])
    return shown if len(items) <= n else f"{shown}, ... ({len(items)} in all)"

