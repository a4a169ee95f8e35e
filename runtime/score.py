"""Score every image against every caption with an exported model, and show the best matches.

    python -m runtime.score IMAGES CAPTIONS.txt [--model MODEL_DIR] [--output SIMS.npy]
                            [--top-k K] [--json] [--device auto|cpu|cuda] [--shard N] [--image-batch N]

IMAGES, always the first argument, is one of:
  * FEATURES.npy: region features (n_img, n_region, img_dim), any float dtype, memory-mapped (a
    gallery larger than RAM streams from disk);
  * a folder of pictures (searched recursively, sorted; runtime.images.IMAGE_EXTENSIONS);
  * a .txt file of picture paths, one a line (relative to the file's folder; '#' lines skipped)
    -- a .txt in first position is always a list of pictures, the captions come second;
  * a single picture file.
Pictures need a model dir exported with ``--feature-extractor``: they are decoded with Pillow and
preprocessed with numpy (runtime.images) exactly as ``imram_min.features`` did for training, a
batch (--image-batch) at a time, and turned into region features by feature_extractor.onnx.
CAPTIONS.txt: UTF-8, one caption a line, no blank lines. MODEL_DIR: written by
``python -m export`` (default DEFAULT_MODEL_DIR).

Writes the (n_img, n_cap) float32 similarity matrix to --output (a .npy, written to a temporary
file next to it and renamed into place, so a reader never sees half of it), and prints for each
image its top-K captions, then for each caption its top-K images: text, or one JSON object a
line with --json ({"image": i, "top": [{"caption": j, "score": s, "text": ...}, ...]} then
{"caption": j, "text": ..., "top": [{"image": i, "score": s}, ...]}). For pictures each image
is also shown by its file name (path relative to the folder or list file; "file" in JSON).
Rank order: score descending, ties by index ascending. The device and a progress bar go to stderr.

Bad input (missing or unreadable file, not a plain float .npy of the right shape, NaN/Inf, a
folder without pictures, a file that is not a picture, empty / non-UTF-8 / blank-line captions,
an altered model dir or one without feature_extractor.onnx for pictures, an unwritable --output,
an unavailable device): one "error: ..." line on stderr, exit status 2, nothing written.

numpy, onnxruntime, Pillow, the standard library and nltk only: no torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import onnxruntime as ort

from .atomic import FILE_MODE
from .images import IMAGE_EXTENSIONS, LIST_EXTENSIONS, ImageError, check_image_files, list_images
from .scorer import (CUDA, DEFAULT_MODEL_DIR, DEVICES, IMAGE_BATCH, DeviceError, InputError, ModelDirError, Scorer,
                     check_region_feats, list_some)

DEFAULT_TOP_K = 5
RANK_ROWS = 1024  # sims rows read at a time when ranking (the matrix may be a memmap)


class UsageError(ValueError):
    """Anything the user can fix: reported as one 'error: ...' line, exit status 2."""


# --------------------------------------------------------------------------- inputs
def open_features(path: str) -> np.ndarray:
    """IMAGES.npy memory-mapped read-only, after checking it is a plain (non-pickled) .npy array."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder, expected a .npy file of region features")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if magic[:2] == b"PK":
        raise UsageError(f"{path}: is an .npz archive, expected a single .npy array")
    if magic != b"\x93NUMPY":
        raise UsageError(f"{path}: not a .npy file (no NumPy header)")
    try:
        feats = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "object" in str(e).lower() or "pickle" in str(e).lower():
            raise UsageError(f"{path}: holds pickled Python objects; expected a plain float array") from None
        raise UsageError(f"{path}: cannot read as a .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise UsageError(f"{path}: cannot read as a .npy array ({e})") from None
    return feats


def open_images(path: str):
    """IMAGES -> (region features memmap, None) for a .npy, or (picture paths, display names) for a
    folder, a .txt list of paths or a single picture. Every picture's header is checked here,
    before any model is loaded, so a missing or non-picture file is named at once."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or folder")
    is_list = not os.path.isdir(path) and path.lower().endswith(LIST_EXTENSIONS)
    if not (os.path.isdir(path) or is_list or path.lower().endswith(IMAGE_EXTENSIONS)):
        return open_features(path), None
    try:
        paths = list_images([path])
        if not paths:
            raise UsageError(f"{path}: lists no image paths (one a line)")
        check_image_files(paths)
    except FileNotFoundError as e:
        hint = f" ({path}, the first argument, is read as a list of image paths, one a line)" if is_list else ""
        raise UsageError(f"{e}{hint}") from None
    except ImageError as e:
        raise UsageError(str(e)) from None
    if os.path.isdir(path) or is_list:  # names relative to the folder / the list file's folder
        base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        names = [os.path.relpath(os.path.abspath(p), os.path.abspath(base)).replace(os.sep, "/") for p in paths]
    else:
        names = [os.path.basename(path)]
    return paths, names


def read_captions(path: str) -> list[str]:
    """CAPTIONS.txt: UTF-8 (a BOM is allowed), one caption a line, whitespace stripped, no blank lines."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, expected a text file of captions") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the final newline ends the last line, it does not start a blank one
    if not lines:
        raise UsageError(f"{path}: no captions (the file is empty)")
    captions = []
    for number, raw in enumerate(lines, 1):
        try:
            captions.append(raw.decode("utf-8").strip())
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: line {number} is not UTF-8 text (byte {e.start + 1}: "
                             f"{raw[e.start:e.start + 1]!r})") from None
    blank = [n for n, c in enumerate(captions, 1) if not c]
    if blank:
        raise UsageError(f"{path}: blank line{'s' if len(blank) > 1 else ''} {list_some(blank)} "
                         f"(one caption a line, no blank lines)")
    return captions


def check_output(path: str) -> None:
    """Fail now, before any scoring, if ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--output {path}: is a folder")
    if not os.path.isdir(folder):
        raise UsageError(f"--output {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UsageError(f"--output {path}: cannot write in {folder} ({e.strerror})") from None


# --------------------------------------------------------------------------- progress
class Progress:
    """A small tqdm-like bar on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, desc: str, stream=None, enabled: bool = True):
        self.desc, self.stream, self.enabled = desc, stream or sys.stderr, enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last = time.perf_counter()
        self.done, self.total, self.drawn = 0, 0, False

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        now = time.perf_counter()
        if self.enabled and (now - self.last >= (0.1 if self.tty else 10.0) or done == total):
            self.last = now
            self._draw(end="\n" if done == total or not self.tty else "")

    def _draw(self, end: str) -> None:
        elapsed = time.perf_counter() - self.start
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + " " * (20 - int(20 * frac))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.desc}: {100 * frac:3.0f}%|{bar}| {self.done}/{self.total} blocks "
                f"[{_clock(elapsed)}<{_clock(left)}, {rate:.1f} blocks/s]")
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()
        self.drawn = end == ""

    def close(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


# --------------------------------------------------------------------------- rankings
def top_k_captions(sims: np.ndarray, k: int):
    """Yield (image index, caption indices (k,), scores (k,)) per image: best first, ties by lower index."""
    k = min(k, sims.shape[1])
    for i in range(0, sims.shape[0], RANK_ROWS):
        block = np.asarray(sims[i:i + RANK_ROWS])
        order = np.argsort(-block, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(block, order, 1)
        for r in range(block.shape[0]):
            yield i + r, order[r], scores[r]


def top_k_images(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(image indices (n_cap, k), scores (n_cap, k)) per caption: best first, ties by lower index.

    Reads ``sims`` a block of rows at a time, keeping a running top-k per caption."""
    k = min(k, sims.shape[0])
    best_idx = np.zeros((0, sims.shape[1]), dtype=np.int64)
    best = np.zeros((0, sims.shape[1]), dtype=np.float32)
    for i in range(0, sims.shape[0], RANK_ROWS):
        block = np.asarray(sims[i:i + RANK_ROWS])
        idx = np.concatenate([best_idx, np.broadcast_to(np.arange(i, i + block.shape[0])[:, None], block.shape)])
        val = np.concatenate([best, block])
        order = np.argsort(-val, axis=0, kind="stable")[:k]  # earlier rows (lower indices) win ties
        best_idx, best = np.take_along_axis(idx, order, 0), np.take_along_axis(val, order, 0)
    return best_idx.T, best.T


def print_rankings(sims: np.ndarray, captions: list[str], k: int, as_json: bool, out=None,
                   names: list[str] | None = None) -> None:
    """Top-k captions of each image, then top-k images of each caption, to ``out`` (stdout).
    ``names``: a file name per image, shown beside its index ("file" in JSON)."""
    out = out or sys.stdout
    if k <= 0:
        return

    def file(i: int) -> dict:
        return {"file": names[i]} if names is not None else {}

    def label(i: int) -> str:
        return f"image {i} {names[i]}" if names is not None else f"image {i}"

    for i, idx, scores in top_k_captions(sims, k):
        if as_json:
            top = [{"caption": int(j), "score": float(s), "text": captions[j]} for j, s in zip(idx, scores)]
            out.write(json.dumps({"image": i, **file(i), "top": top}, ensure_ascii=False) + "\n")
        else:
            out.write(f"{label(i)}: top {len(idx)} captions\n")
            out.writelines(f"  {r}. caption {j} ({s:.6f}): {captions[j]}\n" for r, (j, s) in enumerate(zip(idx, scores), 1))
    img_idx, img_scores = top_k_images(sims, k)
    for j, (idx, scores) in enumerate(zip(img_idx, img_scores)):
        if as_json:
            top = [{"image": int(i), **file(i), "score": float(s)} for i, s in zip(idx, scores)]
            out.write(json.dumps({"caption": j, "text": captions[j], "top": top}, ensure_ascii=False) + "\n")
        else:
            out.write(f"caption {j}: {captions[j]}\n")
            out.writelines(f"  {r}. {label(i)} ({s:.6f})\n" for r, (i, s) in enumerate(zip(idx, scores), 1))


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.score",
                                description="Score images (region features or picture files) against captions "
                                            "with an exported IMRAM model (ONNX Runtime, no torch).")
    p.add_argument("images", metavar="IMAGES",
                   help="region features (.npy, (n_img, n_region, img_dim) float), or pictures: a folder, a .txt "
                        "file of picture paths (one a line), or one picture file; pictures need a model exported "
                        "with --feature-extractor")
    p.add_argument("captions", metavar="CAPTIONS.txt", help="UTF-8 text, one caption a line")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, metavar="MODEL_DIR",
                   help="folder written by python -m export (default: %(default)s)")
    p.add_argument("--output", metavar="SIMS.npy", help="write the (n_img, n_cap) float32 similarities here")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                   help="matches to print per image and per caption; 0 prints none (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print rankings as JSON lines")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: CUDA when onnxruntime offers it, else CPU (default: %(default)s)")
    p.add_argument("--shard", type=int, default=None, metavar="N",
                   help="images and captions per shard (default: from a memory budget)")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="ONNX Runtime intra-op threads, and on the CPU the matcher calls run side by side "
                        "(default: ONNX Runtime's / the CPUs this process may use)")
    p.add_argument("--image-batch", type=int, default=IMAGE_BATCH, metavar="N",
                   help="pictures decoded and run through the feature extractor at a time (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no device line and no progress bar")
    args = p.parse_args(argv)
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.shard is not None and args.shard < 1:
        p.error(f"--shard must be >= 1, got {args.shard}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.image_batch < 1:
        p.error(f"--image-batch must be >= 1, got {args.image_batch}")
    return args


def run(args: argparse.Namespace) -> np.ndarray:
    """Check everything, then score, write and print. Raises UsageError (and its kin) on bad input."""
    feats, names = open_images(args.images)  # names: None for a .npy of features
    captions = read_captions(args.captions)
    if args.output:
        check_output(args.output)
    scorer = Scorer(args.model, device=args.device, shard=args.shard, threads=args.threads,
                    image_batch=args.image_batch)
    if names is None:
        feats = check_region_feats(feats, scorer.img_dim, name=args.images)
        what = f"{feats.shape[0]} images"
    else:
        scorer.require_feature_extractor()
        what = f"{len(feats)} pictures ({scorer.feature_size} px, grid {scorer.feature_grid})"
    if not args.quiet:
        why = ""
        if args.device == "auto" and scorer.provider != CUDA:
            why = f"; onnxruntime offers no {CUDA}" if CUDA not in ort.get_available_providers() \
                else f"; {CUDA} failed to start"
        print(f"device: {scorer.device} ({scorer.provider}{why}); {what} x {len(captions)} captions, "
              f"model {args.model} (mode={scorer.mode}, K={scorer.n_steps})", file=sys.stderr)
    progress = Progress("scoring", enabled=not args.quiet)
    n_img, n_cap = len(feats), len(captions)
    tmp = None
    try:
        if args.output:  # fill a .npy memmap next to the target, rename it into place when complete
            folder = os.path.dirname(os.path.abspath(args.output))
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(args.output) + ".", suffix=".tmp", dir=folder)
            os.close(fd)
            sims = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_img, n_cap))
        else:
            sims = np.empty((n_img, n_cap), dtype=np.float32)
        scorer.score(feats, captions, out=sims, progress=progress, check=False)
        progress.close()
        if tmp is not None:
            sims.flush()
            del sims
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, args.output)
            tmp = None
            sims = np.load(args.output, mmap_mode="r")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    print_rankings(sims, captions, args.top_k, args.json, names=names)
    return sims


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (UsageError, InputError, ModelDirError, DeviceError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message
        return 2
    except BrokenPipeError:  # e.g. | head
        sys.stderr.close()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
