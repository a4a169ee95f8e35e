"""Search an index folder: a fast first stage over the whole gallery, exact IMRAM re-ranking of a shortlist.

    python -m runtime.search INDEX_DIR QUERIES|-|--query TEXT... [--top-k 10] [--shortlist N | --exhaustive]
                             [--json] [--html PAGE.html [--pictures DIR] [--overwrite]] [--batch 256]
                             [--first-stage exact|faiss [--faiss-params P]]
                             [--model MODEL_DIR] [--device auto|cpu|cuda] [--threads T] [--quiet]

    from runtime import Index
    index = Index("gallery_index")                       # the model the index was built with
    rows, scores = index.search(["a red dog left of a blue ball"], top_k=10, shortlist=100)
    rows, scores = index.search(captions, top_k=10, exhaustive=True)      # every item, the matcher
    index.ids[rows[0, 0]]                                # the best match's id (file name, row, caption)

A serving process calls ``runtime.memory.retain_freed_memory()`` once (as this command does): glibc
then keeps freed blocks for reuse (a d = 1024 query: 445 against 481 ms).

QUERIES: for an image index a text file of captions (one a line, as runtime.score reads them),
"-" for the same on standard input, or instead captions given as --query TEXT (repeatable); for a
caption index region features (.npy) or pictures (a folder, a .txt list, one file), as
runtime.score's IMAGES. Each query is encoded with the model's own encoders (runtime.engine).
Unknown words: every query is answered; a caption's words the model's vocabulary lacks are read
as <unk>, exactly as in training (a caption of only such words too: <start> <unk> ... <end>), and
each such query gets one "note: query Q (...): the model's vocabulary lacks ..." line on stderr.
The command reads, encodes, searches and prints the queries a batch (--batch) at a time (the
first batches smaller: FIRST_BATCH, then twice as many each time), so its memory does not grow
with their number and the first results come at once; the whole input is
checked first (a bad line anywhere is one error line before any result; standard input is copied
to a temporary file for that).

Two stages. 1. First stage: every item of the gallery has one global vector, the mean of its
own region (word) embeddings, l2-normalised, or, when the model dir has a global head
(export.global_head), that head's vector; a query gets the same from its word (region)
embeddings; the ``shortlist`` items of highest cosine are found exactly: the (n_items, d) matrix
is scored in chunks of CHUNK_BYTES (``Engine.matmul``: ONNX Runtime, whose threads do not spin
after the product as numpy's do), and a running top-N is kept with numpy's argpartition (or,
with first_stage="faiss", the approximate FAISS index built with --faiss: runtime.faiss_stage).
2. Re-ranking: the shortlisted items' embeddings are read from the index (``read_rows``: file
reads, so the process's memory stays that of the shortlist, whatever the gallery's size), their
per-item projections read too (an index built with --store-projections) or made
(runtime.engine), and the matcher scores them against the query exactly as
runtime.score does (``Scorer.score_embeddings``).
``exhaustive=True`` skips stage 1 and scores every item with the matcher: the scores of
runtime.score. Order: score descending, ties by row ascending. The shortlist is at least top_k.

Output: per query its top_k rows (row in the index), ids and scores, best first: text, or with
--json one JSON object a line: {"query": Q_FROM_0, "text": CAPTION, "matches": [{"row": R, "id": ID,
"score": S}, ...]} ("file" instead of "text" for picture or features queries; "unknown_words": [...]
added for a caption with words the vocabulary lacks). --html PAGE.html also writes one
self-contained page (runtime.html): each query with its top_k pictures (thumbnails inlined; an
image index's pictures are found under --pictures DIR, the folder it was built from, by default
the current folder) or, for a caption index, the query picture and its captions. The page is
written atomically, and an existing one is replaced only with --overwrite.
Bad input (see runtime.score; also an index built with another model, a missing or altered
index folder, queries of the wrong kind): one "error: ..." line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import mmap
import os
import shlex
import sys
from typing import Sequence

import numpy as np

from . import cli, faiss_stage
from .engine import DEVICES, MAX_THREADS, DeviceError
from .faiss_stage import FaissError
from .images import ImageError
from .indexdir import (IndexDirError, PartMissing, allow_open_files, check_model, model_dir_of, open_part,
                       read_manifest, verify_faiss)
from .inputs import (STDIN, InputError, caption_lines, check_caption_lines, check_captions, check_region_feats,
                     image_paths_or_none, open_caption_file, open_images)
from .memory import retain_freed_memory
from .modeldir import ModelDirError
from .scorer import Scorer

CHUNK_BYTES = 32 << 20  # first stage: global vectors scored per chunk
EXHAUSTIVE_ITEMS = 1024  # exhaustive: items scored per call of Scorer.score_embeddings
DEFAULT_TOP_K, DEFAULT_SHORTLIST = 10, 100
FIRST_STAGES = ("exact", "faiss")  # exact: the numpy scan; faiss: the index's FAISS index (runtime.faiss_stage)


def best_rows(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (rows, scores): score descending, ties by row ascending."""
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def read_rows(matrix: np.memmap, starts: np.ndarray, counts: np.ndarray, file=None) -> np.ndarray:
    """Rows starts[i] .. starts[i] + counts[i] - 1 of a memory-mapped .npy, one after another, read
    with preadv (runs of adjacent rows in one read), not through the map: pages a map touches count in
    the process's RSS, and faults on scattered rows brought in ~1 MB each (136 MB for 100 images).
    file: the .npy's open file (an Index's part keeps its files open: a writer deleting the file
    later changes nothing); None: opened by the map's file name."""
    row_bytes = matrix.shape[1] * matrix.itemsize
    out = np.empty((int(counts.sum()), matrix.shape[1]), dtype=matrix.dtype)
    view, pos = memoryview(out).cast("B"), 0
    ends = starts + counts
    breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1  # runs of adjacent items
    with (open(matrix.filename, "rb") if file is None else contextlib.nullcontext(file)) as f:
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


def exact_top(matrices: list[np.memmap], starts: Sequence[int], queries: np.ndarray, n: int,
              matmul=np.matmul, files: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The n rows of highest inner product per query over memory-mapped (n_k, G) float32 .npy
    matrices whose first rows are rows starts[k]: (rows, scores), each (Q, n), exact.

    Each file is mapped afresh and scored in chunks of CHUNK_BYTES straight from the page cache (no
    copy); after each chunk its pages are unmapped (MADV_DONTNEED; they stay in the page cache), so
    the process's RSS grows by one chunk, not by the matrix (100 MB at 100K x 256). Reading the
    chunks into a buffer instead took 4x as long (26.6 against 6.4 ms at 100K x 256, 226 against
    61 ms at 1M x 256: benchmarks/README.md). matmul(a, b): the product a @ b (``Index`` passes
    ``Engine.matmul``, whose threads do not spin once done). files: each matrix's open file (None:
    opened by the map's file name)."""
    top, queries_t = TopK(len(queries), n), np.ascontiguousarray(queries.T, dtype=np.float32)
    d = queries_t.shape[0]
    rows, page = max(1, CHUNK_BYTES // (4 * d)), mmap.PAGESIZE
    for k, (start, matrix) in enumerate(zip(starts, matrices)):
        with (open(matrix.filename, "rb") if files is None else contextlib.nullcontext(files[k])) as f, \
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if len(m) < matrix.offset + matrix.nbytes:
                raise IndexDirError(f"{matrix.filename}: shorter than its header says")
            for i in range(0, len(matrix), rows):
                k = min(rows, len(matrix) - i)
                chunk = np.frombuffer(m, np.float32, k * d, matrix.offset + 4 * i * d).reshape(k, d)
                top.update(matmul(chunk, queries_t).T, int(start) + i)
                del chunk  # the map closes only without views of it
                if hasattr(m, "madvise"):
                    first = (matrix.offset + 4 * i * d) // page * page
                    m.madvise(mmap.MADV_DONTNEED, first, matrix.offset + 4 * (i + k) * d - first)
    return top.result()


class Index:
    """An index folder (``python -m runtime.index``) searched with the model it was built with.

    model_dir: None for the one recorded in the index (another model is refused: IndexDirError).
    device, threads, image_batch: as runtime.Scorer. first_stage: "exact" (the numpy scan) or
    "faiss" (the index's FAISS index, built with --faiss; faiss_params: its search parameters, None
    for the ones recorded at build). Attributes: kind ("images": captions are the queries;
    "captions": images are), dtype, ids (one str per row), scorer (runtime.Scorer), manifest,
    n_region (images per item, image index), projection_size (P of the stored projections, 0:
    none), faiss (the FAISS index in use, or None), model_dir.

    A snapshot: the Index keeps every part file it uses open (runtime.indexdir), so it answers
    from the index as it was when opened (or last ``reload``ed), whatever writers do meanwhile:
    a rebuild or an append elsewhere changes nothing here until ``reload()``. ``append(items)``
    adds items to the index folder (``runtime.index.build``) and reloads. Neither is to be called
    while another thread searches this Index. Each part file's SHA-256 is checked against the
    manifest the first time a search reads it (runtime.indexdir; once per process).
    """
    OPEN_ATTEMPTS = 4  # a part deleted between reading the manifest and opening it: read the new one

    def __init__(self, index_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 device: str = "auto", threads: int | None = None, image_batch: int | None = None,
                 first_stage: str = "exact", faiss_params: str | None = None):
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"first_stage must be one of {', '.join(FIRST_STAGES)}, got {first_stage!r}")
        if first_stage == "exact" and faiss_params is not None:
            raise FaissError("--faiss-params needs --first-stage faiss")
        self.index_dir = os.fspath(index_dir)
        self._first_stage, self._faiss_params, self._threads = first_stage, faiss_params, threads
        manifest = read_manifest(self.index_dir)
        self.model_dir = model_dir_of(self.index_dir, manifest) if model_dir is None else os.fspath(model_dir)
        check_model(self.model_dir, manifest, self.index_dir)
        self.scorer = Scorer(self.model_dir, device=device, threads=threads,
                             **({} if image_batch is None else {"image_batch": image_batch}))
        self.parts = []
        self._load(manifest)

    # ------------------------------------------------------------------ the snapshot
    def _load(self, manifest: dict) -> None:
        """Open what ``manifest`` lists and make it this Index's snapshot; a file gone meanwhile (a
        writer committed and deleted it): the manifest read again, OPEN_ATTEMPTS times at most. On
        an error the Index keeps its previous snapshot."""
        for attempt in range(self.OPEN_ATTEMPTS):
            try:
                state = self._open(manifest)
                break
            except PartMissing:
                newer = read_manifest(self.index_dir)
                if newer == manifest or attempt == self.OPEN_ATTEMPTS - 1:
                    raise
                manifest = newer
        for name, value in state.items():
            setattr(self, name, value)

    def _open(self, m: dict) -> dict:
        """The attributes of the snapshot manifest ``m`` lists (parts already open are reused: part files
        are never changed, only added and deleted)."""
        check_model(self.model_dir, m, self.index_dir)
        d, projection_size = self.scorer.embed_size, m.get("projection_size", 0)
        if projection_size and projection_size != self.scorer.projection_size:
            raise IndexDirError(f"{self.index_dir}: stores projections of {projection_size} values, the model's "
                                f"matcher takes {self.scorer.projection_size}")
        allow_open_files(3 * len(m["parts"]))
        held = {}  # part name -> (its manifest entry, its open files)
        if self.parts and (self.manifest["dtype"], self.projection_size) == (m["dtype"], projection_size):
            held = {entry["name"]: (entry, part) for entry, part in zip(self.manifest["parts"], self.parts)}
        parts = [held[p["name"]][1] if held.get(p["name"], (None,))[0] == p else
                 open_part(self.index_dir, p, d, m["dtype"], self.scorer.global_size, projection_size, lazy=True)
                 for p in m["parts"]]
        n_region = m.get("n_region")
        if m["kind"] == "images" and any((np.diff(p["offsets"]) != n_region).any() for p in parts):
            raise IndexDirError(f"{self.index_dir}: an image item has not {n_region} regions (n_region)")
        starts = np.cumsum([0] + [len(p["ids"]) for p in parts])
        return {"manifest": m, "kind": m["kind"], "dtype": m["dtype"], "n_region": n_region,
                "projection_size": projection_size, "parts": parts, "starts": starts,
                "ids": [i for p in parts for i in p["ids"]],
                "faiss": self._open_faiss(m, int(starts[-1]))}

    def _open_faiss(self, manifest: dict, n_items: int):
        """The FAISS index of an index built with --faiss, for first_stage "faiss"; None for "exact"."""
        if self._first_stage == "exact":
            return None
        entry = manifest.get("faiss")
        if entry is None:
            raise IndexDirError(f"{self.index_dir}: has no FAISS index (build it with python -m runtime.index "
                                f"... --faiss FACTORY)")
        verify_faiss(self.index_dir, entry)
        index = faiss_stage.read(self.index_dir, entry, n_items, self.scorer.global_size)
        faiss_stage.set_params(index, entry["params"] if self._faiss_params is None else self._faiss_params)
        if self._threads:
            faiss_stage.import_faiss().omp_set_num_threads(int(self._threads))
        return index

    def reload(self) -> bool:
        """Answer from the index folder as it is now (after a rebuild or appends by any process);
        False when nothing changed. Parts still listed stay open (not read or hashed again); on an
        error (IndexDirError) the previous snapshot stays."""
        manifest = read_manifest(self.index_dir)
        if manifest == self.manifest:
            return False
        self._load(manifest)
        return True

    def append(self, items, ids: Sequence[str] | None = None, skip_existing: bool = False, wait: float = 0.0,
               name: str = "items", progress=None, note=None) -> int:
        """Add ``items`` to the index folder (as ``python -m runtime.index ... --append``: a new part,
        encoded with this Index's scorer) and reload; returns how many were added. items: region
        features (n, n_region, img_dim) or picture paths for an image index, captions for a caption
        index; ids: one str per item (default: the picture path, "row I", the caption). An id already
        in the index: IndexDirError, or with ``skip_existing`` the item is left out (note(text) says
        how many). wait: seconds to wait for another writer (runtime.indexdir.writer_lock)."""
        from .index import build
        report = {}
        build(self.index_dir, items, self.model_dir, captions=self.kind == "captions", append=True, ids=ids,
              name=name, skip_existing=skip_existing, wait=wait, progress=progress, note=note, scorer=self.scorer,
              report=report)
        self.reload()
        return report["added"]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return f"Index({self.index_dir!r}, {len(self)} {self.kind}, {self.dtype}, {self.scorer!r})"

    # ------------------------------------------------------------------ items
    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Embeddings of ``rows`` (ascending) (n, n_vec_max, d), zero-padded, counts (n,), and their
        stored projections (n, n_vec_max, P) (None where the index stores none), in the index's dtype:
        a float16 index's are made float32 by each matcher call for its own items, on the matcher's
        threads (``Engine.float32``)."""
        arrays = ("embs", "proj") if self.projection_size else ("embs",)
        flat, counts = {a: [] for a in arrays}, []
        for k, part in enumerate(self.parts):
            local = rows[(rows >= self.starts[k]) & (rows < self.starts[k + 1])] - self.starts[k]
            if len(local):
                n = np.diff(part["offsets"])[local]
                for a in arrays:  # the SHA-256 of the blocks read, the first time (runtime.indexdir)
                    part.check_rows(f"{a}.npy", part["offsets"][local], n)
                for a in arrays:
                    flat[a].append(read_rows(part[a], part["offsets"][local], n, part["files"][f"{a}.npy"]))
                counts.append(n)
        counts = np.concatenate(counts)
        out = [_padded(flat[a][0] if len(flat[a]) == 1 else np.concatenate(flat[a]), counts) for a in arrays]
        return out[0], counts, out[1] if self.projection_size else None

    # ------------------------------------------------------------------ queries
    def encode_queries(self, queries, name: str = "queries") -> dict:
        """Queries -> {"embs": (Q, n_vec, d), "lengths": (Q,) or None, "global": (Q, d)}. Captions (a list
        of str) for an image index; region features (Q, n_region, img_dim) or picture paths for a
        caption index. InputError for queries of the other kind and for features of another
        size. A caption's words the vocabulary lacks are read as <unk>, as in training (one of only
        such words too: ``Scorer.unknown_words`` names them). name: what error messages call the queries."""
        if self.kind == "images":
            if isinstance(queries, np.ndarray):
                raise InputError(f"{name}: an image index is searched with captions (a list of strings)")
            queries = check_captions(queries, name)
            tokens, lengths = self.scorer.tokenize(queries, name)  # unknown words are <unk>, as in training
            embs, lengths = self.scorer.encode_token_batch(tokens, lengths)
            return {"embs": embs, "lengths": lengths, "global": self.scorer.first_stage_vectors(embs, lengths)}
        paths = None if isinstance(queries, np.ndarray) else image_paths_or_none(queries)
        if paths is not None and not all(isinstance(p, os.PathLike) or os.path.exists(p) for p in paths):
            raise InputError("queries: a caption index is searched with images (region features or picture "
                             f"files); {paths[0]!r} is not a file")
        if paths is not None:
            embs = self.scorer.encode_image_files(paths)
        else:
            embs = self.scorer.encode_images(check_region_feats(queries, self.scorer.img_dim, name), check=False)
        return {"embs": embs, "lengths": None, "global": self.scorer.first_stage_vectors(embs)}

    def score_items(self, query: dict, q: slice, items: np.ndarray, counts: np.ndarray,
                    proj: np.ndarray | None = None) -> np.ndarray:
        """Matcher scores (n_queries, n_items) of the queries ``q`` against gathered items (and
        their stored projections, if any: ``gather``)."""
        if self.kind == "images":
            lens = query["lengths"][q]
            return self.scorer.score_embeddings(items, query["embs"][q, :int(lens.max())], lens, region_proj=proj).T
        return self.scorer.score_embeddings(query["embs"][q], items, counts, word_proj=proj)

    def first_stage(self, global_: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n rows of highest cosine per query: (rows, cosines), each (Q, n), exact (``exact_top``
        over every part's first-stage vectors)."""
        for part in self.parts:
            part.check("global.npy")  # its SHA-256, the first time (runtime.indexdir)
        return exact_top([p["global"] for p in self.parts], self.starts, global_, n, self.scorer.matmul,
                         [p["files"]["global.npy"] for p in self.parts])

    def search(self, queries, top_k: int = DEFAULT_TOP_K, shortlist: int = DEFAULT_SHORTLIST,
               exhaustive: bool = False, name: str = "queries") -> tuple[np.ndarray, np.ndarray]:
        """(rows (Q, k) int64, scores (Q, k) float32), best first, k = min(top_k, len(self)).
        shortlist: items the matcher re-ranks per query (at least top_k, at most len(self));
        exhaustive: all of them. name: what error messages call the queries (``encode_queries``)."""
        top_k, shortlist = check_positive(top_k, "top_k"), check_positive(shortlist, "shortlist")
        query = self.encode_queries(queries, name)
        n_q, k = len(query["embs"]), min(top_k, len(self))
        if exhaustive:
            top = TopK(n_q, k)
            for first in range(0, len(self), EXHAUSTIVE_ITEMS):
                rows = np.arange(first, min(first + EXHAUSTIVE_ITEMS, len(self)))
                top.update(self.score_items(query, slice(None), *self.gather(rows)), first)
            return top.result()
        n = min(max(shortlist, k), len(self))
        if self.faiss is None:
            candidates, _ = self.first_stage(query["global"], n)
        else:
            candidates, _ = faiss_stage.search(self.faiss, query["global"], n)
        rows, scores = np.zeros((n_q, k), np.int64), np.zeros((n_q, k), np.float32)
        for q in range(n_q):
            cand = np.sort(candidates[q][candidates[q] >= 0])
            if len(cand) < k:  # FAISS found fewer than top_k items
                cand = np.sort(self.first_stage(query["global"][q:q + 1], n)[0][0])
            rows[q], scores[q] = best_rows(self.score_items(query, slice(q, q + 1), *self.gather(cand))[0], cand, k)
        return rows, scores


def _padded(flat: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Items' vectors one after another (sum(counts), w) -> (n, max(counts), w), zeros past each count."""
    if (counts == counts[0]).all():  # images, or captions of one length: no padding
        return flat.reshape(len(counts), int(counts[0]), -1)
    out = np.zeros((len(counts), int(counts.max()), flat.shape[1]), dtype=flat.dtype)
    out[np.arange(counts.max())[None, :] < counts[:, None]] = flat
    return out


def check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- CLI
QUERY_BATCH = 256  # queries read, encoded, searched and printed at a time (memory flat in their number)
FIRST_BATCH = 8  # the first batch: the first results come at once; each next one is twice as large, up to --batch
MAX_QUERY_BATCH = 65536


def batch_sizes(size: int):
    """FIRST_BATCH, twice that, ... up to ``size``, then ``size`` for ever (each at most ``size``)."""
    n = min(FIRST_BATCH, size)
    while True:
        yield n
        n = min(2 * n, size)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m runtime.search",
                           description="Search an index folder (python -m runtime.index): a first stage over "
                                       "the whole gallery, exact IMRAM re-ranking of a shortlist.")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("queries", metavar="QUERIES", nargs="?",
                   help="image index: a text file of captions, one a line, or - to read them from standard input; "
                        "caption index: region features (.npy) or pictures (a folder, a .txt list, one picture)")
    p.add_argument("--query", action="append", metavar="TEXT",
                   help="a caption to search an image index with, instead of QUERIES (repeatable)")
    p.add_argument("--top-k", type=int, metavar="K", help=f"matches per query (default: {DEFAULT_TOP_K})")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--shortlist", type=int, metavar="N",
                     help=f"items the matcher re-ranks per query, at least K (default: {DEFAULT_SHORTLIST})")
    how.add_argument("--exhaustive", action="store_true", help="score every item with the matcher")
    p.add_argument("--first-stage", choices=FIRST_STAGES, default="exact",
                   help="exact (default): every item's cosine, exactly; faiss: the approximate FAISS index the "
                        "index was built with (--faiss; needs the optional faiss package)")
    p.add_argument("--faiss-params", metavar="PARAMS", help="FAISS search parameters, e.g. nprobe=64 "
                   "(default: the ones the index was built with)")
    p.add_argument("--json", action="store_true", help='one JSON object a query: {"query", "text" (or "file"), '
                                                       '"matches"[, "unknown_words"]}')
    p.add_argument("--html", metavar="PAGE.html",
                   help="also write the results as one self-contained web page (pictures inlined as thumbnails)")
    p.add_argument("--pictures", metavar="DIR",
                   help="with --html, an image index: the folder its pictures' ids are relative to, the one it "
                        "was built from (default: the current folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --html page")
    p.add_argument("--batch", type=int, default=QUERY_BATCH, metavar="N",
                   help=f"queries read, encoded, searched and printed at a time, 1..{MAX_QUERY_BATCH} "
                        f"(default: %(default)s; the first batches are smaller: {FIRST_BATCH}, twice that, ...)")
    p.add_argument("--model", metavar="MODEL_DIR", help="default: the model the index was built with")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threads", type=int, default=None, metavar="T", help=f"1..{MAX_THREADS}")
    p.add_argument("--quiet", action="store_true", help="no summary line on stderr")
    args = p.parse_args(argv)
    if args.queries is None and not args.query:
        p.error("no queries: give QUERIES (a file, or - for standard input) or --query TEXT")
    if args.queries is not None and args.query:
        p.error("give QUERIES or --query, not both")
    args.given = {flag: value for flag, value in (("--top-k", args.top_k), ("--shortlist", args.shortlist))
                  if value is not None}  # said once when more than the index holds
    for flag, value in args.given.items():
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    args.top_k = DEFAULT_TOP_K if args.top_k is None else args.top_k
    args.shortlist = DEFAULT_SHORTLIST if args.shortlist is None else args.shortlist
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        p.error(f"--threads must be in 1..{MAX_THREADS}, got {args.threads}")
    if not 1 <= args.batch <= MAX_QUERY_BATCH:
        p.error(f"--batch must be in 1..{MAX_QUERY_BATCH}, got {args.batch}")
    if args.pictures is not None and args.html is None:
        p.error("--pictures is where --html finds the index's pictures: give --html too")
    if args.overwrite and args.html is None:
        p.error("--overwrite replaces an existing --html page: give --html too")
    return args


class Queries:
    """The queries of one search, checked whole first, then read a batch at a time.

    kind: "captions" (an image index's queries: --query, a text file, standard input), "features"
    (a .npy, memory-mapped) or "pictures" (paths). name: what messages call them; count: how many.
    ``batches(size)`` yields (number of the first, queries, labels, picture paths or None), in
    batches of ``batch_sizes(size)``."""

    def __init__(self, args: argparse.Namespace, kind: str):
        self.file = None
        self.texts = self.feats = self.paths = self.names = None
        if kind == "images":  # captions are the queries
            self.kind = "captions"
            if args.query:
                self.name, self.texts = "--query", []
                for i, text in enumerate(args.query, 1):  # each checked as a one-line file
                    lines = list(caption_lines([text.encode("utf-8", "surrogateescape")], f"--query {i}"))
                    if len(lines) != 1 or not lines[0][1]:
                        raise cli.UserError(f"--query {i}: blank; give the words of a caption")
                    self.texts.append(lines[0][1])
                self.count = len(self.texts)
                return
            if args.queries.lower().endswith(".npy"):
                raise cli.UserError(f"{args.queries}: an image index is searched with captions (a text file, "
                                    f"one a line, or --query TEXT)")
            if args.queries != "-" and not os.path.lexists(args.queries):
                raise cli.UserError(f"{args.queries}: no such file (to search with this text, give it as "
                                    f"--query {shlex.quote(args.queries)})")
            self.file, self.name = open_caption_file(args.queries)
            try:
                self.count = check_caption_lines(caption_lines(self.file, self.name), self.name)
                self.file.seek(0)
            except OSError as e:
                self.close()
                raise cli.UserError(f"{self.name}: cannot read ({e.strerror or e})") from None
            except BaseException:
                self.close()
                raise
            self._lines = lambda: caption_lines(self.file, self.name)
            return
        if args.query or args.queries == STDIN:
            flag = "--query" if args.query else "- (standard input)"
            raise cli.UserError(f"{flag}: {args.index} is an index of captions, searched with images (region "
                                f"features or picture files) given as QUERIES")
        self.name = args.queries
        found, names = open_images(args.queries)
        if names is None:
            self.kind, self.feats, self.count = "features", found, len(found)
        else:
            self.kind, self.paths, self.names, self.count = "pictures", found, names, len(found)

    def batches(self, size: int):
        lines = self._lines() if self.file is not None else None
        i = 0
        for n in batch_sizes(size):
            j = min(i + n, self.count)
            if i == j:
                return
            if self.texts is not None:
                yield i, self.texts[i:j], self.texts[i:j], None
            elif lines is not None:
                texts = [caption for _, caption in itertools.islice(lines, j - i)]
                yield i, texts, texts, None
            elif self.feats is not None:
                yield i, self.feats[i:j], [f"{os.path.basename(self.name)}:{r}" for r in range(i, j)], None
            else:
                yield i, self.paths[i:j], self.names[i:j], self.paths[i:j]
            i = j

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_queries(path: str, kind: str):
    """(queries, their display texts) from QUERIES for an index of ``kind``, all at once (the
    command reads them a batch at a time: ``Queries``)."""
    queries = Queries(argparse.Namespace(queries=path, query=None, index="the index"), kind)
    try:
        if queries.kind == "captions":
            texts = [text for _, batch, _, _ in queries.batches(MAX_QUERY_BATCH) for text in batch]
            return texts, texts
        if queries.kind == "features":
            return queries.feats, [f"{os.path.basename(path)}:{i}" for i in range(queries.count)]
        return queries.paths, queries.names
    finally:
        queries.close()


def _picture_of(index_id: str, root: str) -> str | None:
    """The picture file of an image index's item, for --html (None for a features row)."""
    from .images import IMAGE_EXTENSIONS
    return os.path.join(root, index_id) if index_id.lower().endswith(IMAGE_EXTENSIONS) else None


def _html_page(stream, args: argparse.Namespace, index: "Index", queries: Queries, how: str):
    """The --html page's head: what was searched, and whether pictures can be shown."""
    from .html import ResultsPage
    no_pictures = None
    if index.kind == "images":
        first = _picture_of(index.ids[0], args.pictures or "") if len(index) else None
        if first is None:
            no_pictures = "The index holds region features, not pictures: matches are shown by id and score only."
        elif not os.path.isfile(first):
            where = args.pictures or "the current folder"
            no_pictures = (f"The index's pictures were not found under {where} (e.g. {first}): give --pictures DIR, "
                           f"the folder the index was built from.")
            print(cli.printable(f"note: --html: {no_pictures}"), file=sys.stderr)
    elif queries.kind == "features":
        no_pictures = "The queries are region features, not pictures: shown by row only."
    return ResultsPage(stream, f"runtime.search: {args.index}",
                       [f"{len(index)} {index.kind} in the index; {queries.count} queries from {queries.name}; "
                        f"top {min(args.top_k, len(index))}, {how}"], no_pictures)


def _main(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    retain_freed_memory()
    manifest = read_manifest(args.index)
    if args.html is not None:
        inputs = [] if args.queries in (None, "-") else [args.queries]
        cli.check_output_file(args.html, inputs + [os.path.join(args.index, f) for f in os.listdir(args.index)],
                              flag="--html", overwrite=args.overwrite)
        if args.pictures is not None:
            if manifest["kind"] != "images":
                raise cli.UserError("--pictures: the index holds captions; its --html page shows the query pictures")
            if not os.path.isdir(args.pictures):
                raise cli.UserError(f"--pictures {args.pictures}: no such folder")
    queries = Queries(args, manifest["kind"])
    with contextlib.ExitStack() as stack:
        stack.callback(queries.close)
        index = Index(args.index, args.model, device=args.device, threads=args.threads, first_stage=args.first_stage,
                      faiss_params=args.faiss_params)
        if queries.kind == "features":  # every row checked before the first result is printed
            check_region_feats(queries.feats, index.scorer.img_dim, queries.name)
        how = "exhaustive" if args.exhaustive else f"shortlist {min(max(args.shortlist, args.top_k), len(index))}"
        if not args.quiet:
            print(f"{index!r}; {queries.count} queries, {how}", file=sys.stderr)
        for flag, value in args.given.items():
            if value > len(index):
                print(f"note: {flag} {value} is more than the index's {len(index)} items; {len(index)} used",
                      file=sys.stderr)
        page = None
        if args.html is not None:
            from .atomic import atomic_open
            page = _html_page(stack.enter_context(atomic_open(args.html, "w")), args, index, queries, how)
        out = sys.stdout
        for first, batch, labels, pictures in queries.batches(args.batch):
            unknown = index.scorer.unknown_words(batch) if queries.kind == "captions" else {}
            cli.note_unknown_words(unknown, labels, "query", first)
            rows, scores = index.search(batch, args.top_k, args.shortlist, args.exhaustive, name=queries.name)
            for i, (r, s) in enumerate(zip(rows, scores)):
                q, label = first + i, labels[i]
                if args.json:
                    extra = {"unknown_words": unknown[i]} if i in unknown else {}
                    out.write(cli.json_line({"query": q, "text" if queries.kind == "captions" else "file": label,
                                             "matches": [{"row": int(j), "id": index.ids[j], "score": float(v)}
                                                         for j, v in zip(r, s)], **extra}))
                else:
                    out.write(f"query {q}: {cli.printable(label)}\n")
                    out.writelines(f"  {n}. row {j} ({v:.6f}) {cli.printable(index.ids[j])}\n"
                                   for n, (j, v) in enumerate(zip(r, s), 1))
                if page is not None:
                    _html_query(page, args, index, q, label, None if pictures is None else pictures[i], r, s,
                                unknown.get(i))
            out.flush()
        if page is not None:
            page.close()


def _html_query(page, args, index: "Index", q: int, label: str, picture: str | None, rows, scores,
                unknown: list[str] | None) -> None:
    from .html import Match
    notes = [f"the model's vocabulary lacks {', '.join(unknown)} (read as <unk>)"] if unknown else []
    if index.kind == "images":
        page.caption_query(q, label, [Match(index.ids[j], float(v), _picture_of(index.ids[j], args.pictures or ""),
                                            int(j)) for j, v in zip(rows, scores)], notes)
    else:
        page.picture_query(q, label, picture, [Match(index.ids[j], float(v), None, int(j))
                                               for j, v in zip(rows, scores)], notes)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv, user_errors=(InputError, ModelDirError, DeviceError, ImageError, IndexDirError,
                                             FaissError))


if __name__ == "__main__":
    sys.exit(main())
