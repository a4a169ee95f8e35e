"""The index folder: what ``python -m runtime.index`` writes and ``runtime.Index`` reads (numpy only).

    INDEX_DIR/manifest.json        the one commit point: kind, model, dtype, the list of parts, and
                                   each part file's size and SHA-256 (embs.npy and proj.npy also a
                                   SHA-256 per BLOCK_BYTES block)
    INDEX_DIR/part-ID.embs.npy     (n_vectors, d) float32 or float16: each item's region or word
                                   embeddings, one item after another (what the matcher re-ranks)
    INDEX_DIR/part-ID.offsets.npy  (n_items + 1,) int64: item i's vectors are embs[offsets[i]:offsets[i+1]]
    INDEX_DIR/part-ID.global.npy   (n_items, G) float32: the first stage's vector per item (the mean
                                   of its embeddings, l2-normalised, G = d; or the model dir's
                                   global head's, G its size)
    INDEX_DIR/part-ID.ids.txt      one JSON string a line: the item's id (a picture's path relative to
                                   the folder or list given, "FEATURES.npy:ROW", or the caption)
    INDEX_DIR/part-ID.proj.npy     only in an index built with --store-projections (the manifest's
                                   projection_size P > 0): (n_vectors, P) in the embeddings' dtype,
                                   each vector's projection (region_projection.onnx / word_projection.onnx
                                   of the stored embedding), row for row with embs.npy
    INDEX_DIR/faiss-ID.index       only with --faiss: the approximate first stage (runtime.faiss_stage)
    INDEX_DIR/.lock                the writers' lock file (empty but for the holder's pid)

The write protocol (``writer_lock``, ``PartWriter``, ``commit``), for a build, a rebuild
(--overwrite) and an --append alike:

1. One writer at a time. A writer creates INDEX_DIR if it is missing and takes an exclusive
   ``fcntl.flock`` on INDEX_DIR/.lock, waiting at most ``wait`` seconds (--wait; default 0: a
   second writer is refused at once, in one line naming the holder's pid). The lock file lives in
   the index folder itself and nothing ever renames that folder, so the lock covers every file of
   the index for as long as it is held. A lock taken on a lock file that was meanwhile removed (a
   failed new build removes its folder) is dropped and taken again on the current one. Readers
   take no lock.
2. Holding the lock, the writer removes what killed writers left: part and FAISS files the
   manifest does not list, ``.manifest.json.*.tmp`` files, and ``.NAME.*.tmp`` folders beside
   INDEX_DIR (temporary folders of the earlier protocol). Only the lock holder writes, so none of
   these can belong to a writer still running.
3. It then reads the manifest (the index as it is; none in a new or unfinished folder), refuses
   to replace it without ``overwrite`` and refuses ids already in it on an append (or skips
   them), all before anything is encoded.
4. It writes a new part under a fresh random name (files no manifest lists), hashing each file
   as it goes, and fsyncs it. Nothing is ever written in place: part files are immutable.
5. Commit: manifest.json is replaced atomically (runtime.atomic: temp file, fsync, rename, fsync
   of the folder), listing each part file's size and SHA-256; only then are the files the new
   manifest no longer lists deleted (the old parts of a rebuild, the old FAISS file of an
   append). A failed or interrupted write leaves the previous manifest and every file it lists
   as they were; its own files are removed at once (even when closing a file re-raises ENOSPC),
   or by the next writer (step 2).

Readers (runtime.Index) read the manifest, then open every part file it lists and keep it open:
an open Index answers from that snapshot whatever writers do later (a deleted file stays readable
through its open descriptor and memory maps) until ``Index.reload()``. A part deleted between
reading the manifest and opening it (a rebuild committed in between) makes the reader read the
new manifest and open that instead (a few times at most), so a search started before a rebuild
finishes on the old index or on the new one, never with an error.

Every file is opened as a regular file of the folder (O_NOFOLLOW | O_NONBLOCK, then fstat: no
symbolic link, FIFO or device), its size bounded before it is read: manifest.json at most
MAX_MANIFEST_BYTES, each part file exactly the size the manifest records (a .npy also exactly
what its header claims). The first time a process reads a part file its SHA-256 is checked
against the manifest (and its floats checked finite): offsets and ids when the part is opened,
global.npy when a search first scans it (``PartFiles.check``), and of embs.npy and proj.npy only
the blocks a search reads (``PartFiles.check_rows``); ``--verify`` checks every file and block.
Each result is cached per process by (device, inode, size, mtime, ctime), so a long-lived reader
hashes nothing twice, and a new CLI process hashes only what it reads (100K images x 36 x d = 64:
0.4 s for its first search against 4.9 s for every file; benchmarks/index_faults.py). A part
listed twice is refused. Format 1 indexes (no sizes or hashes) are refused with what to do:
``python -m runtime.index --upgrade INDEX_DIR`` records them, ``--verify`` checks them.

The manifest records the SHA-256 of the model folder's manifest.json (which itself lists the
SHA-256 of every model file): an index is searched only with the model it was built with. It also
records where that model folder is, relative to INDEX_DIR (``model_dir_of``), so the two can be
moved or copied together (a service's /srv/index and /srv/model) and still find each other.
Loading is safe: .npy headers parsed without pickles, memory-mapped, every shape, dtype and offset
checked against the manifest (IndexDirError naming the file).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np

from . import atomic
from .modeldir import model_manifest_sha256

FORMAT, FORMAT_VERSION = "imram-min-index", 2
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
MAX_MANIFEST_BYTES = 64 << 20
MAX_NPY_HEADER = 1 << 16
HASH_CHUNK = 16 << 20  # bytes hashed (and checked finite) at a time
BLOCK_BYTES = 1 << 20  # embs.npy and proj.npy also carry a SHA-256 per block: a search checks the blocks it reads
KINDS = ("images", "captions")  # what the gallery holds: images are searched by captions, and vice versa
DTYPES = ("float32", "float16")
SUFFIXES = ("embs.npy", "offsets.npy", "global.npy", "ids.txt")  # every part has these
PROJ = "proj.npy"  # and these, in an index that stores the projections (manifest: projection_size > 0)
PART_FILE = re.compile(r"part-[0-9a-f]{12}\.(embs\.npy|offsets\.npy|global\.npy|ids\.txt|proj\.npy)")
FAISS_FILE = re.compile(r"faiss-[0-9a-f]{12}\.index")  # an approximate first stage (runtime.faiss_stage), optional
MANIFEST_TEMP = re.compile(r"\.manifest\.json\..+\.tmp")  # runtime.atomic's temporary of manifest.json
SHA256 = re.compile(r"[0-9a-f]{64}")
UPGRADE = "python -m runtime.index --upgrade"


class IndexDirError(ValueError):
    """An index folder that is missing, incomplete, altered or of another kind (the message names the file)."""


class PartMissing(IndexDirError):
    """A file the manifest lists is not in the folder (deleted by a writer's commit after the
    manifest was read: read it again)."""


class IndexBusy(IndexDirError):
    """Another process holds the index's writer lock."""


def new_part_name() -> str:
    return f"part-{secrets.token_hex(6)}"


def part_file(index_dir: str, part: str, suffix: str) -> str:
    return os.path.join(index_dir, f"{part}.{suffix}")


def part_suffixes(manifest: dict) -> tuple[str, ...]:
    """The files every part of this index has."""
    return SUFFIXES + ((PROJ,) if manifest.get("projection_size", 0) else ())


# --------------------------------------------------------------------------- the writer lock
def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


@contextmanager
def writer_lock(index_dir: str, wait: float = 0.0, note: Callable[[str], None] | None = None):
    """Hold INDEX_DIR's writer lock (creating INDEX_DIR if missing); yields True when this call
    created the folder. wait: seconds to wait for another writer (0: refuse at once). IndexBusy
    when the lock is not free in time; IndexDirError when INDEX_DIR is not a folder. note(text):
    told once when this writer starts waiting."""
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not wait >= 0:
        raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
    deadline, created, told = time.monotonic() + wait, False, False
    path = os.path.join(index_dir, LOCK_FILE)
    while True:
        try:
            os.mkdir(index_dir)
            created = True
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise IndexDirError(f"{index_dir}: its parent folder does not exist") from None
        if not os.path.isdir(index_dir):
            raise IndexDirError(f"{index_dir}: exists and is not a folder; refusing to write into it")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         atomic.FILE_MODE)
        except FileNotFoundError:  # the folder was removed meanwhile (a failed new build): again
            continue
        except OSError as e:
            raise IndexDirError(f"{path}: cannot open the writer lock ({e.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IndexDirError(f"{path}: not a regular file; remove it")
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise IndexBusy(f"{index_dir}: being written by another process{_lock_holder(fd)}; try "
                                        f"again when it is done, or add --wait SECONDS") from None
                    if note is not None and not told:
                        note(f"waiting up to {wait:g} s for the writer of {index_dir}{_lock_holder(fd)}")
                        told = True
                    time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            try:  # still the lock file at the path (not one a failed build removed meanwhile)?
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
        break
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # the pid is only shown in messages
        pass
    try:
        yield created
    finally:
        os.close(fd)  # releases the flock


def owned_name(name: str) -> bool:
    """A name the index's writers make in INDEX_DIR (besides manifest.json)."""
    return name == LOCK_FILE or bool(PART_FILE.fullmatch(name) or FAISS_FILE.fullmatch(name) or
                                      MANIFEST_TEMP.fullmatch(name))


def remove_strays(index_dir: str, manifest: dict | None) -> list[str]:
    """Holding the writer lock: remove what killed writers left (part and FAISS files ``manifest``
    does not list, manifest temporaries, and the earlier protocol's ``.NAME.*.tmp`` folders beside
    INDEX_DIR). Returns the names removed."""
    keep = set() if manifest is None else {f"{p['name']}.{s}" for p in manifest["parts"] for s in part_suffixes(manifest)}
    if manifest is not None and manifest.get("faiss"):
        keep.add(manifest["faiss"]["file"])
    removed = []
    for name in os.listdir(index_dir):
        if name not in keep and name != LOCK_FILE and owned_name(name):
            _unlink(os.path.join(index_dir, name))
            removed.append(name)
    parent, base = os.path.split(os.path.abspath(index_dir))
    old_temp = re.compile(re.escape(f".{base}.") + r"[A-Za-z0-9_]{8}\.tmp")
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if old_temp.fullmatch(name) and os.path.isdir(path) and not os.path.islink(path) and \
                all(owned_name(f) or f == MANIFEST_FILE for f in os.listdir(path)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- writing
class Digests:
    """The size and SHA-256 of bytes given front to back (with ``blocks``, also the SHA-256 of each
    BLOCK_BYTES block): the one hasher of the index's files, for PartWriter and ``hash_file``."""

    def __init__(self, blocks: bool = False):
        self.sha, self.size = hashlib.sha256(), 0
        self.blocks = [] if blocks else None
        self.block, self.in_block = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        if self.blocks is None:
            return
        view = memoryview(data).cast("B")
        while len(view):
            take = min(BLOCK_BYTES - self.in_block, len(view))
            self.block.update(view[:take])
            self.in_block += take
            view = view[take:]
            if self.in_block == BLOCK_BYTES:
                self.blocks.append(self.block.hexdigest())
                self.block, self.in_block = hashlib.sha256(), 0

    def entry(self) -> dict:
        """{"size", "sha256"} (and "block_bytes", "blocks"), as the manifest records a file."""
        entry = {"size": self.size, "sha256": self.sha.hexdigest()}
        if self.blocks is not None:
            last = [self.block.hexdigest()] if self.in_block else []  # a shorter last block
            entry.update(block_bytes=BLOCK_BYTES, blocks=self.blocks + last)
        return entry


def check_block(path: str, block: int, data: bytes, recorded: list[str]) -> None:
    """Block ``block`` of the file (its bytes ``data``) against the SHA-256 the manifest records. IndexDirError."""
    if hashlib.sha256(data).hexdigest() != recorded[block]:
        raise IndexDirError(f"{path}: block {block}'s SHA-256 is not the one the manifest records: the file was "
                            f"altered, swapped or replaced (rebuild the index)")


class _HashedFile:
    """A new file written front to back, its ``Digests`` kept as it goes."""

    def __init__(self, path: str, blocks: bool = False):
        self.path, self.digests = path, Digests(blocks)
        self.file = open(path, "xb")

    def put(self, data: bytes) -> None:
        self.file.write(data)
        self.digests.update(data)

    def finish(self) -> dict:
        """Flush, fsync and close; returns {"size", "sha256"} (and "block_bytes", "blocks")."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.path, atomic.FILE_MODE)
        return self.digests.entry()

    def abandon(self) -> None:
        """Close without caring: closing a file whose buffer cannot be written (a full disk) raises
        again, and its removal must still happen."""
        try:
            self.file.close()
        except OSError:
            pass


class NpyStream(_HashedFile):
    """A .npy of known shape written front to back (header, then rows as they come): a full disk is
    an OSError at the write that hits it, never a SIGBUS of a memory map."""

    def __init__(self, path: str, shape: tuple, dtype: str, blocks: bool = False):
        super().__init__(path, blocks)
        self.shape, self.dtype, self.rows = tuple(shape), np.dtype(dtype), 0
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": self.shape})
        self.put(header.getvalue())

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows {rows.shape} do not fit {self.shape} after {self.rows} rows")
        self.put(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> dict:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")
        return self.finish()


class PartWriter:
    """One new part: ``add`` items a batch at a time (in order), then ``close`` (all files fsynced;
    returns the manifest entry with each file's size and SHA-256). On an error ``remove`` deletes
    its files (also after a failed close)."""

    def __init__(self, index_dir: str, n_items: int, n_vectors: int, d: int, dtype: str, global_d: int | None = None,
                 proj_size: int = 0):
        self.index_dir, self.name, self.dtype = index_dir, new_part_name(), dtype
        self.n_items, self.n_vectors, self.done_vectors = n_items, n_vectors, 0
        self.files, self.offsets, self.proj = {}, [np.zeros(1, np.int64)], None
        try:
            self.embs = self._open("embs.npy", NpyStream, (n_vectors, d), dtype, True)
            self.global_ = self._open("global.npy", NpyStream, (n_items, global_d or d), "float32")
            if proj_size:
                self.proj = self._open(PROJ, NpyStream, (n_vectors, proj_size), dtype, True)
            self.ids = self._open("ids.txt", _HashedFile)
        except BaseException:
            self.remove()
            raise

    def _open(self, suffix: str, kind, *args):
        self.files[suffix] = kind(part_file(self.index_dir, self.name, suffix), *args)
        return self.files[suffix]

    def add(self, vectors: np.ndarray, counts: np.ndarray, global_: np.ndarray, ids: list[str],
            proj: np.ndarray | None = None) -> None:
        """vectors (sum(counts), d): the items' embeddings one after another; counts (n,) vectors per
        item; global_ (n, G) float32; ids: n strings; proj (sum(counts), P): the vectors' projections,
        when the part stores them."""
        for name, rows, stream in (("embeddings", vectors, self.embs), ("projections", proj, self.proj)):
            if stream is None:
                continue
            stored = np.asarray(rows, dtype=self.dtype)
            if not np.isfinite(stored).all():
                raise ValueError(f"{name} overflow {self.dtype}; build the index with --dtype float32")
            stream.write(stored)
        global_ = np.asarray(global_, dtype=np.float32)
        if not np.isfinite(global_).all():
            raise ValueError("the model made a non-finite first-stage vector; check the items and the model")
        self.global_.write(global_)
        self.offsets.append(self.done_vectors + np.cumsum(counts, dtype=np.int64))
        self.done_vectors += int(np.sum(counts))
        self.ids.put("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids).encode("utf-8"))

    def close(self) -> dict:
        """Finish and fsync every file; returns the part's manifest entry."""
        files = {suffix: f.close() for suffix, f in self.files.items() if isinstance(f, NpyStream)}
        files["ids.txt"] = self.ids.finish()
        buffer = io.BytesIO()
        np.save(buffer, np.concatenate(self.offsets), allow_pickle=False)
        offsets = self._open("offsets.npy", _HashedFile)
        offsets.put(buffer.getvalue())
        files["offsets.npy"] = offsets.finish()
        return {"name": self.name, "n_items": self.n_items, "n_vectors": self.n_vectors,
                "files": {s: files[s] for s in SUFFIXES + (PROJ,) if s in files}}

    def remove(self) -> None:
        """Delete every file of the part (closing them first, ignoring a full disk's errors)."""
        for f in self.files.values():
            f.abandon()
        for suffix in SUFFIXES + (PROJ,):
            _unlink(part_file(self.index_dir, self.name, suffix))


def commit(index_dir: str, manifest: dict) -> None:
    """Replace INDEX_DIR/manifest.json atomically, then delete the part (and FAISS) files it does not
    list (those of a rebuilt or appended index, and strays of an interrupted write). The caller
    holds the writer lock (``writer_lock``), or owns a folder no one else knows yet."""
    atomic.write_json(os.path.join(index_dir, MANIFEST_FILE), manifest)
    atomic.fsync_folder(index_dir)
    remove_strays(index_dir, manifest)


def remove_folder(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- reading files safely
def open_regular(path: str, size: int | None = None, max_bytes: int | None = None, what: str = "file"):
    """(binary file object, os.stat_result) of PATH opened as a regular file: not through a symbolic
    link, never blocking on a FIFO or device; its size exactly ``size`` or at most ``max_bytes``.
    PartMissing when absent; IndexDirError otherwise."""
    try:
        f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC))
    except FileNotFoundError:
        raise PartMissing(f"{path}: missing from the index folder") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IndexDirError(f"{path}: a symbolic link; an index folder holds its own files only") from None
        raise IndexDirError(f"{path}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IndexDirError(f"{path}: not a regular file (a FIFO, device or folder); an index folder holds "
                                f"regular files only")
        if size is not None and st.st_size != size:
            raise IndexDirError(f"{path}: {st.st_size} bytes, the manifest says {size}; the {what} was altered "
                                f"or truncated (rebuild the index)")
        if max_bytes is not None and st.st_size > max_bytes:
            raise IndexDirError(f"{path}: {st.st_size} bytes, more than the {max_bytes} a {what} may have")
    except BaseException:
        f.close()
        raise
    return f, st


def read_npy_header(f, path: str, file_size: int) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of the open .npy ``f``, its header checked against the file's
    size (no pickles, C order). IndexDirError."""
    f.seek(0)
    if f.read(6) != b"\x93NUMPY":
        raise IndexDirError(f"{path}: not a .npy file")
    f.seek(0)
    try:
        major, _ = np.lib.format.read_magic(f)
        read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
        if read is None:
            raise ValueError(f"version {major}")
        shape, fortran, dtype = read(f, max_header_size=MAX_NPY_HEADER)
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise IndexDirError(f"{path}: corrupt .npy header ({str(e).splitlines()[0][:200]})") from None
    if dtype.hasobject or fortran:
        raise IndexDirError(f"{path}: a .npy of {'Python objects' if dtype.hasobject else 'Fortran order'}; "
                            f"an index stores plain C-order numbers (never loaded)")
    offset = f.tell()
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    rows = shape[0] if shape else 1
    if offset + rows * row_bytes != file_size:
        raise IndexDirError(f"{path}: corrupt .npy header: claims {rows} rows of {row_bytes} bytes, the file holds "
                            f"{file_size - offset} bytes of data")
    return shape, dtype, offset


_VERIFIED: set[tuple] = set()  # files whose SHA-256 (and floats) this process has checked


def verify_file(f, st: os.stat_result, path: str, sha256: str, float_from: int | None = None,
                dtype: np.dtype | None = None, force: bool = False, entry: dict | None = None) -> None:
    """Check the open file's SHA-256 (and, from byte ``float_from`` on, that its ``dtype`` values
    are finite; with ``entry``'s "blocks", each block's SHA-256 too), once per process per (device,
    inode, size, mtime, ctime). IndexDirError."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256)
    if key in _VERIFIED and not force:
        return
    digest, pos, fd, finite = hashlib.sha256(), 0, f.fileno(), True
    blocks = (entry or {}).get("blocks")
    while pos < st.st_size:  # HASH_CHUNK: a multiple of BLOCK_BYTES and of any itemsize
        chunk = os.pread(fd, min(HASH_CHUNK, st.st_size - pos), pos)
        if not chunk:
            raise IndexDirError(f"{path}: shorter than its recorded size")
        digest.update(chunk)
        if blocks is not None:
            size = entry["block_bytes"]
            for i in range(0, len(chunk), size):
                check_block(path, (pos + i) // size, chunk[i:i + size], blocks)
        if float_from is not None and finite and pos + len(chunk) > float_from:
            finite = bool(np.isfinite(np.frombuffer(chunk[max(0, float_from - pos):], dtype=dtype)).all())
        pos += len(chunk)
    if digest.hexdigest() != sha256:
        raise IndexDirError(f"{path}: its SHA-256 is not the one the manifest records: the file was altered, "
                            f"swapped or replaced (rebuild the index)")
    if not finite:
        raise IndexDirError(f"{path}: holds NaN or infinite values (rebuild the index)")
    _VERIFIED.add(key)


def _read_json_bounded(path: str, max_bytes: int):
    f, _ = open_regular(path, max_bytes=max_bytes, what="manifest")
    with f:
        data = f.read(max_bytes + 1)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexDirError(f"{path}: cannot read the manifest ({e})") from None


# --------------------------------------------------------------------------- reading the manifest
def read_manifest(index_dir: str, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> dict:
    """INDEX_DIR/manifest.json (a regular file of at most MAX_MANIFEST_BYTES), its fields checked.
    versions: the format versions accepted (format 1 only by --upgrade). IndexDirError."""
    if not os.path.isdir(index_dir):
        raise IndexDirError(f"{index_dir}: no such index folder (make one with python -m runtime.index)")
    path = os.path.join(index_dir, MANIFEST_FILE)
    try:
        manifest = _read_json_bounded(path, MAX_MANIFEST_BYTES)
    except PartMissing:
        if os.path.lexists(os.path.join(index_dir, LOCK_FILE)):
            raise IndexDirError(f"{path}: missing; the index is being built, or its build was interrupted "
                                f"(python -m runtime.index)") from None
        raise IndexDirError(f"{path}: missing; not an index folder written by python -m runtime.index") from None
    problem = _manifest_problem(manifest, versions, index_dir)
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


def check_model(model_dir: str, manifest: dict, index_dir: str) -> None:
    """IndexDirError unless MODEL_DIR is the model the index was built with (its manifest's SHA-256)."""
    recorded = manifest["model"]
    if model_manifest_sha256(model_dir) != recorded["manifest_sha256"]:
        raise IndexDirError(
            f"{model_dir}: not the model {index_dir} was built with (the index records model manifest "
            f"SHA-256 {recorded['manifest_sha256'][:12]}..., from {model_dir_of(index_dir, manifest)}); search "
            f"with that model or rebuild the index")


def first_stage_name(scorer) -> str:
    """What the first stage's vectors are, as an index manifest records it."""
    if scorer.has_global_head:
        return f"the model's global head (image_global / text_global), {scorer.global_size} values"
    return "mean of the item's embeddings, l2-normalised"


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _file_entry_ok(entry) -> bool:
    if not (isinstance(entry, dict) and _is_int(entry.get("size"), 1) and SHA256.fullmatch(str(entry.get("sha256")))):
        return False
    if "blocks" not in entry and "block_bytes" not in entry:
        return True
    size, blocks = entry.get("block_bytes"), entry.get("blocks")
    return _is_int(size, 4096) and size % 4096 == 0 and HASH_CHUNK % size == 0 and isinstance(blocks, list) and \
        len(blocks) == -(-entry["size"] // size) and all(isinstance(b, str) and SHA256.fullmatch(b) for b in blocks)


def _manifest_problem(m, versions: tuple[int, ...], index_dir: str) -> str | None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"not an {FORMAT} manifest"
    version = m.get("format_version")
    if version == 1 and 1 not in versions:
        return (f"format version 1: its parts carry no sizes or SHA-256; record them with {UPGRADE} {index_dir} "
                f"(after making sure the files are the ones built), or rebuild the index")
    if version not in versions:
        return f"format version {version!r} is not supported (this runtime reads {FORMAT_VERSION})"
    if m.get("kind") not in KINDS or m.get("dtype") not in DTYPES:
        return f"kind must be one of {KINDS} and dtype one of {DTYPES}"
    model = m.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("dir"), str) or \
            not SHA256.fullmatch(str(model.get("manifest_sha256"))) or \
            not _is_int(model.get("embed_size"), 1):
        return "model must be {dir: str, manifest_sha256: 64 hex digits, embed_size: int}"
    if not _is_int(m.get("projection_size", 0)):
        return "projection_size must be an integer >= 0 (0: projections not stored)"
    parts = m.get("parts")
    if not isinstance(parts, list) or not parts:
        return "parts must be a non-empty list"
    suffixes = part_suffixes(m)
    for p in parts:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or \
                not PART_FILE.fullmatch(f"{p['name']}.ids.txt") or \
                not _is_int(p.get("n_items"), 1) or not _is_int(p.get("n_vectors"), 1):
            return "parts must hold {name: part-<12 hex digits>, n_items: int >= 1, n_vectors: int >= 1}"
        if version >= 2:
            files = p.get("files")
            if not isinstance(files, dict) or set(files) != set(suffixes) or \
                    not all(_file_entry_ok(files[s]) for s in suffixes):
                return (f"part {p['name']}: files must hold {{size, sha256}} for each of {', '.join(suffixes)} "
                        f"and nothing else")
    names = [p["name"] for p in parts]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        return f"part {twice} is listed {names.count(twice)} times; every part is listed once"
    if "n_items" in m and m["n_items"] != sum(p["n_items"] for p in parts):
        return f"n_items {m['n_items']!r} is not the sum of its parts' ({sum(p['n_items'] for p in parts)})"
    if m["kind"] == "images" and not _is_int(m.get("n_region"), 1):
        return "n_region must be an integer >= 1 for an image index"
    f = m.get("faiss")
    if f is not None and not (isinstance(f, dict) and isinstance(f.get("factory"), str) and
                              isinstance(f.get("params"), str) and FAISS_FILE.fullmatch(str(f.get("file"))) and
                              (version < 2 or _file_entry_ok(f))):
        return "faiss must be {factory: str, file: faiss-<12 hex digits>.index, params: str, size: int, sha256: str}"
    return None


# --------------------------------------------------------------------------- reading parts
class PartFiles(dict):
    """One part's arrays: {"embs", "global", "proj" (memory maps of the open files), "offsets"
    (in memory), "ids" (a list of str), "files" ({suffix: the open file object} of embs.npy,
    global.npy and proj.npy)}. The files stay open as long as the part is referenced: a writer
    deleting them later changes nothing here."""

    def __init__(self, **items):
        super().__init__(**items)
        self.pending = {}  # suffix -> the SHA-256 check still to do (open_part(lazy=True))

    def check(self, *suffixes: str) -> None:
        """Do the SHA-256 (and finite floats) checks still pending for these files, once. IndexDirError."""
        for suffix in suffixes:
            if suffix in self.pending:
                verify_file(*self.pending[suffix])
                self.pending.pop(suffix, None)

    def check_rows(self, suffix: str, starts: np.ndarray, counts: np.ndarray) -> None:
        """Before rows starts[i] .. starts[i] + counts[i] - 1 of SUFFIX (a .npy with block hashes) are
        read: check the SHA-256 (and finite floats) of the blocks they lie in, each once per process;
        a file without block hashes is checked whole (``check``). IndexDirError."""
        if suffix not in self.pending:
            return
        f, st, path, _, float_from, dtype, _, entry = self.pending[suffix]
        if "blocks" not in entry:
            return self.check(suffix)
        matrix = self[suffix.split(".")[0]]
        row_bytes, size = matrix.shape[1] * matrix.itemsize, entry["block_bytes"]
        first = (matrix.offset + starts * row_bytes) // size
        last = (matrix.offset + (starts + counts) * row_bytes - 1) // size
        lengths = last - first + 1
        wanted = np.unique(np.repeat(first, lengths) + np.arange(lengths.sum()) -
                           np.repeat(np.cumsum(lengths) - lengths, lengths))
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, entry["sha256"])
        if key in _VERIFIED:  # the whole file was checked
            self.pending.pop(suffix, None)
            return
        for block in wanted:
            if (key, int(block)) in _VERIFIED:
                continue
            data = os.pread(f.fileno(), size, int(block) * size)
            check_block(path, int(block), data, entry["blocks"])
            skip = max(0, float_from - int(block) * size)
            if not np.isfinite(np.frombuffer(data[skip:], dtype=dtype)).all():
                raise IndexDirError(f"{path}: holds NaN or infinite values (rebuild the index)")
            _VERIFIED.add((key, int(block)))

    def close(self) -> None:
        for f in self.get("files", {}).values():
            f.close()


def _open_npy(index_dir: str, part: dict, suffix: str, shape: tuple, dtype: str, verify: bool, files: dict,
              force: bool = False, pending: dict | None = None):
    """The part's SUFFIX .npy opened, checked (size, header, shape, dtype, SHA-256, finite floats) and
    memory-mapped from the open file. ``shape``'s None axes take any size. pending: where to leave
    the SHA-256 check for later (PartFiles.check) instead of doing it now."""
    path = part_file(index_dir, part["name"], suffix)
    entry = part.get("files", {}).get(suffix)
    f, st = open_regular(path, size=entry["size"] if entry else None, what="part file")
    files[suffix] = f
    got_shape, got_dtype, offset = read_npy_header(f, path, st.st_size)
    if len(got_shape) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got_shape)) or \
            got_dtype != np.dtype(dtype):
        want = tuple("any" if w is None else w for w in shape)
        raise IndexDirError(f"{path}: {got_dtype} {got_shape}, the manifest says {dtype} {want}")
    if verify and entry:
        floats = np.dtype(dtype) if np.dtype(dtype).kind == "f" else None
        check = (f, st, path, entry["sha256"], offset if floats is not None else None, floats, force, entry)
        if pending is None:
            verify_file(*check)
        else:
            pending[suffix] = check
    return np.memmap(f, dtype=got_dtype, mode="r", offset=offset, shape=got_shape)


def open_part(index_dir: str, part: dict, d: int, dtype: str, global_d: int | None = None,
              proj_size: int = 0, verify: bool = True, force: bool = False, lazy: bool = False) -> PartFiles:
    """One part's files opened and checked against the manifest entry ``part`` (see PartFiles).
    d: the embeddings' width; global_d: the first-stage vectors' (None: any); proj_size: the stored
    projections' P (0: none). verify: check each file's SHA-256 (once per process; ``force``: again);
    lazy: check embs.npy, global.npy and proj.npy only when ``PartFiles.check`` asks (a search, before
    it reads them), offsets and ids now. PartMissing when a file is gone; IndexDirError naming the
    file otherwise."""
    name, n, n_vec = part["name"], part["n_items"], part["n_vectors"]
    out = PartFiles(files={})
    pending = out.pending if lazy else None
    try:
        out["embs"] = _open_npy(index_dir, part, "embs.npy", (n_vec, d), dtype, verify, out["files"], force, pending)
        out["global"] = _open_npy(index_dir, part, "global.npy", (n, global_d), "float32", verify, out["files"], force,
                                  pending)
        out["proj"] = _open_npy(index_dir, part, PROJ, (n_vec, proj_size), dtype, verify, out["files"],
                                force, pending) if proj_size else None
        offsets = np.array(_open_npy(index_dir, part, "offsets.npy", (n + 1,), "int64", verify, out["files"], force))
        path = part_file(index_dir, name, "offsets.npy")
        if offsets[0] != 0 or offsets[-1] != n_vec or (np.diff(offsets) < 1).any():
            raise IndexDirError(f"{path}: offsets must rise from 0 to {n_vec}, at least 1 vector per item")
        out["offsets"] = offsets
        out["ids"] = _read_ids(index_dir, part, n, verify, out["files"], force)
        for suffix in ("offsets.npy", "ids.txt"):  # read whole: their files need not stay open
            out["files"].pop(suffix).close()
    except BaseException:
        out.close()
        raise
    return out


def allow_open_files(n: int) -> None:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) to n + 256 where the hard limit
    allows: an Index holds 2 or 3 files open per part."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _read_ids(index_dir: str, part: dict, n: int, verify: bool, files: dict, force: bool = False) -> list[str]:
    path = part_file(index_dir, part["name"], "ids.txt")
    entry = part.get("files", {}).get("ids.txt")
    # format 1 (upgrade only): no recorded size; at most 64 KiB an id
    f, st = open_regular(path, size=entry["size"] if entry else None, max_bytes=None if entry else n << 16,
                         what="ids file")
    files["ids.txt"] = f
    if verify and entry:
        verify_file(f, st, path, entry["sha256"], force=force)
    data = os.pread(f.fileno(), st.st_size, 0)
    try:
        ids = [json.loads(line) for line in data.decode("utf-8").split("\n")[:-1]] if data.endswith(b"\n") else None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexDirError(f"{path}: cannot read the ids, one JSON string a line ({e})") from None
    if ids is None or len(ids) != n or not all(isinstance(i, str) for i in ids):
        found = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
        raise IndexDirError(f"{path}: expected {n} ids (JSON strings, one a line), found {found} lines")
    return ids


def read_ids(index_dir: str, manifest: dict) -> list[str]:
    """Every id of the index, in row order (each ids.txt checked like a reader's)."""
    out = []
    for part in manifest["parts"]:
        files = {}
        try:
            out += _read_ids(index_dir, part, part["n_items"], True, files)
        finally:
            for f in files.values():
                f.close()
    return out


def hash_file(path: str, blocks: bool = False) -> dict:
    """{"size", "sha256"} of a file (read as a regular file of the folder); with ``blocks`` also
    "block_bytes" and "blocks", each BLOCK_BYTES block's SHA-256 (as PartWriter records for embs.npy
    and proj.npy)."""
    f, _ = open_regular(path)
    digests = Digests(blocks)
    with f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digests.update(chunk)
    return digests.entry()


def verify_faiss(index_dir: str, entry: dict, force: bool = False) -> None:
    """The FAISS file's size and SHA-256 as the manifest's faiss entry records (format 2)."""
    path = os.path.join(index_dir, entry["file"])
    f, st = open_regular(path, size=entry.get("size"), what="FAISS file")
    with f:
        if "sha256" in entry:
            verify_file(f, st, path, entry["sha256"], force=force)
