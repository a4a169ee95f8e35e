"""Checks of what the user gives the engine: region features, captions, image paths, counts; and
the readers of the commands' input files (IMAGES: a .npy, a folder, a .txt list or a picture;
CAPTIONS: a text file or standard input), which raise runtime.cli.UserError.

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
import stat
import sys
import tempfile
from typing import Sequence

import numpy as np

from .cli import UserError
from .images import IMAGE_EXTENSIONS, LIST_EXTENSIONS, ImageError, check_image_files, list_images
from .text import tokenize

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


# --------------------------------------------------------------------------- the commands' input files
def open_features(path: str) -> np.ndarray:
    """IMAGES.npy memory-mapped read-only, after checking it is a plain (non-pickled) .npy array."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, expected a .npy file of region features")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if magic[:2] == b"PK":
        raise UserError(f"{path}: is an .npz archive, expected a single .npy array")
    if magic != b"\x93NUMPY":
        raise UserError(f"{path}: not a .npy file (no NumPy header)")
    try:
        feats = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "object" in str(e).lower() or "pickle" in str(e).lower():
            raise UserError(f"{path}: holds pickled Python objects; expected a plain float array") from None
        raise UserError(f"{path}: cannot read as a .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read as a .npy array ({e})") from None
    return feats


def open_images(path: str):
    """IMAGES -> (region features memmap, None) for a .npy, or (picture paths, display names) for a
    folder, a .txt list of paths or a single picture. Every picture's header is checked here,
    before any model is loaded, so a missing or non-picture file is named at once."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    is_list = not os.path.isdir(path) and path.lower().endswith(LIST_EXTENSIONS)
    if not (os.path.isdir(path) or is_list or path.lower().endswith(IMAGE_EXTENSIONS)):
        return open_features(path), None
    try:
        paths = list_images([path])
        if not paths:
            raise UserError(f"{path}: lists no image paths (one a line)")
        check_image_files(paths)
    except FileNotFoundError as e:
        hint = f" ({path}, the first argument, is read as a list of image paths, one a line)" if is_list else ""
        raise UserError(f"{e}{hint}") from None
    except ImageError as e:
        raise UserError(str(e)) from None
    if os.path.isdir(path) or is_list:  # names relative to the folder / the list file's folder
        base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        names = [os.path.relpath(os.path.abspath(p), os.path.abspath(base)).replace(os.sep, "/") for p in paths]
    else:
        names = [os.path.basename(path)]
    return paths, names


STDIN = "-"  # CAPTIONS (runtime.score) or QUERIES (runtime.search) read from standard input


def caption_lines(f, name: str):
    """Yield (line number from 1, caption) of a binary file of captions, one a line: UTF-8 (a BOM
    is allowed), whitespace stripped, at most MAX_WORDS words (tokens) a line (UserError naming
    the line otherwise). Blank lines are yielded as "" (``read_captions`` refuses them)."""
    for number, raw in enumerate(f, 1):
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            caption = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise UserError(f"{name}: line {number} is not UTF-8 text (byte {e.start + 1}: "
                             f"{raw[e.start:e.start + 1]!r})") from None
        words = len(raw.split(maxsplit=MAX_WORDS))  # <= tokens: a cheap bound before tokenising
        # a token is at least one character: a caption of at most MAX_WORDS characters needs no tokenising
        if words > MAX_WORDS or (len(caption) > MAX_WORDS and len(tokenize(caption)) > MAX_WORDS):
            n = f"{len(raw.split())} words" if words > MAX_WORDS else f"{len(tokenize(caption))} words (tokens)"
            raise UserError(f"{name}: line {number} has {n}; captions may have at most {MAX_WORDS} (MAX_WORDS)")
        yield number, caption


def check_caption_lines(lines, name: str) -> int:
    """The number of captions of ``caption_lines`` (consumed); UserError for a file with none or
    with blank lines (all of them named)."""
    n, blank = 0, []
    for n, caption in lines:
        if not caption:
            blank.append(n)
    if n == 0:
        raise UserError(f"{name}: no captions (the {'input' if name == STDIN_NAME else 'file'} is empty)")
    if blank:
        raise UserError(f"{name}: blank line{'s' if len(blank) > 1 else ''} {list_some(blank)} "
                         f"(one caption a line, no blank lines)")
    return n


STDIN_NAME = "standard input"


def open_caption_file(path: str):
    """CAPTIONS (a path, or "-": standard input) -> (binary file at its start, its name for
    messages). Standard input, a pipe or any other file that is not a regular one is copied to a
    temporary file first, so that it can be checked whole and then read again."""
    if path == STDIN:
        return _spooled(sys.stdin.buffer, STDIN_NAME), STDIN_NAME
    try:
        f = open(path, "rb")
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a pipe (<(...)), a FIFO: read once
            with f:
                return _spooled(f, path), path
        return f, path
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a text file of captions") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _spooled(stream, name: str):
    """The rest of a binary stream, copied to an anonymous temporary file (returned at its start)."""
    spool = tempfile.TemporaryFile()
    try:
        while True:
            block = stream.read(1 << 20)
            if not block:
                break
            spool.write(block)
    except (OSError, ValueError) as e:  # closed or unreadable
        spool.close()
        raise UserError(f"{name}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    spool.seek(0)
    return spool


def read_captions(path: str) -> list[str]:
    """CAPTIONS.txt ("-": standard input): UTF-8 (a BOM is allowed), one caption a line, whitespace
    stripped, no blank lines, at most MAX_WORDS words a line (the scorer checks the tokens too)."""
    f, name = open_caption_file(path)
    with f:
        try:
            captions = [caption for _, caption in caption_lines(f, name)]
        except IsADirectoryError:
            raise UserError(f"{path}: is a folder, expected a text file of captions") from None
        except OSError as e:
            raise UserError(f"{name}: cannot read ({e.strerror})") from None
    check_caption_lines(enumerate(captions, 1), name)
    return captions
