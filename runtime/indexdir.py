"""The index folder: what ``python -m runtime.index`` writes and ``runtime.Index`` reads (numpy only).

    INDEX_DIR/manifest.json        the one commit point: kind, model, dtype, the list of parts
    INDEX_DIR/part-ID.embs.npy     (n_vectors, d) float32 or float16: each item's region or word
                                   embeddings, one item after another (what the matcher re-ranks)
    INDEX_DIR/part-ID.offsets.npy  (n_items + 1,) int64: item i's vectors are embs[offsets[i]:offsets[i+1]]
    INDEX_DIR/part-ID.global.npy   (n_items, G) float32: the first stage's vector per item (the mean
                                   of its embeddings, l2-normalised, G = d; or the model dir's
                                   global head's, G its size)
    INDEX_DIR/part-ID.ids.txt      one JSON string a line: the item's id (file name, features row or caption)
    INDEX_DIR/part-ID.proj.npy     only in an index built with --store-projections (the manifest's
                                   projection_size P > 0): (n_vectors, P) in the embeddings' dtype,
                                   each vector's projection (region_projection.onnx / word_projection.onnx
                                   of the stored embedding), row for row with embs.npy

Nothing is written in place. A build or an append writes a new part under a fresh random ID
(files no manifest lists yet), fsyncs it, then replaces manifest.json atomically
(runtime.atomic); only then are the parts the new manifest no longer lists deleted (a rebuild).
So a failed or interrupted write leaves the previous manifest, and every file it lists, as they
were; its stray part files are removed by the next successful write. A new index is built in a
temporary folder beside INDEX_DIR and renamed into place. One writer at a time.

The manifest records the SHA-256 of the model folder's manifest.json (which itself lists the
SHA-256 of every model file): an index is searched only with the model it was built with. It also
records where that model folder is, relative to INDEX_DIR (``model_dir_of``), so the two can be
moved or copied together (a service's /srv/index and /srv/model) and still find each other.
Loading is safe: np.load(allow_pickle=False), memory-mapped, every shape, dtype and offset
checked against the manifest (IndexDirError naming the file).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile

import numpy as np

from . import atomic
from .modeldir import read_manifest_file

FORMAT, FORMAT_VERSION = "imram-min-index", 1
MANIFEST_FILE = "manifest.json"
KINDS = ("images", "captions")  # what the gallery holds: images are searched by captions, and vice versa
DTYPES = ("float32", "float16")
SUFFIXES = ("embs.npy", "offsets.npy", "global.npy", "ids.txt")  # every part has these
PROJ = "proj.npy"  # and these, in an index that stores the projections (manifest: projection_size > 0)
PART_FILE = re.compile(r"part-[0-9a-f]{12}\.(embs\.npy|offsets\.npy|global\.npy|ids\.txt|proj\.npy)")
FAISS_FILE = re.compile(r"faiss-[0-9a-f]{12}\.index")  # an approximate first stage (runtime.faiss_stage), optional


class IndexDirError(ValueError):
    """An index folder that is missing, incomplete, altered or of another kind (the message names the file)."""


def new_part_name() -> str:
    return f"part-{secrets.token_hex(6)}"


def part_file(index_dir: str, part: str, suffix: str) -> str:
    return os.path.join(index_dir, f"{part}.{suffix}")


# --------------------------------------------------------------------------- writing
class NpyStream:
    """A .npy of known shape written front to back (header, then rows as they come): a full disk is
    an OSError at the write that hits it, never a SIGBUS of a memory map."""

    def __init__(self, path: str, shape: tuple, dtype: str):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.file = open(path, "xb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": self.shape})
        self.rows = 0

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows {rows.shape} do not fit {self.shape} after {self.rows} rows")
        self.file.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.path, atomic.FILE_MODE)


class PartWriter:
    """One new part: ``add`` items a batch at a time (in order), then ``close`` (all files fsynced).
    On an error ``remove`` deletes its files."""

    def __init__(self, index_dir: str, n_items: int, n_vectors: int, d: int, dtype: str, global_d: int | None = None,
                 proj_size: int = 0):
        self.index_dir, self.name, self.dtype = index_dir, new_part_name(), dtype
        self.n_items, self.n_vectors, self.done_vectors = n_items, n_vectors, 0
        self.streams, self.ids, self.offsets = [], None, [np.zeros(1, np.int64)]
        self.embs = self._stream("embs.npy", (n_vectors, d), dtype)
        self.global_ = self._stream("global.npy", (n_items, global_d or d), "float32")
        self.proj = self._stream(PROJ, (n_vectors, proj_size), dtype) if proj_size else None
        self.ids = open(part_file(index_dir, self.name, "ids.txt"), "x", encoding="utf-8", newline="\n")

    def _stream(self, suffix, shape, dtype) -> NpyStream:
        self.streams.append(NpyStream(part_file(self.index_dir, self.name, suffix), shape, dtype))
        return self.streams[-1]

    def add(self, vectors: np.ndarray, counts: np.ndarray, global_: np.ndarray, ids: list[str],
            proj: np.ndarray | None = None) -> None:
        """vectors (sum(counts), d): the items' embeddings one after another; counts (n,) vectors per
        item; global_ (n, d) float32; ids: n strings; proj (sum(counts), P): the vectors' projections,
        when the part stores them."""
        for name, rows, stream in (("embeddings", vectors, self.embs), ("projections", proj, self.proj)):
            if stream is None:
                continue
            stored = np.asarray(rows, dtype=self.dtype)
            if not np.isfinite(stored).all():
                raise ValueError(f"{name} overflow {self.dtype}; build the index with --dtype float32")
            stream.write(stored)
        self.global_.write(global_)
        self.offsets.append(self.done_vectors + np.cumsum(counts, dtype=np.int64))
        self.done_vectors += int(np.sum(counts))
        self.ids.writelines(json.dumps(i, ensure_ascii=False) + "\n" for i in ids)

    def close(self) -> dict:
        """Finish and fsync every file; returns the part's manifest entry."""
        for stream in self.streams:
            stream.close()
        offsets = np.concatenate(self.offsets)
        with open(part_file(self.index_dir, self.name, "offsets.npy"), "xb") as f:
            np.save(f, offsets, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        self.ids.flush()
        os.fsync(self.ids.fileno())
        self.ids.close()
        return {"name": self.name, "n_items": self.n_items, "n_vectors": self.n_vectors}

    def remove(self) -> None:
        for stream in self.streams:
            stream.file.close()
        if self.ids is not None:
            self.ids.close()
        for suffix in SUFFIXES + (PROJ,):
            path = part_file(self.index_dir, self.name, suffix)
            if os.path.exists(path):
                os.remove(path)


def commit(index_dir: str, manifest: dict) -> None:
    """Replace INDEX_DIR/manifest.json atomically, then delete the part (and FAISS) files it does not
    list (those of a rebuilt or appended index, and strays of an interrupted write)."""
    atomic.write_json(os.path.join(index_dir, MANIFEST_FILE), manifest)
    keep = {p["name"] for p in manifest["parts"]} | {manifest.get("faiss", {}).get("file")}
    for name in os.listdir(index_dir):
        if (PART_FILE.fullmatch(name) and name.split(".")[0] not in keep) or \
                (FAISS_FILE.fullmatch(name) and name not in keep):
            os.remove(os.path.join(index_dir, name))


def new_folder_beside(index_dir: str) -> str:
    """A temporary folder next to INDEX_DIR (same file system: renamed into place when complete)."""
    parent = os.path.dirname(os.path.abspath(index_dir))
    return tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(index_dir)) + ".", suffix=".tmp",
                            dir=parent)


def move_into_place(tmp_dir: str, index_dir: str) -> None:
    """Rename the complete temporary folder to INDEX_DIR (absent or an empty folder)."""
    os.chmod(tmp_dir, 0o777 & ~atomic._UMASK)  # mkdtemp made it 0700; a folder gets what mkdir gives
    os.replace(tmp_dir, index_dir)


def remove_folder(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- reading
def read_manifest(index_dir: str) -> dict:
    """INDEX_DIR/manifest.json, its fields checked. IndexDirError."""
    path, manifest = read_manifest_file(index_dir, IndexDirError, "index", "python -m runtime.index")
    problem = _manifest_problem(manifest)
    if problem:
        raise IndexDirError(f"{path}: {problem}")
    return manifest


def relative_model_dir(model_dir: str, index_dir: str) -> str:
    """What the manifest records as the model dir: its path relative to INDEX_DIR (absolute when
    there is no relative path, e.g. another drive)."""
    try:
        return os.path.relpath(os.path.abspath(model_dir), os.path.abspath(index_dir))
    except ValueError:
        return os.path.abspath(model_dir)


def model_dir_of(index_dir: str, manifest: dict) -> str:
    """The model dir an index was built with: the manifest's path, read relative to INDEX_DIR
    (an absolute one, as indexes before this recorded, stays as it is)."""
    return os.path.normpath(os.path.join(index_dir, manifest["model"]["dir"]))


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _manifest_problem(m) -> str | None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"not an {FORMAT} manifest"
    if m.get("format_version") != FORMAT_VERSION:
        return f"format version {m.get('format_version')!r} is not supported (this runtime reads {FORMAT_VERSION})"
    if m.get("kind") not in KINDS or m.get("dtype") not in DTYPES:
        return f"kind must be one of {KINDS} and dtype one of {DTYPES}"
    model = m.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("dir"), str) or \
            not re.fullmatch(r"[0-9a-f]{64}", str(model.get("manifest_sha256"))) or \
            not _is_int(model.get("embed_size"), 1):
        return "model must be {dir: str, manifest_sha256: 64 hex digits, embed_size: int}"
    parts = m.get("parts")
    if not isinstance(parts, list) or not parts:
        return "parts must be a non-empty list"
    for p in parts:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or \
                not PART_FILE.fullmatch(f"{p['name']}.ids.txt") or \
                not _is_int(p.get("n_items"), 1) or not _is_int(p.get("n_vectors"), 1):
            return "parts must hold {name: part-<12 hex digits>, n_items: int >= 1, n_vectors: int >= 1}"
    if m["kind"] == "images" and not _is_int(m.get("n_region"), 1):
        return "n_region must be an integer >= 1 for an image index"
    if not _is_int(m.get("projection_size", 0)):
        return "projection_size must be an integer >= 0 (0: projections not stored)"
    f = m.get("faiss")
    if f is not None and not (isinstance(f, dict) and isinstance(f.get("factory"), str) and
                              isinstance(f.get("params"), str) and FAISS_FILE.fullmatch(str(f.get("file")))):
        return "faiss must be {factory: str, file: faiss-<12 hex digits>.index, params: str}"
    return None


def _load_npy(path: str, shape: tuple, dtype: str, mmap: bool = True) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise IndexDirError(f"{path}: missing from the index folder") from None
    except (OSError, ValueError, EOFError) as e:
        raise IndexDirError(f"{path}: cannot read as a .npy array ({e})") from None
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise IndexDirError(f"{path}: {array.dtype} {array.shape}, the manifest says {dtype} {shape}")
    return array


def open_part(index_dir: str, part: dict, d: int, dtype: str, global_d: int | None = None,
              proj_size: int = 0) -> dict:
    """One part's arrays, memory-mapped (offsets and ids in memory), each checked against the
    manifest: {"embs", "offsets", "global", "ids", "proj"}. global_d: the first-stage vectors' size
    (None: d); proj_size: the stored projections' size P ("proj": None when 0)."""
    name, n, n_vec = part["name"], part["n_items"], part["n_vectors"]
    out = {"embs": _load_npy(part_file(index_dir, name, "embs.npy"), (n_vec, d), dtype),
           "global": _load_npy(part_file(index_dir, name, "global.npy"), (n, global_d or d), "float32"),
           "proj": _load_npy(part_file(index_dir, name, PROJ), (n_vec, proj_size), dtype) if proj_size else None}
    path = part_file(index_dir, name, "offsets.npy")
    offsets = _load_npy(path, (n + 1,), "int64", mmap=False)
    if offsets[0] != 0 or offsets[-1] != n_vec or (np.diff(offsets) < 1).any():
        raise IndexDirError(f"{path}: offsets must rise from 0 to {n_vec}, at least 1 vector per item")
    out["offsets"] = offsets
    path = part_file(index_dir, name, "ids.txt")
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            ids = [json.loads(line) for line in f]
    except FileNotFoundError:
        raise IndexDirError(f"{path}: missing from the index folder") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexDirError(f"{path}: cannot read the ids, one JSON string a line ({e})") from None
    if len(ids) != n or not all(isinstance(i, str) for i in ids):
        raise IndexDirError(f"{path}: expected {n} ids (JSON strings), found {len(ids)} lines")
    out["ids"] = ids
    return out
