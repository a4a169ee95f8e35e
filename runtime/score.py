"""Score every image against every caption with an exported model, and show the best matches.

    python -m runtime.score IMAGES CAPTIONS.txt|- [--model MODEL_DIR] [--output SIMS.npy]
                            [--top-k K] [--json] [--html PAGE.html] [--overwrite]
                            [--device auto|cpu|cuda] [--shard N] [--image-batch N]

IMAGES, always the first argument, is one of:
  * FEATURES.npy: region features (n_img, n_region, img_dim), any float dtype, memory-mapped (a
    gallery larger than RAM streams from disk);
  * a folder of pictures (searched recursively, sorted; runtime.images.IMAGE_EXTENSIONS);
  * a .txt file of picture paths, one a line (relative to the file's folder; '#' lines skipped)
    -- a .txt in first position is always a list of pictures, the captions come second;
  * a single picture file.
Pictures need a model dir exported with ``--feature-extractor``: they are decoded with Pillow and
preprocessed with numpy (runtime.images) exactly as ``imram_min.data.features`` did for training, a
batch (--image-batch) at a time, and turned into region features by feature_extractor.onnx.
CAPTIONS.txt: UTF-8, one caption a line, no blank lines, at most MAX_WORDS (256) words (tokens) a
line ("-": read from standard input). Words the model's vocabulary lacks are read as <unk>, exactly
as in training, and named once scored: one "note: caption J (...): the model's vocabulary lacks
..." line on stderr per such caption ("unknown_words" in its JSON line). MODEL_DIR: written by
``python -m export`` (default DEFAULT_MODEL_DIR).

Writes the (n_img, n_cap) float32 similarity matrix to --output (a .npy, written to a temporary
file next to it and renamed into place, so a reader never sees half of it; the temporary file is
allocated in full before scoring starts, so a full disk is one error line up front, and it is
removed on every exit path, Ctrl-C and SIGTERM included; an existing file is replaced only with
--overwrite, refused up front otherwise), and prints for each
image its top-K captions, then for each caption its top-K images: text, or one JSON object a
line with --json ({"image": i, "top": [{"caption": j, "score": s, "text": ...}, ...]} then
{"caption": j, "text": ..., "top": [{"image": i, "score": s}, ...]}). For pictures each image
is also shown by its file name (path relative to the folder or list file; "file" in JSON).
--html PAGE.html writes the same top-K as one self-contained web page (runtime.html): each
caption with its best pictures (thumbnails inlined), then each picture with its best captions;
atomically, and over an existing page only with --overwrite.
Rank order: score descending, ties by index ascending. Control characters of captions and file
names are printed escaped (a caption cannot drive the terminal); JSON lines are exact JSON. The
device and a progress bar go to stderr.

Bad input (missing or unreadable file, not a plain float .npy of the right shape, NaN/Inf or
features over MAX_FEATURE in magnitude, a folder without pictures, a file that is not a picture or
has more than runtime.images.MAX_PIXELS pixels, empty / non-UTF-8 / blank-line / over-long
captions, an altered model dir or one without feature_extractor.onnx for pictures, an --output
that is one of the inputs or cannot be written, an --output or --html that exists (without
--overwrite), a full disk, a flag out of range (--threads 1..MAX_THREADS, --shard 1..MAX_SHARD,
--image-batch 1..MAX_IMAGE_BATCH), an unavailable device, scores that come out NaN or Inf): one
"error: ..." line on stderr, exit status 2, no file written or changed. The bad-input specification is tests/test_bad_inputs_runtime.py.

numpy, onnxruntime, Pillow and the standard library only: no torch, no nltk (runtime.text owns the tokeniser).
"""
from __future__ import annotations

import argparse
import errno
import io
import os
import sys
import tempfile

import numpy as np

import onnxruntime as ort

from . import cli
from .atomic import FILE_MODE
from .cli import Progress, UserError, json_line, note_unknown_words, printable
from .engine import CUDA, DEVICES, IMAGE_BATCH, MAX_IMAGE_BATCH, MAX_SHARD, MAX_THREADS, DeviceError
from .images import ImageError
from .inputs import STDIN, InputError, check_region_feats, open_images, read_captions
from .modeldir import DEFAULT_MODEL_DIR, ModelDirError
from .scorer import Scorer

DEFAULT_TOP_K = 5
RANK_ROWS = 1024  # sims rows read at a time when ranking (the matrix may be a memmap)


def check_output(path: str, inputs=(), overwrite: bool = False) -> None:
    """Fail now, before any scoring, if ``path`` is (or links to) one of ``inputs``, cannot be written,
    or already exists and ``overwrite`` is False (cli.refuse_replacing)."""
    cli.check_output_file(path, inputs, overwrite=overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UserError(f"--output {path}: cannot write in {folder} ({e.strerror})") from None


def allocate_npy(path: str, shape: tuple[int, int]) -> tuple[str, np.ndarray]:
    """(temporary file next to ``path``, a float32 memmap of ``shape`` in it): a .npy whose every
    block is allocated now (os.posix_fallocate, or zeros written where that is missing), so
    filling the memmap cannot hit a full disk (SIGBUS) later. A full disk is a UserError now."""
    folder = os.path.dirname(os.path.abspath(path))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    header = header.getvalue()
    size = len(header) + 4 * shape[0] * shape[1]
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        try:
            os.write(fd, header)
            try:
                os.posix_fallocate(fd, 0, size)
            except (AttributeError, OSError) as e:  # no fallocate here: write the zeros
                if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                zeros = bytes(1 << 20)
                for start in range(len(header), size, len(zeros)):
                    os.write(fd, zeros[:size - start])
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise UserError(f"--output {path}: no space left for its {size:,} bytes "
                                 f"({e.strerror}); nothing was written") from None
            raise
        finally:
            os.close(fd)
        return tmp, np.memmap(tmp, dtype=np.float32, mode="r+", offset=len(header), shape=shape)
    except BaseException:
        os.remove(tmp)
        raise


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
                   names: list[str] | None = None, unknown: dict[int, list[str]] | None = None) -> None:
    """Top-k captions of each image, then top-k images of each caption, to ``out`` (stdout).
    ``names``: a file name per image, shown beside its index ("file" in JSON). ``unknown``: {caption:
    its words the vocabulary lacks} ("unknown_words" in that caption's JSON line, when it has any)."""
    out = out or sys.stdout
    unknown = unknown or {}
    if k <= 0:
        return

    def file(i: int) -> dict:
        return {"file": names[i]} if names is not None else {}

    def label(i: int) -> str:
        return f"image {i} {printable(names[i])}" if names is not None else f"image {i}"

    for i, idx, scores in top_k_captions(sims, k):
        if as_json:
            top = [{"caption": int(j), "score": float(s), "text": captions[j]} for j, s in zip(idx, scores)]
            out.write(json_line({"image": i, **file(i), "top": top}))
        else:
            out.write(f"{label(i)}: top {len(idx)} captions\n")
            out.writelines(f"  {r}. caption {j} ({s:.6f}): {printable(captions[j])}\n"
                           for r, (j, s) in enumerate(zip(idx, scores), 1))
    img_idx, img_scores = top_k_images(sims, k)
    for j, (idx, scores) in enumerate(zip(img_idx, img_scores)):
        if as_json:
            top = [{"image": int(i), **file(i), "score": float(s)} for i, s in zip(idx, scores)]
            extra = {"unknown_words": unknown[j]} if j in unknown else {}
            out.write(json_line({"caption": j, "text": captions[j], "top": top, **extra}))
        else:
            out.write(f"caption {j}: {printable(captions[j])}\n")
            out.writelines(f"  {r}. {label(i)} ({s:.6f})\n" for r, (i, s) in enumerate(zip(idx, scores), 1))


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m runtime.score",
                                description="Score images (region features or picture files) against captions "
                                            "with an exported IMRAM model (ONNX Runtime, no torch).")
    p.add_argument("images", metavar="IMAGES",
                   help="region features (.npy, (n_img, n_region, img_dim) float), or pictures: a folder, a .txt "
                        "file of picture paths (one a line), or one picture file; pictures need a model exported "
                        "with --feature-extractor")
    p.add_argument("captions", metavar="CAPTIONS.txt", help="UTF-8 text, one caption a line; - reads them from "
                                                            "standard input")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, metavar="MODEL_DIR",
                   help="folder written by python -m export (default: %(default)s)")
    p.add_argument("--output", metavar="SIMS.npy", help="write the (n_img, n_cap) float32 similarities here")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                   help="matches to print per image and per caption; 0 prints none (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print rankings as JSON lines")
    p.add_argument("--html", metavar="PAGE.html",
                   help="also write the top-K as one self-contained web page: each caption with its best "
                        "pictures (thumbnails inlined), each picture with its best captions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file or --html page")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: CUDA when onnxruntime offers it, else CPU (default: %(default)s)")
    p.add_argument("--shard", type=int, default=None, metavar="N",
                   help=f"images and captions per shard, 1..{MAX_SHARD} (default: from a memory budget)")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help=f"ONNX Runtime intra-op threads, and on the CPU the matcher calls run side by side, "
                        f"1..{MAX_THREADS} (default: ONNX Runtime's / the CPUs this process may use)")
    p.add_argument("--image-batch", type=int, default=IMAGE_BATCH, metavar="N",
                   help=f"pictures decoded and run through the feature extractor at a time, 1..{MAX_IMAGE_BATCH} "
                        f"(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no device line and no progress bar")
    args = p.parse_args(argv)
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.html is not None and args.top_k == 0:
        p.error("--html shows the top-K: give --top-k 1 or more")
    for flag, value, high in (("--shard", args.shard, MAX_SHARD), ("--threads", args.threads, MAX_THREADS),
                              ("--image-batch", args.image_batch, MAX_IMAGE_BATCH)):
        if value is not None and not 1 <= value <= high:
            p.error(f"{flag} must be in 1..{high}, got {value}")
    return args


def model_files(model_dir: str) -> list[str]:
    """The files in MODEL_DIR (an --output must not be one of them)."""
    try:
        return [os.path.join(model_dir, f) for f in os.listdir(model_dir)]
    except OSError:
        return []


def run(args: argparse.Namespace) -> np.ndarray:
    """Check everything, then score, write and print. Raises UserError (and its kin) on bad input."""
    feats, names = open_images(args.images)  # names: None for a .npy of features
    inputs = [args.images, *(feats if names is not None else ()), *model_files(args.model),
              *([args.captions] if args.captions != STDIN else [])]
    if args.output:
        check_output(args.output, inputs, overwrite=args.overwrite)
    if args.html:
        cli.check_output_file(args.html, inputs, flag="--html", overwrite=args.overwrite)
        if args.output:
            cli.check_outputs_distinct([("--output", args.output), ("--html", args.html)])
    captions = read_captions(args.captions)
    scorer = Scorer(args.model, device=args.device, shard=args.shard, threads=args.threads,
                    image_batch=args.image_batch)
    if names is None:
        feats = check_region_feats(feats, scorer.img_dim, name=args.images)
        what = f"{feats.shape[0]} images"
    else:
        scorer.require_feature_extractor()
        what = f"{len(feats)} pictures ({scorer.feature_size} px, grid {scorer.feature_grid})"
    n_img, n_cap = len(feats), len(captions)
    tmp = None
    try:
        if args.output:  # fill a preallocated .npy next to the target, rename it into place when complete
            tmp, sims = allocate_npy(args.output, (n_img, n_cap))
        else:
            sims = np.empty((n_img, n_cap), dtype=np.float32)
        show_device(args, scorer, what, len(captions))
        unknown = scorer.unknown_words(captions)  # said once scored (a failed run prints its error line only)
        progress = Progress("scoring", enabled=not args.quiet)
        scorer.score(feats, captions, out=sims, progress=progress, check=False, captions_name=args.captions)
        progress.close()
        if tmp is not None:
            sims.flush()
            del sims
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, args.output)
            tmp = None
            sims = np.load(args.output, mmap_mode="r")
    finally:  # on every exit path: an error, Ctrl-C, SIGTERM (runtime.cli makes it unwind)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    note_unknown_words(unknown, captions, "caption")
    if args.html:
        write_html(args, sims, captions, feats if names is not None else None, names, unknown)
    print_rankings(sims, captions, args.top_k, args.json, names=names, unknown=unknown)
    return sims


def write_html(args: argparse.Namespace, sims: np.ndarray, captions: list[str], paths: list[str] | None,
               names: list[str] | None, unknown: dict[int, list[str]]) -> None:
    """--html: each caption with its top-K images, then each image with its top-K captions
    (runtime.html), written atomically."""
    from .atomic import atomic_open
    from .html import Match, ResultsPage

    def label(i: int) -> str:
        return names[i] if names is not None else f"image {i}"

    def picture(i: int) -> str | None:
        return paths[i] if paths is not None else None

    with atomic_open(args.html, "w") as f:
        page = ResultsPage(f, f"runtime.score: {args.images} x {args.captions}",
                           [f"model {args.model}; {sims.shape[0]} images x {sims.shape[1]} captions; top {args.top_k}"],
                           None if paths is not None else "The images are region features, not pictures: "
                                                          "shown by row and score only.")
        page.heading("Captions, each with its best images")
        img_idx, img_scores = top_k_images(sims, args.top_k)
        for j, (idx, scores) in enumerate(zip(img_idx, img_scores)):
            notes = [f"the model's vocabulary lacks {', '.join(unknown[j])} (read as <unk>)"] if j in unknown else []
            page.caption_query(j, captions[j], [Match(label(i), float(s), picture(i)) for i, s in zip(idx, scores)],
                               notes)
        page.heading("Images, each with its best captions")
        for i, idx, scores in top_k_captions(sims, args.top_k):
            page.picture_query(i, label(i), picture(i), [Match(captions[j], float(s)) for j, s in zip(idx, scores)])
        page.close()


def show_device(args: argparse.Namespace, scorer: Scorer, what: str, n_cap: int) -> None:
    """The device line on stderr (unless --quiet), once every check has passed."""
    if not args.quiet:
        why = ""
        if args.device == "auto" and scorer.provider != CUDA:
            why = f"; onnxruntime offers no {CUDA}" if CUDA not in ort.get_available_providers() \
                else f"; {CUDA} failed to start"
        print(f"device: {scorer.device} ({scorer.provider}{why}); {what} x {n_cap} captions, "
              f"model {printable(args.model)} (mode={scorer.mode}, K={scorer.n_steps})", file=sys.stderr)


def _main(argv: list[str] | None) -> None:
    ort.set_default_logger_severity(4)  # nothing from ONNX Runtime on stderr: failures are raised
    run(parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, user_errors=(InputError, ModelDirError, DeviceError, ImageError))


if __name__ == "__main__":
    sys.exit(main())
