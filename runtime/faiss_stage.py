"""An approximate first stage with FAISS: optional (``pip install 'imram-min[faiss]'``), imported
only here and only when asked for; the default first stage is the exact numpy scan (runtime.search).

    python -m runtime.index IMAGES --model MODEL_DIR --out INDEX_DIR --faiss IVF4096,Flat --faiss-params nprobe=64
    python -m runtime.search INDEX_DIR QUERIES --first-stage faiss [--faiss-params nprobe=128]

--faiss takes a FAISS ``index_factory`` string (e.g. "IVF4096,Flat", "HNSW32"); the index is built
over every item's first-stage vector with inner product (the vectors are l2-normalised: cosines),
trained (IVF) on all of them, and written to INDEX_DIR/faiss-ID.index, which the index manifest
lists with the factory string and default search parameters (a FAISS ParameterSpace string such as
"nprobe=64" or "efSearch=128"). --append adds the new items to a copy of it (an IVF index keeps the
centroids of its first build); like a part, the copy is written under a new name and becomes the
index's by the manifest swap. Where the approximate first stage pays, measured:
benchmarks/first_stage.py and benchmarks/README.md.
"""
from __future__ import annotations

import os
import secrets

import numpy as np

from .indexdir import IndexDirError

INSTALL = "pip install 'faiss-cpu>=1.15,<1.16' (the project's faiss extra)"
TRAIN_PER_LIST = 64  # IVF training: at most this many vectors per list (FAISS warns below 39)


class FaissError(ValueError):
    """FAISS is not installed, or a factory / parameter string it does not accept."""


def import_faiss():
    """The faiss module; FaissError saying how to install it when it is not."""
    try:
        import faiss
    except ImportError:
        raise FaissError(f"FAISS is not installed: {INSTALL}, or use the exact first stage") from None
    return faiss


def new_index(factory: str, d: int):
    """An empty FAISS index of ``factory`` for d-wide vectors, inner product. FaissError for a bad string."""
    faiss = import_faiss()
    try:
        return faiss.index_factory(int(d), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise FaissError(f"--faiss: {factory!r} is not a FAISS index_factory string ({_reason(e)})") from None


def set_params(index, params: str) -> None:
    """Apply a ParameterSpace string ("nprobe=64", "efSearch=128", "" for none). FaissError."""
    if not params:
        return
    faiss = import_faiss()
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as e:
        raise FaissError(f"--faiss-params: {params!r} does not fit this FAISS index ({_reason(e)})") from None


def _reason(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return " ".join((lines[-1] if lines else str(error)).split())[:200]


def add_vectors(index, vectors: np.ndarray) -> None:
    """Add the vectors (n, G) (the next rows), training the index on them first if it needs it."""
    faiss = import_faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.max_points_per_centroid = TRAIN_PER_LIST
            if len(x) < ivf.nlist:
                raise FaissError(f"--faiss: {ivf.nlist} lists need at least as many items to train on, "
                                 f"the index has {len(x)}")
        index.train(x)
    index.add(x)


def write(index, folder: str) -> str:
    """Write ``index`` to FOLDER/faiss-ID.index (a new name), fsynced; returns the file name."""
    faiss = import_faiss()
    name = f"faiss-{secrets.token_hex(6)}.index"
    path = os.path.join(folder, name)
    faiss.write_index(index, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return name


def read(folder: str, entry: dict, n_items: int, d: int):
    """The FAISS index the manifest's ``entry`` lists, checked to hold n_items d-wide vectors. IndexDirError."""
    faiss = import_faiss()
    path = os.path.join(folder, entry["file"])
    if not os.path.isfile(path):
        raise IndexDirError(f"{path}: missing from the index folder")
    try:
        index = faiss.read_index(path)
    except RuntimeError as e:
        raise IndexDirError(f"{path}: cannot read as a FAISS index ({_reason(e)})") from None
    if index.ntotal != n_items or index.d != d:
        raise IndexDirError(f"{path}: {index.ntotal} vectors of {index.d}, the manifest says {n_items} of {d}")
    return index


def search(index, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The (approximately) n rows of highest inner product per query: (rows (Q, n) int64, scores (Q, n)).
    Rows FAISS could not fill (fewer than n found) are -1."""
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), int(n))
    return rows.astype(np.int64), scores
