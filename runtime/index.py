"""Encode a gallery once into an index folder, for ``python -m runtime.search`` / ``runtime.Index``.

    python -m runtime.index IMAGES --model MODEL_DIR --out INDEX_DIR [--dtype float32|float16]
                            [--overwrite | --append [--skip-existing]] [--wait SECONDS]
                            [--store-projections] [--faiss FACTORY [--faiss-params PARAMS]]
    python -m runtime.index CAPTIONS.txt --model MODEL_DIR --out INDEX_DIR --captions [--append]
    python -m runtime.index --verify INDEX_DIR       # every file's size and SHA-256, shapes, ids
    python -m runtime.index --upgrade INDEX_DIR      # a format 1 index: record its files' hashes

    from runtime.index import build
    build("gallery_index", region_feats, model_dir="runs/default/model")         # an image index
    build("gallery_index", more_feats, append=True)                              # the index's model
    runtime.Index("gallery_index").append(more_feats)                            # the same, then reloaded

IMAGES: region features (.npy (n, n_region, img_dim), memory-mapped, read a batch at a time) or
pictures (a folder, a .txt list of paths, one picture; needs a model exported with
--feature-extractor), as runtime.score reads them. CAPTIONS.txt: one caption a line.

What is stored per item (runtime.indexdir): its region (word) embeddings, in --dtype, and its
first-stage vector (float32: the model dir's global head's (export.global_head) when it has one,
else the mean of those embeddings, l2-normalised); its id: the picture's
path relative to the folder or list given (a folder's photos/a.png and more/a.png stay apart;
one picture: its file name), "FEATURES.npy:ROW", or the caption. With --store-projections also the per-item
projections the matcher takes (P = 4d values per region or word for mode full, in --dtype: the
index 5x larger); without, a search recomputes them for the shortlist. Measured
(benchmarks/README.md): at d = 1024 recomputing them is the largest share of a query, at d = 64
a few ms. --faiss FACTORY also builds an approximate first stage (runtime.faiss_stage).

--append adds items without re-encoding the old ones (a new part + a manifest swap); the model
is then the index's own unless --model names the same one. Items whose id the index already
holds are refused (one line), or with --skip-existing left out (a note says how many). An
existing index at --out is replaced only with --overwrite (the old one stays searchable until
the new manifest is in place, and open readers keep theirs); a folder that is not an index is
refused. One writer at a time (runtime.indexdir: the write protocol): a second one is refused
in one line naming the holder, or with --wait SECONDS waits that long for it (default 0: the
caller decides whether to wait; a note says it waits). A failed or interrupted build or append
leaves the previous index complete and usable, and nothing of its own (a killed one's files are
removed by the next writer). Bad input: one "error: ..." line, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import numpy as np

from . import cli, faiss_stage
from .engine import DEVICES, IMAGE_BATCH, MAX_IMAGE_BATCH, MAX_THREADS, DeviceError
from .faiss_stage import FaissError
from .images import ImageError
from .indexdir import (DTYPES, FORMAT, FORMAT_VERSION, LOCK_FILE, MANIFEST_FILE, PROJ, IndexDirError, PartWriter,
                       check_model, commit, first_stage_name, hash_file, model_dir_of, open_part, owned_name, part_file,
                       part_suffixes, read_ids, read_manifest, relative_model_dir, remove_strays, verify_faiss,
                       writer_lock)
from .inputs import InputError, check_captions, check_region_feats, image_paths_or_none, open_images, read_captions
from .modeldir import DEFAULT_MODEL_DIR, ModelDirError, model_manifest_sha256
from .scorer import Scorer

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


def _write_images(writer: PartWriter, scorer: Scorer, items, paths, ids, tick, rows=None) -> None:
    """rows: the rows of region features ``items`` to write (None: all)."""
    n_region = scorer.feature_grid ** 2 if paths is not None else items.shape[1]
    per_value = scorer.img_dim + scorer.embed_size + (scorer.projection_size if writer.proj else 0)
    size = scorer.image_batch if paths is not None else max(1, BATCH_BYTES // (4 * n_region * per_value))
    for i, j in _batches(len(ids), size):
        if paths is not None:
            embs = scorer.encode_image_files(paths[i:j])
        else:
            embs = scorer.encode_images(items[i:j] if rows is None else items[rows[i:j]], check=False)
        proj = _projections(writer, scorer, "region", embs)
        writer.add(embs.reshape(-1, embs.shape[2]), np.full(j - i, n_region), scorer.first_stage_vectors(embs), ids[i:j],
                   None if proj is None else proj.reshape(-1, proj.shape[2]))
        tick(j)


def _write_captions(writer: PartWriter, scorer: Scorer, captions, ids, tick) -> None:
    for i, j in _batches(len(captions), CAPTION_BATCH):
        embs, lengths = scorer.encode_captions(captions[i:j])
        mask = np.arange(embs.shape[1])[None, :] < lengths[:, None]
        proj = _projections(writer, scorer, "word", embs)
        writer.add(embs[mask], lengths, scorer.first_stage_vectors(embs, lengths), ids[i:j],
                   None if proj is None else proj[mask])
        tick(j)


def build(index_dir: str | os.PathLike, items, model_dir: str | os.PathLike | None = None, captions: bool = False,
          append: bool = False, dtype: str | None = None, ids: Sequence[str] | None = None, name: str = "items",
          store_projections: bool | None = None, faiss: str | None = None, faiss_params: str | None = None,
          device: str = "auto",
          threads: int | None = None, image_batch: int = IMAGE_BATCH,
          progress: Callable[[int, int], None] | None = None, overwrite: bool = False, skip_existing: bool = False,
          wait: float = 0.0, note: Callable[[str], None] | None = None, scorer: Scorer | None = None,
          report: dict | None = None) -> dict:
    """Encode ``items`` into INDEX_DIR (a new index, with ``overwrite`` a replacement, or with
    ``append`` more items); returns the new manifest.

    items: captions (a list of str) with ``captions``, else region features (n, n_region,
    img_dim) or a list of picture paths. model_dir: None for DEFAULT_MODEL_DIR, or with
    ``append`` or ``overwrite`` the index's own. dtype: "float32" or "float16" for the embeddings
    (None: float32, or the index's). ids: one str per item (default: the caption, the picture path,
    "row I", I the item's row in the index). name: what error messages call the items. store_projections: also store each region's (word's)
    projections, the matcher's per-item inputs (None: False, or with ``append`` the index's choice);
    the model's matcher must take them. faiss: a FAISS index_factory string (runtime.faiss_stage):
    also build an approximate first stage (None: none, or with ``append`` the index's, extended);
    faiss_params: its default search parameters ("nprobe=64"; None: "" or the index's).
    overwrite: replace an existing index (else refused: cli.UserError). skip_existing: with
    ``append``, leave out items whose id the index already holds (else refused: IndexDirError).
    wait: seconds to wait for another writer's lock (runtime.indexdir.writer_lock; 0: refused at
    once, IndexBusy). note(text): told when waiting and when items are skipped. scorer: a Scorer of
    the model to encode with (None: made here). report: filled with {"added", "skipped"}.
    progress(done, total) after each batch. IndexDirError, InputError, ModelDirError, FaissError, ValueError.
    """
    index_dir = os.fspath(index_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if append and overwrite:
        raise ValueError("overwrite replaces an index, append adds to it: give one of them")
    _check_target(index_dir, append)  # before the lock creates anything
    with writer_lock(index_dir, wait, note) as created:
        try:
            return _build_locked(index_dir, items, model_dir, captions, append, dtype, ids, name, store_projections,
                                 faiss, faiss_params, device, threads, image_batch, progress, overwrite, skip_existing,
                                 note or (lambda text: None), scorer, {} if report is None else report)
        except BaseException:
            if not os.path.lexists(os.path.join(index_dir, MANIFEST_FILE)):
                _remove_unfinished(index_dir, created)  # a failed new build leaves nothing
            raise


def _build_locked(index_dir, items, model_dir, captions, append, dtype, ids, name, store_projections, faiss,
                  faiss_params, device, threads, image_batch, progress, overwrite, skip_existing, note, scorer,
                  report) -> dict:
    """``build`` holding the writer lock."""
    old = _existing(index_dir, append, overwrite)
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
    if old is not None and old is not BROKEN and append and ids is not None and not skip_existing:
        _refuse_ids_there(index_dir, old, list(ids), name)  # at once, before the model is loaded
    if old is BROKEN:  # replaced with overwrite; its files are removed at the commit
        old = None
    else:
        if old is not None and model_dir is None:  # a rebuild: the index's own model
            model_dir = model_dir_of(index_dir, old)
        remove_strays(index_dir, old)  # what killed writers left (only the lock holder writes)
    model_dir = os.fspath(DEFAULT_MODEL_DIR if model_dir is None else model_dir)
    dtype = dtype or "float32"
    if scorer is None:
        scorer = Scorer(model_dir, device=device, threads=threads, image_batch=image_batch)
    if store_projections and not scorer.projected:
        raise ModelDirError(f"{model_dir}: its matcher takes no projections (exported with --matcher plain, or "
                            f"K = 1); build the index without --store-projections")
    proj_size = scorer.projection_size if store_projections else 0
    faiss_entry = _faiss_setting(old if append else None, faiss, faiss_params, scorer.global_size, index_dir)
    paths = rows = None
    if captions:
        items = check_captions(items, name)
        n_region = None
    else:
        paths = image_paths_or_none(items)
        if paths is None:
            items = check_region_feats(items, scorer.img_dim, name)
            n_region = items.shape[1]
        else:
            scorer.require_feature_extractor()
            n_region = scorer.feature_grid ** 2
    n = len(items)
    first = old["n_items"] if old is not None and append else 0  # default ids of features: their rows in the index
    ids = list(ids) if ids is not None else (list(items) if captions else paths or [f"row {first + i}" for i in range(n)])
    if len(ids) != n or not all(isinstance(i, str) for i in ids):
        raise InputError(f"ids: expected {n} strings, one per item")
    if old is not None and append and old.get("n_region") != n_region:
        raise InputError(f"{index_dir}: its images have {old['n_region']} regions, these {n_region}")
    report.update(added=0, skipped=0)
    if old is not None and append:
        there = _refuse_ids_there(index_dir, old, ids, name) if not skip_existing else \
            [k for k, i in enumerate(ids) if i in set(read_ids(index_dir, old))]
        if there:
            rows = np.setdiff1d(np.arange(n), there)
            note(f"skipped {len(there)} of the {n} items: their ids are already in {index_dir}")
            report["skipped"] = len(there)
            if not len(rows):
                note(f"nothing to append to {index_dir}")
                return old
            ids = [ids[k] for k in rows]
            if captions or paths is not None:
                items = [items[k] for k in rows]
                paths = items if paths is not None else None
                rows = None
            n = len(ids)
    n_vectors = int(scorer.tokenize(items, name)[1].sum()) if captions else n_region * n

    writer = faiss_file = None
    try:
        writer = PartWriter(index_dir, n, n_vectors, scorer.embed_size, dtype, scorer.global_size, proj_size)
        tick = (lambda done: progress(done, n)) if progress else (lambda done: None)
        if captions:
            _write_captions(writer, scorer, items, ids, tick)
        else:
            _write_images(writer, scorer, items, paths, ids, tick, rows)
        part = writer.close()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "dtype": dtype,
                    "n_region": n_region, "first_stage": first_stage_name(scorer), "projection_size": proj_size,
                    "model": {"dir": relative_model_dir(model_dir, index_dir),
                              "manifest_sha256": model_manifest_sha256(model_dir),
                              "embed_size": scorer.embed_size, "mode": scorer.mode, "n_steps": scorer.n_steps},
                    "parts": (old["parts"] if append else []) + [part]}
        manifest["n_items"] = sum(p["n_items"] for p in manifest["parts"])
        if faiss_entry is not None:
            faiss_file = _write_faiss(index_dir, faiss_entry, old if append else None, part, scorer.global_size)
            manifest["faiss"] = {**faiss_entry, "file": faiss_file,
                                 **hash_file(os.path.join(index_dir, faiss_file))}
        commit(index_dir, manifest)
        report["added"] = n
        return manifest
    except BaseException:
        if writer is not None and not _listed(index_dir, writer.name):  # not interrupted after the commit
            writer.remove()
        if faiss_file is not None and os.path.exists(os.path.join(index_dir, faiss_file)):
            os.remove(os.path.join(index_dir, faiss_file))
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


def _refuse_ids_there(index_dir: str, old: dict, ids: list, name: str) -> list:
    """IndexDirError when one of ``ids`` is already in the index (else [])."""
    held = set(read_ids(index_dir, old))
    there = [k for k, i in enumerate(ids) if i in held]
    if there:
        raise IndexDirError(f"{name}: {len(there)} of the {len(ids)} items are already in {index_dir} (id "
                            f"{cli.printable(str(ids[there[0]])[:80])!r}{' and more' if len(there) > 1 else ''}); "
                            f"leave them out, or add --skip-existing to append only the others")
    return there


BROKEN = {"parts": []}  # _existing: an index whose manifest cannot be read (replaced with overwrite only)


def _listed(index_dir: str, part_name: str) -> bool:
    """Does the manifest now in INDEX_DIR list the part (was it committed)?"""
    try:
        return any(p["name"] == part_name for p in read_manifest(index_dir)["parts"])
    except (IndexDirError, OSError):
        return False


def _foreign(index_dir: str) -> list[str]:
    """Names in INDEX_DIR that no index writer makes."""
    return [f for f in os.listdir(index_dir) if f != MANIFEST_FILE and not owned_name(f)]


def _check_target(index_dir: str, append: bool) -> None:
    """Before taking the lock (which creates INDEX_DIR): refuse a file, a folder that is not an
    index, and an append to no index, touching nothing."""
    if os.path.lexists(index_dir) and not os.path.isdir(index_dir):
        raise IndexDirError(f"{index_dir}: exists and is not an index folder; refusing to write into it")
    if os.path.isdir(index_dir) and not os.path.lexists(os.path.join(index_dir, MANIFEST_FILE)) and \
            _foreign(index_dir):
        raise IndexDirError(f"{index_dir}: exists and is not an index folder; refusing to write into it")
    if append and not os.path.lexists(os.path.join(index_dir, MANIFEST_FILE)):
        raise IndexDirError(f"{index_dir}: no index to append to (build one first, without --append)")


def _existing(index_dir: str, append: bool, overwrite: bool) -> dict | None:
    """Holding the lock: the manifest of the index at INDEX_DIR; None where there is none yet (a new,
    empty or unfinished folder); BROKEN for an unreadable one being replaced. Refuses (cli.UserError)
    to replace an index without ``overwrite``; IndexDirError for a folder that is not an index, or
    no index to append to."""
    if not os.path.lexists(os.path.join(index_dir, MANIFEST_FILE)):
        if _foreign(index_dir):
            raise IndexDirError(f"{index_dir}: exists and is not an index folder; refusing to write into it")
        if append:
            raise IndexDirError(f"{index_dir}: no index to append to (build one first, without --append)")
        return None
    if not append and not overwrite:
        cli.refuse_replacing("--out", index_dir)
    try:
        return read_manifest(index_dir)
    except IndexDirError:
        if append:
            raise
        return BROKEN


def _remove_unfinished(index_dir: str, created: bool) -> None:
    """Holding the lock, after a failed new build: remove its files, the lock file and, if this build
    created it, the folder (a waiting writer then takes the lock anew: writer_lock)."""
    remove_strays(index_dir, None)
    try:
        os.remove(os.path.join(index_dir, LOCK_FILE))
        if created:
            os.rmdir(index_dir)
    except OSError:
        pass


# --------------------------------------------------------------------------- verify, upgrade
def verify(index_dir: str | os.PathLike) -> str:
    """Check every file of the index as a reader would and more: each part file's size and SHA-256
    (hashed again, whatever this process checked before), .npy headers, shapes, offsets, ids,
    finite floats, the FAISS file's hash. Returns a one-line summary; IndexDirError naming the
    first file that is wrong."""
    index_dir = os.fspath(index_dir)
    m = read_manifest(index_dir)
    d, n_region, files = m["model"]["embed_size"], m.get("n_region"), 0
    for p in m["parts"]:
        part = open_part(index_dir, p, d, m["dtype"], None, m.get("projection_size", 0), force=True)
        try:
            if m["kind"] == "images" and (np.diff(part["offsets"]) != n_region).any():
                raise IndexDirError(f"{part_file(index_dir, p['name'], 'offsets.npy')}: an image item has not "
                                    f"{n_region} regions (n_region)")
            files += len(part_suffixes(m))
        finally:
            part.close()
    if m.get("faiss"):
        verify_faiss(index_dir, m["faiss"], force=True)
        files += 1
    return (f"{index_dir}: {m['n_items']} {m['kind']} in {len(m['parts'])} part(s), {files} files: sizes and "
            f"SHA-256 as the manifest records, headers, shapes, offsets and ids consistent, floats finite")


def upgrade(index_dir: str | os.PathLike, wait: float = 0.0, note: Callable[[str], None] | None = None) -> str:
    """Record the sizes and SHA-256 of a format 1 index's files in its manifest (format 2), holding
    the writer lock; the files are checked as far as format 1 allows first. Returns a one-line summary."""
    index_dir = os.fspath(index_dir)
    read_manifest(index_dir, versions=(1, FORMAT_VERSION))  # an index (nothing created for a typo)
    with writer_lock(index_dir, wait, note):
        m = read_manifest(index_dir, versions=(1, FORMAT_VERSION))
        if m["format_version"] == FORMAT_VERSION:
            return f"{index_dir}: already format {FORMAT_VERSION}; nothing to do"
        d = m["model"]["embed_size"]
        for p in m["parts"]:
            open_part(index_dir, p, d, m["dtype"], None, m.get("projection_size", 0), verify=False).close()
            p["files"] = {s: hash_file(part_file(index_dir, p["name"], s), s in ("embs.npy", PROJ))
                          for s in part_suffixes(m)}
        if m.get("faiss"):
            m["faiss"].update(hash_file(os.path.join(index_dir, m["faiss"]["file"])))
        m["format_version"] = FORMAT_VERSION
        m["n_items"] = sum(p["n_items"] for p in m["parts"])
        commit(index_dir, m)
    return f"{index_dir}: format {FORMAT_VERSION}, the size and SHA-256 of its {len(m['parts'])} part(s)' files recorded"


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m runtime.index",
                           description="Encode a gallery of images or captions once into an index folder.")
    p.add_argument("items", metavar="IMAGES|CAPTIONS.txt", nargs="?",
                   help="region features (.npy) or pictures (a folder, a .txt list, one picture); with "
                        "--captions a text file of captions, one a line")
    p.add_argument("--out", metavar="INDEX_DIR")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help=f"folder written by python -m export (default: {DEFAULT_MODEL_DIR}; with --append or "
                        f"--overwrite the index's)")
    p.add_argument("--captions", action="store_true", help="a caption gallery, searched with images")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--append", action="store_true", help="add the items to the index at --out")
    how.add_argument("--overwrite", action="store_true", help="replace the index at --out (else refused)")
    p.add_argument("--skip-existing", action="store_true",
                   help="with --append: leave out items whose id the index already holds (else refused)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another process writing the index (default: 0, refused at once)")
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
    check = p.add_mutually_exclusive_group()
    check.add_argument("--verify", metavar="INDEX_DIR", help="check every file of an index against its manifest "
                       "(sizes, SHA-256, shapes, ids) and say so in one line; nothing is written")
    check.add_argument("--upgrade", metavar="INDEX_DIR", help="record the sizes and SHA-256 of a format 1 index's "
                       "files in its manifest (format 2), as they are now")
    args = p.parse_args(argv)
    if args.verify or args.upgrade:
        flag = "--verify" if args.verify else "--upgrade"
        if args.items is not None or args.out is not None:
            p.error(f"{flag} INDEX_DIR takes no items and no --out")
    elif args.items is None or args.out is None:
        p.error("give the items (IMAGES or CAPTIONS.txt) and --out INDEX_DIR (or --verify / --upgrade INDEX_DIR)")
    if args.skip_existing and not args.append:
        p.error("--skip-existing leaves out items already in the index: give --append too")
    if not args.wait >= 0 or args.wait > 1e9:
        p.error(f"--wait must be a number of seconds >= 0, got {args.wait}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        p.error(f"--threads must be in 1..{MAX_THREADS}, got {args.threads}")
    if not 1 <= args.image_batch <= MAX_IMAGE_BATCH:
        p.error(f"--image-batch must be in 1..{MAX_IMAGE_BATCH}, got {args.image_batch}")
    return args


def _note(text: str) -> None:
    print(f"note: {cli.one_line(text)}", file=sys.stderr, flush=True)


def _main(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    if args.verify or args.upgrade:
        print(verify(args.verify) if args.verify else upgrade(args.upgrade, args.wait, _note))
        return
    if not args.append and not args.overwrite and os.path.lexists(os.path.join(args.out, MANIFEST_FILE)):
        cli.refuse_replacing("--out", args.out)  # before reading the items (build checks again, locked)
    if args.captions:
        items = ids = read_captions(args.items)
    else:  # a .txt is a list of pictures, as runtime.score's IMAGES; captions need --captions
        items, names = open_images(args.items)
        ids = names or [f"{os.path.basename(args.items)}:{i}" for i in range(len(items))]
    progress = cli.Progress("indexing", enabled=not args.quiet)
    manifest = build(args.out, items, args.model, captions=args.captions, append=args.append, dtype=args.dtype,
                     ids=ids, name=args.items, store_projections=args.store_projections, faiss=args.faiss,
                     faiss_params=args.faiss_params, device=args.device, threads=args.threads, image_batch=args.image_batch,
                     progress=lambda done, total: progress(done, total), overwrite=args.overwrite,
                     skip_existing=args.skip_existing, wait=args.wait, note=_note)
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
