"""Search an index folder: a fast first stage over the whole gallery, exact IMRAM re-ranking of a shortlist.

    python -m runtime.search INDEX_DIR QUERIES [--top-k 10] [--shortlist N | --exhaustive] [--json]
                             [--model MODEL_DIR] [--device auto|cpu|cuda] [--threads T] [--quiet]

    from runtime import Index
    index = Index("gallery_index")                       # the model the index was built with
    rows, scores = index.search(["a red dog left of a blue ball"], top_k=10, shortlist=100)
    rows, scores = index.search(captions, top_k=10, exhaustive=True)      # every item, the matcher
    index.ids[rows[0, 0]]                                # the best match's id (file name, row, caption)

QUERIES: for an image index a text file of captions (one a line, as runtime.score reads them);
for a caption index region features (.npy) or pictures (a folder, a .txt list, one file), as
runtime.score's IMAGES. Each query is encoded with the model's own encoders (runtime.engine).

Two stages. 1. First stage: every item of the gallery has one global vector, the mean of its
own region (word) embeddings, l2-normalised, or, when the model dir has a global head
(export.global_head), that head's vector; a query gets the same from its word (region)
embeddings; the ``shortlist`` items of highest cosine are found exactly, with numpy: the
(n_items, d) matrix is read in chunks of CHUNK_BYTES, and a running top-N is kept with
argpartition. 2. Re-ranking: the shortlisted items' embeddings are read from the index
(``read_rows``: file reads, so the process's memory stays that of the shortlist, whatever the
gallery's size), their per-item projections made (runtime.engine), and the matcher
scores them against the query exactly as runtime.score does (``Scorer.score_embeddings``).
``exhaustive=True`` skips stage 1 and scores every item with the matcher: the scores of
runtime.score. Order: score descending, ties by row ascending. The shortlist is at least top_k.

Output: per query its top_k rows (row in the index), ids and scores, best first: text, or with
--json one JSON object a line: {"query": LINE_FROM_0, "matches": [{"row": R, "id": ID, "score": S}, ...]}.
Bad input (see runtime.score; also an index built with another model, a missing or altered
index folder, queries of the wrong kind): one "error: ..." line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Sequence

import numpy as np

from . import cli
from .images import ImageError
from .indexdir import IndexDirError, open_part, read_manifest
from .inputs import image_paths_or_none
from .modeldir import MANIFEST_FILE, ModelDirError
from .scorer import DEVICES, MAX_THREADS, DeviceError, InputError, Scorer

CHUNK_BYTES = 32 << 20  # first stage: global vectors read per chunk
EXHAUSTIVE_ITEMS = 1024  # exhaustive: items scored per call of Scorer.score_embeddings
DEFAULT_TOP_K, DEFAULT_SHORTLIST = 10, 100


def model_manifest_sha256(model_dir: str) -> str:
    """SHA-256 of MODEL_DIR/manifest.json (which lists the SHA-256 of every model file)."""
    path = os.path.join(model_dir, MANIFEST_FILE)
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise ModelDirError(f"{path}: cannot read the model's manifest ({e.strerror})") from None


def global_vectors(embs: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """The first stage's vector of each item: the mean of its embeddings, l2-normalised, float32.
    embs (n, n_vec, d) (zeros past each length), lengths (n,) (None: all n_vec)."""
    embs = np.asarray(embs, dtype=np.float32)
    if lengths is None:
        mean = embs.mean(1)
    else:
        mean = embs.sum(1) / np.asarray(lengths, dtype=np.float32)[:, None]
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-8)


def first_stage_name(scorer) -> str:
    """What the first stage's vectors are, as an index manifest records it."""
    if scorer.has_global_head:
        return f"the model's global head (image_global / text_global), {scorer.global_size} values"
    return "mean of the item's embeddings, l2-normalised"


def best_rows(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (rows, scores): score descending, ties by row ascending."""
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def read_rows(matrix: np.memmap, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Rows starts[i] .. starts[i] + counts[i] - 1 of a memory-mapped .npy, one after another, read
    with preadv (runs of adjacent rows in one read), not through the map: pages a map touches count in
    the process's RSS, and faults on scattered rows brought in ~1 MB each (136 MB for 100 images)."""
    row_bytes = matrix.shape[1] * matrix.itemsize
    out = np.empty((int(counts.sum()), matrix.shape[1]), dtype=matrix.dtype)
    view, pos = memoryview(out).cast("B"), 0
    ends = starts + counts
    breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1  # runs of adjacent items
    with open(matrix.filename, "rb") as f:
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(starts)]):
            size = int(ends[b - 1] - starts[a]) * row_bytes
            if os.preadv(f.fileno(), [view[pos:pos + size]], matrix.offset + int(starts[a]) * row_bytes) != size:
                raise IndexDirError(f"{matrix.filename}: shorter than its header says")
            pos += size
    return out


class TopK:
    """A running exact top-k per query over blocks of scores (Q, c) of consecutive rows."""

    def __init__(self, n_queries: int, k: int):
        self.k = k
        self.rows = [np.zeros(0, np.int64) for _ in range(n_queries)]
        self.scores = [np.zeros(0, np.float32) for _ in range(n_queries)]

    def update(self, block: np.ndarray, first_row: int) -> None:
        """block (Q, c): the scores of rows first_row .. first_row + c - 1."""
        for q, s in enumerate(block):
            if len(s) > self.k:  # argpartition's cut, then every item tied with the k-th kept
                kth = s[np.argpartition(s, len(s) - self.k)[len(s) - self.k]]
                sel = np.flatnonzero(s >= kth)
            else:
                sel = np.arange(len(s))
            self.rows[q], self.scores[q] = best_rows(np.concatenate([self.scores[q], s[sel]]),
                                                     np.concatenate([self.rows[q], first_row + sel]), self.k)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows (Q, k) int64, scores (Q, k) float32), best first."""
        return np.stack(self.rows), np.stack(self.scores).astype(np.float32)


class Index:
    """An index folder (``python -m runtime.index``) searched with the model it was built with.

    model_dir: None for the one recorded in the index (another model is refused: IndexDirError).
    device, threads, image_batch: as runtime.Scorer. Attributes: kind ("images": captions are the
    queries; "captions": images are), dtype, ids (one str per row), scorer (runtime.Scorer),
    manifest, n_region (images per item, image index).
    """

    def __init__(self, index_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 device: str = "auto", threads: int | None = None, image_batch: int | None = None):
        self.index_dir = os.fspath(index_dir)
        self.manifest = m = read_manifest(self.index_dir)
        self.kind, self.dtype, self.n_region = m["kind"], m["dtype"], m.get("n_region")
        model_dir = m["model"]["dir"] if model_dir is None else os.fspath(model_dir)
        check_model(model_dir, m, self.index_dir)
        self.scorer = Scorer(model_dir, device=device, threads=threads,
                             **({} if image_batch is None else {"image_batch": image_batch}))
        d = self.scorer.embed_size
        self.parts = [open_part(self.index_dir, p, d, self.dtype, self.scorer.global_size) for p in m["parts"]]
        if self.kind == "images" and any((np.diff(p["offsets"]) != self.n_region).any() for p in self.parts):
            raise IndexDirError(f"{self.index_dir}: an image item has not {self.n_region} regions (n_region)")
        self.starts = np.cumsum([0] + [len(p["ids"]) for p in self.parts])
        self.ids = [i for p in self.parts for i in p["ids"]]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return f"Index({self.index_dir!r}, {len(self)} {self.kind}, {self.dtype}, {self.scorer!r})"

    # ------------------------------------------------------------------ items
    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of ``rows`` (ascending) as float32 (n, n_vec_max, d), zero-padded, and counts (n,)."""
        flat, counts = [], []
        for k, part in enumerate(self.parts):
            local = rows[(rows >= self.starts[k]) & (rows < self.starts[k + 1])] - self.starts[k]
            if len(local):
                n = np.diff(part["offsets"])[local]
                flat.append(read_rows(part["embs"], part["offsets"][local], n).astype(np.float32, copy=False))
                counts.append(n)
        counts, flat = np.concatenate(counts), np.concatenate(flat)
        if (counts == counts[0]).all():  # images, or captions of one length: no padding
            return flat.reshape(len(counts), int(counts[0]), -1), counts
        out = np.zeros((len(counts), int(counts.max()), flat.shape[1]), dtype=np.float32)
        out[np.arange(counts.max())[None, :] < counts[:, None]] = flat
        return out, counts

    # ------------------------------------------------------------------ queries
    def encode_queries(self, queries) -> dict:
        """Queries -> {"embs": (Q, n_vec, d), "lengths": (Q,) or None, "global": (Q, d)}. Captions (a list
        of str) for an image index; region features (Q, n_region, img_dim) or picture paths for a
        caption index. InputError for queries of the other kind."""
        if self.kind == "images":
            if isinstance(queries, np.ndarray):
                raise InputError("queries: an image index is searched with captions (a list of strings)")
            embs, lengths = self.scorer.encode_captions(queries)
            return {"embs": embs, "lengths": lengths, "global": self.scorer.global_vectors(embs, lengths)}
        paths = None if isinstance(queries, np.ndarray) else image_paths_or_none(queries)
        if paths is not None and not all(isinstance(p, os.PathLike) or os.path.exists(p) for p in paths):
            raise InputError("queries: a caption index is searched with images (region features or picture "
                             f"files); {paths[0]!r} is not a file")
        embs = self.scorer.encode_image_files(paths) if paths is not None else self.scorer.encode_images(queries)
        return {"embs": embs, "lengths": None, "global": self.scorer.global_vectors(embs)}

    def score_items(self, query: dict, q: slice, items: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Matcher scores (n_queries, n_items) of the queries ``q`` against gathered items."""
        if self.kind == "images":
            lens = query["lengths"][q]
            return self.scorer.score_embeddings(items, query["embs"][q, :int(lens.max())], lens).T
        return self.scorer.score_embeddings(query["embs"][q], items, counts)

    def first_stage(self, global_: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n rows of highest cosine per query: (rows, cosines), each (Q, n), exact. Each part's
        (n_items, d) matrix is read in chunks of CHUNK_BYTES into one buffer (file reads, not the
        memory map: the pages a map touches would count in the process's RSS, 410 MB at 100K x d = 1024)."""
        top, queries_t = TopK(len(global_), n), np.ascontiguousarray(global_.T, dtype=np.float32)
        d = queries_t.shape[0]
        buf = np.empty((max(1, CHUNK_BYTES // (4 * d)), d), dtype=np.float32)
        for k, part in enumerate(self.parts):
            matrix = part["global"]
            with open(matrix.filename, "rb") as f:
                f.seek(matrix.offset)
                for i in range(0, len(matrix), len(buf)):
                    chunk = buf[:min(len(buf), len(matrix) - i)]
                    if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                        raise IndexDirError(f"{matrix.filename}: shorter than its header says")
                    top.update((chunk @ queries_t).T, int(self.starts[k]) + i)
        return top.result()

    def search(self, queries, top_k: int = DEFAULT_TOP_K, shortlist: int = DEFAULT_SHORTLIST,
               exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(rows (Q, k) int64, scores (Q, k) float32), best first, k = min(top_k, len(self)).
        shortlist: items the matcher re-ranks per query (at least top_k); exhaustive: all of them."""
        top_k, shortlist = check_positive(top_k, "top_k"), check_positive(shortlist, "shortlist")
        query = self.encode_queries(queries)
        n_q, k = len(query["embs"]), min(top_k, len(self))
        if exhaustive:
            top = TopK(n_q, k)
            for first in range(0, len(self), EXHAUSTIVE_ITEMS):
                rows = np.arange(first, min(first + EXHAUSTIVE_ITEMS, len(self)))
                top.update(self.score_items(query, slice(None), *self.gather(rows)), first)
            return top.result()
        candidates, _ = self.first_stage(query["global"], min(max(shortlist, k), len(self)))
        rows, scores = np.zeros((n_q, k), np.int64), np.zeros((n_q, k), np.float32)
        for q in range(n_q):
            cand = np.sort(candidates[q])
            rows[q], scores[q] = best_rows(self.score_items(query, slice(q, q + 1), *self.gather(cand))[0], cand, k)
        return rows, scores


def check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_model(model_dir: str, manifest: dict, index_dir: str) -> None:
    """IndexDirError unless MODEL_DIR is the model the index was built with (its manifest's SHA-256)."""
    recorded = manifest["model"]
    if model_manifest_sha256(model_dir) != recorded["manifest_sha256"]:
        raise IndexDirError(
            f"{model_dir}: not the model {index_dir} was built with (the index records model manifest "
            f"SHA-256 {recorded['manifest_sha256'][:12]}..., from {recorded['dir']}); search with that model "
            f"or rebuild the index")


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m runtime.search",
                           description="Search an index folder (python -m runtime.index): a first stage over "
                                       "the whole gallery, exact IMRAM re-ranking of a shortlist.")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("queries", metavar="QUERIES",
                   help="image index: a text file of captions, one a line; caption index: region features "
                        "(.npy) or pictures (a folder, a .txt list, one picture)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K", help="matches per query (default: 10)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--shortlist", type=int, default=DEFAULT_SHORTLIST, metavar="N",
                     help="items the matcher re-ranks per query, at least K (default: %(default)s)")
    how.add_argument("--exhaustive", action="store_true", help="score every item with the matcher")
    p.add_argument("--json", action="store_true", help='one JSON object a query: {"query", "matches"}')
    p.add_argument("--model", metavar="MODEL_DIR", help="default: the model the index was built with")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threads", type=int, default=None, metavar="T", help=f"1..{MAX_THREADS}")
    p.add_argument("--quiet", action="store_true", help="no summary line on stderr")
    args = p.parse_args(argv)
    for flag, value in (("--top-k", args.top_k), ("--shortlist", args.shortlist)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        p.error(f"--threads must be in 1..{MAX_THREADS}, got {args.threads}")
    return args


def read_queries(path: str, kind: str):
    """(queries, their display texts) from QUERIES for an index of ``kind``."""
    from .score import open_images, read_captions
    if kind == "images":
        if path.lower().endswith(".npy"):
            raise cli.UserError(f"{path}: an image index is searched with captions (a text file, one a line)")
        captions = read_captions(path)
        return captions, captions
    feats, names = open_images(path)
    if names is None:
        return feats, [f"{os.path.basename(path)}:{i}" for i in range(len(feats))]
    return feats, names


def _main(argv: Sequence[str] | None) -> None:
    from .score import json_line
    args = parse_args(argv)
    manifest = read_manifest(args.index)
    queries, texts = read_queries(args.queries, manifest["kind"])
    index = Index(args.index, args.model, device=args.device, threads=args.threads)
    if not args.quiet:
        how = "exhaustive" if args.exhaustive else f"shortlist {max(args.shortlist, args.top_k)}"
        print(f"{index!r}; {len(texts)} queries, {how}", file=sys.stderr)
    rows, scores = index.search(queries, args.top_k, args.shortlist, args.exhaustive)
    out = sys.stdout
    for q, (r, s) in enumerate(zip(rows, scores)):
        if args.json:
            out.write(json_line({"query": q, "matches": [{"row": int(i), "id": index.ids[i], "score": float(v)}
                                                         for i, v in zip(r, s)]}))
        else:
            out.write(f"query {q}: {cli.printable(texts[q])}\n")
            out.writelines(f"  {n}. row {i} ({v:.6f}) {cli.printable(index.ids[i])}\n"
                           for n, (i, v) in enumerate(zip(r, s), 1))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv, user_errors=(InputError, ModelDirError, DeviceError, ImageError, IndexDirError))


if __name__ == "__main__":
    sys.exit(main())
