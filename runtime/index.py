"""Encode a gallery once into an index folder, for ``python -m runtime.search`` / ``runtime.Index``.

    python -m runtime.index IMAGES --model MODEL_DIR --out INDEX_DIR [--dtype float32|float16] [--append]
                            [--store-projections] [--faiss FACTORY [--faiss-params PARAMS]]
    python -m runtime.index CAPTIONS.txt --model MODEL_DIR --out INDEX_DIR --captions [--append]

    from runtime.index import build
    build("gallery_index", region_feats, model_dir="runs/default/model")         # an image index
    build("gallery_index", more_feats, append=True)                              # the index's model

IMAGES: region features (.npy (n, n_region, img_dim), memory-mapped, read a batch at a time) or
pictures (a folder, a .txt list of paths, one picture; needs a model exported with
--feature-extractor), as runtime.score reads them. CAPTIONS.txt: one caption a line.

What is stored per item (runtime.indexdir): its region (word) embeddings, in --dtype, and its
first-stage vector (float32: the model dir's global head's (export.global_head) when it has one,
else the mean of those embeddings, l2-normalised); its id: the picture's
file name, "FEATURES.npy:ROW", or the caption. With --store-projections also the per-item
projections the matcher takes (P = 4d values per region or word for mode full, in --dtype: the
index 5x larger); without, a search recomputes them for the shortlist. Measured
(benchmarks/README.md): at d = 1024 recomputing them is the largest share of a query, at d = 64
a few ms. --faiss FACTORY also builds an approximate first stage (runtime.faiss_stage).

--append adds items without re-encoding the old ones (a new part + a manifest swap); the model
is then the index's own unless --model names the same one. Without --append an existing index
at --out is replaced (the old one stays searchable until the new manifest is in place); a
folder that is not an index is refused. A failed or interrupted build or append leaves the
previous index complete and usable. Bad input: one "error: ..." line, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import numpy as np

from . import cli, faiss_stage
from .faiss_stage import FaissError
from .images import ImageError
from .indexdir import (DTYPES, FORMAT, FORMAT_VERSION, MANIFEST_FILE, IndexDirError, PartWriter, commit,
                       model_dir_of, move_into_place, new_folder_beside, part_file, read_manifest, relative_model_dir,
                       remove_folder)
from .inputs import check_captions, check_region_feats, image_paths_or_none
from .modeldir import DEFAULT_MODEL_DIR, ModelDirError
from .scorer import DEVICES, IMAGE_BATCH, MAX_IMAGE_BATCH, MAX_THREADS, DeviceError, InputError, Scorer
from .search import check_model, first_stage_name, model_manifest_sha256

BATCH_BYTES = 64 << 20  # features + embeddings of one batch of images, at most
CAPTION_BATCH = 1024  # captions encoded at a time


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield i, min(i + size, n)


def _projections(writer: PartWriter, scorer: Scorer, side: str, embs: np.ndarray) -> np.ndarray | None:
    """The projections of the embeddings as the index stores them (rounded to its dtype, so that a
    float16 index's stored projections are those a search would make from its embeddings); None
    when the part stores none."""
    return scorer.project(side, embs.astype(writer.dtype, copy=False)) if writer.proj else None


def _write_images(writer: PartWriter, scorer: Scorer, items, paths, ids, tick) -> None:
    n_region = scorer.feature_grid ** 2 if paths is not None else items.shape[1]
    per_value = scorer.img_dim + scorer.embed_size + (scorer.projection_size if writer.proj else 0)
    size = scorer.image_batch if paths is not None else max(1, BATCH_BYTES // (4 * n_region * per_value))
    for i, j in _batches(len(ids), size):
        if paths is not None:
            embs = scorer.encode_image_files(paths[i:j])
        else:
            embs = scorer.encode_images(items[i:j], check=False)
        proj = _projections(writer, scorer, "region", embs)
        writer.add(embs.reshape(-1, embs.shape[2]), np.full(j - i, n_region), scorer.global_vectors(embs), ids[i:j],
                   None if proj is None else proj.reshape(-1, proj.shape[2]))
        tick(j)


def _write_captions(writer: PartWriter, scorer: Scorer, captions, ids, tick) -> None:
    for i, j in _batches(len(captions), CAPTION_BATCH):
        embs, lengths = scorer.encode_captions(captions[i:j])
        mask = np.arange(embs.shape[1])[None, :] < lengths[:, None]
        proj = _projections(writer, scorer, "word", embs)
        writer.add(embs[mask], lengths, scorer.global_vectors(embs, lengths), ids[i:j],
                   None if proj is None else proj[mask])
        tick(j)


def build(index_dir: str | os.PathLike, items, model_dir: str | os.PathLike | None = None, captions: bool = False,
          append: bool = False, dtype: str | None = None, ids: Sequence[str] | None = None, name: str = "items",
          store_projections: bool | None = None, faiss: str | None = None, faiss_params: str | None = None,
          device: str = "auto",
          threads: int | None = None, image_batch: int = IMAGE_BATCH,
          progress: Callable[[int, int], None] | None = None) -> dict:
    """Encode ``items`` into INDEX_DIR (a new index, a replacement, or with ``append`` more items);
    returns the new manifest.

    items: captions (a list of str) with ``captions``, else region features (n, n_region,
    img_dim) or a list of picture paths. model_dir: None for DEFAULT_MODEL_DIR, or with
    ``append`` the index's own. dtype: "float32" or "float16" for the embeddings (None: float32, or
    the index's). ids: one str per item (default: the caption, the picture path, "row I").
    name: what error messages call the items. store_projections: also store each region's (word's)
    projections, the matcher's per-item inputs (None: False, or with ``append`` the index's choice);
    the model's matcher must take them. faiss: a FAISS index_factory string (runtime.faiss_stage):
    also build an approximate first stage (None: none, or with ``append`` the index's, extended);
    faiss_params: its default search parameters ("nprobe=64"; None: "" or the index's).
    progress(done, total) after each batch. IndexDirError, InputError, ModelDirError, FaissError, ValueError.
    """
    index_dir = os.fspath(index_dir)
    old = _existing(index_dir, append)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kind = "captions" if captions else "images"
    if old is not None and append:
        if old["kind"] != kind:
            raise IndexDirError(f"{index_dir}: an index of {old['kind']}, cannot append {kind}"
                                f"{' (leave out --captions)' if captions else ' (add --captions)'}")
        if dtype is not None and dtype != old["dtype"]:
            raise IndexDirError(f"{index_dir}: stores {old['dtype']}, cannot append {dtype}")
        dtype = old["dtype"]
        stored = bool(old.get("projection_size", 0))
        if store_projections is not None and store_projections != stored:
            raise IndexDirError(f"{index_dir}: {'stores' if stored else 'does not store'} the projections; "
                                f"append {'with' if stored else 'without'} --store-projections")
        store_projections = stored
        model_dir = model_dir_of(index_dir, old) if model_dir is None else os.fspath(model_dir)
        check_model(model_dir, old, index_dir)
    model_dir = os.fspath(DEFAULT_MODEL_DIR if model_dir is None else model_dir)
    dtype = dtype or "float32"
    scorer = Scorer(model_dir, device=device, threads=threads, image_batch=image_batch)
    if store_projections and not scorer.projected:
        raise ModelDirError(f"{model_dir}: its matcher takes no projections (exported with --matcher plain, or "
                            f"K = 1); build the index without --store-projections")
    proj_size = scorer.projection_size if store_projections else 0
    faiss_entry = _faiss_setting(old if append else None, faiss, faiss_params, scorer.global_size, index_dir)
    paths = None
    if captions:
        items = check_captions(items, name)
        n_vectors = int(scorer.tokenize(items, name)[1].sum())
        n_region = None
    else:
        paths = image_paths_or_none(items)
        if paths is None:
            items = check_region_feats(items, scorer.img_dim, name)
            n_region = items.shape[1]
        else:
            scorer.require_feature_extractor()
            n_region = scorer.feature_grid ** 2
        n_vectors = n_region * len(items)
    n = len(items)
    ids = list(ids) if ids is not None else (list(items) if captions else paths or [f"row {i}" for i in range(n)])
    if len(ids) != n or not all(isinstance(i, str) for i in ids):
        raise InputError(f"ids: expected {n} strings, one per item")
    if old is not None and append and old.get("n_region") != n_region:
        raise InputError(f"{index_dir}: its images have {old['n_region']} regions, these {n_region}")

    target = index_dir if old is not None else new_folder_beside(index_dir)
    writer = faiss_file = None
    try:
        writer = PartWriter(target, n, n_vectors, scorer.embed_size, dtype, scorer.global_size, proj_size)
        tick = (lambda done: progress(done, n)) if progress else (lambda done: None)
        if captions:
            _write_captions(writer, scorer, items, ids, tick)
        else:
            _write_images(writer, scorer, items, paths, ids, tick)
        part = writer.close()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "dtype": dtype,
                    "n_region": n_region, "first_stage": first_stage_name(scorer), "projection_size": proj_size,
                    "model": {"dir": relative_model_dir(model_dir, index_dir),
                              "manifest_sha256": model_manifest_sha256(model_dir),
                              "embed_size": scorer.embed_size, "mode": scorer.mode, "n_steps": scorer.n_steps},
                    "parts": (old["parts"] if append else []) + [part]}
        manifest["n_items"] = sum(p["n_items"] for p in manifest["parts"])
        if faiss_entry is not None:
            faiss_file = _write_faiss(target, faiss_entry, old if append else None, part, scorer.global_size)
            manifest["faiss"] = {**faiss_entry, "file": faiss_file}
        commit(target, manifest)
        if old is None:
            move_into_place(target, index_dir)
        return manifest
    except BaseException:
        if writer is not None and old is not None:
            writer.remove()
            if faiss_file is not None and os.path.exists(os.path.join(target, faiss_file)):
                os.remove(os.path.join(target, faiss_file))
        if old is None:
            remove_folder(target)
        raise


def _faiss_setting(old: dict | None, factory: str | None, params: str | None, d: int, index_dir: str) -> dict | None:
    """The index's FAISS entry to be, {"factory", "params"} (its file still to write), or None; the
    factory and parameters are checked before anything is encoded. old: the manifest appended to."""
    before = (old or {}).get("faiss")
    if old is not None and factory is not None and factory != (before or {}).get("factory"):
        raise IndexDirError(f"{index_dir}: " + (f"its FAISS index is {before['factory']!r}" if before else
                                                "has no FAISS index") + "; to change that rebuild it without --append")
    factory = factory if before is None else before["factory"]
    if factory is None:
        if params is not None:
            raise FaissError("--faiss-params needs --faiss (a FAISS index to search with them)")
        return None
    params = params if params is not None else before["params"] if before else ""
    faiss_stage.set_params(faiss_stage.new_index(factory, d), params)
    return {"factory": factory, "params": params}


def _write_faiss(target: str, entry: dict, old: dict | None, part: dict, d: int) -> str:
    """Write the FAISS index of the first-stage vectors (old's, with the new part's added) under a new
    name in TARGET; returns the file name."""
    if old is not None and "faiss" in old:
        index = faiss_stage.read(target, old["faiss"], old["n_items"], d)
    else:
        index = faiss_stage.new_index(entry["factory"], d)
    faiss_stage.add_vectors(index, np.load(part_file(target, part["name"], "global.npy"), mmap_mode="r"))
    return faiss_stage.write(index, target)


def _existing(index_dir: str, append: bool) -> dict | None:
    """The manifest of the index at INDEX_DIR, None where there is none yet (absent or an empty
    folder); IndexDirError for a folder that is not an index, or no index to append to."""
    if os.path.isdir(index_dir) and os.path.exists(os.path.join(index_dir, MANIFEST_FILE)):
        return read_manifest(index_dir)
    if os.path.exists(index_dir) and (not os.path.isdir(index_dir) or os.listdir(index_dir)):
        raise IndexDirError(f"{index_dir}: exists and is not an index folder; refusing to write into it")
    if append:
        raise IndexDirError(f"{index_dir}: no index to append to (build one first, without --append)")
    return None


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m runtime.index",
                           description="Encode a gallery of images or captions once into an index folder.")
    p.add_argument("items", metavar="IMAGES|CAPTIONS.txt",
                   help="region features (.npy) or pictures (a folder, a .txt list, one picture); with "
                        "--captions a text file of captions, one a line")
    p.add_argument("--out", required=True, metavar="INDEX_DIR")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help=f"folder written by python -m export (default: {DEFAULT_MODEL_DIR}; with --append the index's)")
    p.add_argument("--captions", action="store_true", help="a caption gallery, searched with images")
    p.add_argument("--append", action="store_true", help="add the items to the index at --out")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="stored embeddings (default: float32)")
    p.add_argument("--store-projections", action="store_true", default=None,
                   help="also store each region's (word's) projections, the matcher's per-item inputs: "
                        "a faster re-ranking at d = 1024, an index 5x larger (with --append: the index's choice)")
    p.add_argument("--faiss", metavar="FACTORY", help="also build an approximate first stage with FAISS (optional "
                   "package), e.g. IVF4096,Flat or HNSW32 (with --append: the index's, extended)")
    p.add_argument("--faiss-params", metavar="PARAMS", help="its default search parameters, e.g. nprobe=64")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threads", type=int, default=None, metavar="T", help=f"1..{MAX_THREADS}")
    p.add_argument("--image-batch", type=int, default=IMAGE_BATCH, metavar="N", help=f"1..{MAX_IMAGE_BATCH}")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    args = p.parse_args(argv)
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        p.error(f"--threads must be in 1..{MAX_THREADS}, got {args.threads}")
    if not 1 <= args.image_batch <= MAX_IMAGE_BATCH:
        p.error(f"--image-batch must be in 1..{MAX_IMAGE_BATCH}, got {args.image_batch}")
    return args


def _main(argv: Sequence[str] | None) -> None:
    from .score import Progress, open_images, read_captions
    args = parse_args(argv)
    if args.captions:
        items = ids = read_captions(args.items)
    else:  # a .txt is a list of pictures, as runtime.score's IMAGES; captions need --captions
        items, names = open_images(args.items)
        ids = names or [f"{os.path.basename(args.items)}:{i}" for i in range(len(items))]
    progress = Progress("indexing", enabled=not args.quiet)
    manifest = build(args.out, items, args.model, captions=args.captions, append=args.append, dtype=args.dtype,
                     ids=ids, name=args.items, store_projections=args.store_projections, faiss=args.faiss,
                     faiss_params=args.faiss_params, device=args.device, threads=args.threads, image_batch=args.image_batch,
                     progress=lambda done, total: progress(done, total))
    progress.close()
    if not args.quiet:
        size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
        stored = ", projections stored" if manifest["projection_size"] else ""
        print(f"{args.out}: {manifest['n_items']} {manifest['kind']} in {len(manifest['parts'])} part(s), "
              f"{manifest['dtype']}{stored}, {size / 1e6:.1f} MB", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv, user_errors=(InputError, ModelDirError, DeviceError, ImageError, IndexDirError,
                                             FaissError))


if __name__ == "__main__":
    sys.exit(main())
