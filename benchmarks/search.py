"""Index and search benchmark: build rate, size on disk, query latency (shortlist and exhaustive), peak RSS.

    python benchmarks/search.py                                   # d = 64 and d = 1024, 10K / 30K / 100K images
    python benchmarks/search.py --configs default,full,full+proj:float16 --sizes 100000
    python benchmarks/search.py --configs default --sizes 10000 --queries 10 --json out.json

Configurations NAME[+proj][:DTYPE]: ``default``: runs/default/model_head (the trained d = 64 model
with its distilled global head) when it exists, else the same shape with random weights (d = 64,
img_dim 256); ``full``: d = 1024, img_dim 2048, K = 3, Full, random weights and a random global
head. ``+proj``: the index stores the projections (``runtime.index --store-projections``); DTYPE:
the stored embeddings' (and projections') dtype (default --dtype). ``--first-stage mean`` uses models
without a global head (the first stage: the mean embeddings, d values an item).

1. Build: ``python -m runtime.index FEATURES.npy`` on BUILD_IMAGES random feature sets of 36
   regions, in its own process, timed end to end (model loading included): images/s.
2. Each gallery size N: the built index is grown to N images by repeating its encoded rows
   (embeddings and projections as they are; each repeat's first-stage vector gets a little noise,
   so the first stage does not meet thousands of exact ties) -- written with runtime.indexdir like
   a real part. Size on disk. Then, in a fresh process that imports no torch (runtime.Index,
   memory-mapped): one caption a query, --queries of them after one warm-up, at shortlist 100:
   p50 / p95 of the wall-clock latency, and for the first PROFILED queries the median of each step
   of a search (encoding the caption, the first stage, reading the shortlist from the index, making
   its projections where the index does not store them, the matcher); the process's peak RSS (VmHWM).
   The baseline, in the same process after those: each query again, once with the first stage's
   product made by numpy (OpenBLAS, whose threads spin ~0.1 s after each product) and once by
   ``Engine.matmul`` (ONNX Runtime, whose threads sleep once done), in alternating order: the two
   p50 and their ratio.
3. Exhaustive: timed on an index of the first SLICE images of the built one (every item
   scored by the matcher), per image, and extrapolated linearly to N (it is linear in N).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from runtime.cli import ArgumentParser  # noqa: E402  (a bad flag: one error line, exit 2)

CONFIGS = {  # build images, exhaustive slice
    "default": {"embed_size": 64, "word_dim": 64, "img_dim": 256, "build": 2000, "slice": 1000},
    "full": {"embed_size": 1024, "word_dim": 300, "img_dim": 2048, "build": 500, "slice": 100},
}
N_REGION = 36
PROFILED = 6  # queries whose steps are timed one by one


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


# --------------------------------------------------------------------------- worker (no torch)
def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def profile(index, caption: str, shortlist: int) -> dict:
    """The steps of ``index.search([caption], shortlist=...)``, each timed (seconds)."""
    query, t_encode = timed(index.encode_queries, [caption])
    (cand, _), t_first = timed(index.first_stage, query["global"], shortlist)
    (items, counts, proj), t_gather = timed(index.gather, np.sort(cand[0]))
    t_proj = None
    if proj is None:
        proj, t_proj = timed(index.scorer.project, "region", items)
    _, t_match = timed(index.score_items, query, slice(0, 1), items, counts, proj)
    return {"encode": t_encode, "first_stage": t_first, "gather": t_gather, "projections": t_proj, "matcher": t_match}


def worker(args) -> None:
    from runtime import Index
    from runtime.memory import retain_freed_memory
    retain_freed_memory()  # as python -m runtime.search does
    index = Index(args.index, threads=args.threads)
    with open(args.captions, encoding="utf-8") as f:
        captions = [line.strip() for line in f if line.strip()][:args.queries + 1]
    lat, steps = [], []
    for i, caption in enumerate(captions):
        t0 = time.perf_counter()
        index.search([caption], top_k=10, shortlist=args.shortlist, exhaustive=args.exhaustive)
        dt = time.perf_counter() - t0
        if i:  # the first one warms up
            lat.append(dt)
        if not args.exhaustive and i < PROFILED:
            steps.append(profile(index, caption, args.shortlist))
    medians = {k: None if steps[0][k] is None else float(np.median([s[k] for s in steps]))
               for k in (steps[0] if steps else ())}
    paired = {"onnxruntime": [], "numpy": []}  # the first stage's product: Engine.matmul or numpy's (baseline)
    products = [("onnxruntime", index.scorer.matmul), ("numpy", np.matmul)]
    for i, caption in enumerate(captions[1:] if not args.exhaustive else ()):
        for name, product in products[::-1] if i % 2 else products:
            index.scorer.matmul = product
            t0 = time.perf_counter()
            index.search([caption], top_k=10, shortlist=args.shortlist)
            paired[name].append(time.perf_counter() - t0)
    print(json.dumps({"latency_s": lat, "steps_s": medians, "peak_rss_mb": peak_rss_mb(), "paired_s": paired,
                      "torch_loaded": "torch" in sys.modules, "n": len(index), "device": index.scorer.device}))


def run_worker(index: str, captions: str, queries: int, shortlist: int, exhaustive: bool, threads) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--index", index, "--captions", captions,
           "--queries", str(queries), "--shortlist", str(shortlist)] + (["--exhaustive"] if exhaustive else []) + \
          (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if out.returncode:
        said = (out.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise SystemExit(f"error: the query process on {index} ended with exit status {out.returncode}: {said}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- setup (torch)
def model_dir_for(name: str, work: str, head: bool) -> tuple[str, str]:
    """(model dir, where it came from). head: a model dir with a global head (the first stage's
    256-wide vectors: the trained runs/default/model_head for ``default`` when it exists, else a
    random GlobalHead of its default size), else the mean embeddings' first stage."""
    trained = os.path.join(ROOT, "runs", "default", "model_head" if head else "model")
    if name == "default" and os.path.exists(os.path.join(trained, "manifest.json")):
        return trained, "trained runs/default/" + os.path.basename(trained)
    import torch
    from export.__main__ import main as export_main
    from imram_min.engineering.checkpoint import save_checkpoint
    from imram_min.search.global_head import GlobalHead, save_head
    from imram_min.model import IMRAM, IMRAMConfig
    from runtime.text import Vocabulary
    vocab_file = os.path.join(ROOT, "data", "synthetic", "vocab.json")
    vocab = Vocabulary.load(vocab_file) if os.path.exists(vocab_file) else Vocabulary(f"w{i}" for i in range(500))
    c = CONFIGS[name]
    torch.manual_seed(0)
    model = IMRAM(IMRAMConfig(vocab_size=len(vocab), img_dim=c["img_dim"], word_dim=c["word_dim"],
                              embed_size=c["embed_size"], n_steps=3, mode="full")).eval()
    ckpt, out = os.path.join(work, f"{name}.pt"), os.path.join(work, f"{name}_model")
    save_checkpoint(ckpt, model, vocab, meta={"note": "random weights, for timing"})
    extra = []
    if head:
        extra = ["--global-head", os.path.join(work, f"{name}_head.pt")]
        save_head(GlobalHead(c["embed_size"]), extra[1], meta={"note": "random weights, for timing"})
    with contextlib.redirect_stdout(io.StringIO()):
        export_main([ckpt, "--out", out, "--no-verify"] + extra)
    return out, "random weights" + (" + random global head" if head else "")


def grow(src: str, dst: str, n: int, seed: int = 0) -> None:
    """An index of n images at dst: the first n of src's rows, repeated as often as needed to make n
    (first-stage vectors of every repeat after the first with a little noise)."""
    from runtime import Index, indexdir
    index = Index(src, device="cpu")
    m, part = index.manifest, index.parts[0]
    n_src, n_region, rng = len(part["ids"]), m["n_region"], np.random.default_rng(seed)
    os.makedirs(dst)
    writer = indexdir.PartWriter(dst, n, n * n_region, m["model"]["embed_size"], m["dtype"], part["global"].shape[1],
                                 m.get("projection_size", 0))
    for i in range(0, n, n_src):
        k = min(n_src, n - i)
        g = part["global"][:k] + (rng.normal(0, 0.02, (k, part["global"].shape[1])) if i else 0)
        g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
        writer.add(part["embs"][:k * n_region], np.full(k, n_region), g,
                   part["ids"][:k] if n <= n_src else [f"rep{i // n_src}:{j}" for j in range(k)],
                   None if part["proj"] is None else part["proj"][:k * n_region])
    indexdir.commit(dst, {**m, "parts": [writer.close()], "n_items": n})
    os.sync()  # queries are timed on a built index, not while the kernel still writes out its 37 GB


def parse_config(spec: str, dtype: str) -> dict:
    """NAME[+proj][:DTYPE] -> {"name", "base", "proj", "dtype"}."""
    name, _, spec_dtype = spec.partition(":")
    base, _, flag = name.partition("+")
    if base not in CONFIGS or flag not in ("", "proj") or spec_dtype not in ("", "float32", "float16"):
        raise SystemExit(f"error: --configs: {spec!r} is not NAME[+proj][:float32|float16], NAME one of {list(CONFIGS)}")
    return {"name": spec, "base": base, "proj": flag == "proj", "dtype": spec_dtype or dtype}


def bench_config(spec: dict, args, work: str, models: dict) -> list[dict]:
    c = {**CONFIGS[spec["base"]], **{k: getattr(args, k) for k in ("build", "slice") if getattr(args, k)}}
    if spec["base"] not in models:
        models[spec["base"]] = model_dir_for(spec["base"], work, args.first_stage == "head")
    model, origin = models[spec["base"]]
    from runtime.modeldir import load_manifest
    img_dim = load_manifest(model)["model_config"]["img_dim"]
    feats = os.path.join(work, "feats.npy")
    np.save(feats, np.random.default_rng(0).normal(0, 1, (c["build"], N_REGION, img_dim)).astype(np.float32))
    built = os.path.join(work, "built")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "runtime.index", feats, "--model", model, "--out", built, "--quiet",
                    "--dtype", spec["dtype"]] + (["--store-projections"] if spec["proj"] else []),
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    build_rate = c["build"] / (time.perf_counter() - t0)
    os.remove(feats)
    sliced = os.path.join(work, "slice")
    grow(built, sliced, c["slice"])
    ex = run_worker(sliced, args.captions, max(2, args.queries // 5), 100, True, args.threads)
    shutil.rmtree(sliced)
    per_item = float(np.median(ex["latency_s"])) / c["slice"]
    rows = []
    for n in args.sizes:
        big = os.path.join(work, f"n{n}")
        grow(built, big, n)
        q = run_worker(big, args.captions, args.queries, 100, False, args.threads)
        p50, p95 = (float(np.percentile(q["latency_s"], p)) for p in (50, 95))
        ours, base = (1e3 * float(np.median(q["paired_s"][k])) for k in ("onnxruntime", "numpy"))
        row = {"config": spec["name"], "weights": origin, "d": c["embed_size"], "dtype": spec["dtype"],
               "projections_stored": spec["proj"], "first_stage": args.first_stage, "images": n, "device": q["device"],
               "build_images_per_s": build_rate, "size_mb": folder_mb(big), "bytes_per_image": 1e6 * folder_mb(big) / n,
               "p50_ms": 1e3 * p50, "p95_ms": 1e3 * p95, "paired_p50_ms": {"onnxruntime": ours, "numpy": base},
               "steps_ms": {k: None if v is None else 1e3 * v for k, v in q["steps_s"].items()},
               "exhaustive_ms": 1e3 * per_item * n, "exhaustive_from": f"{c['slice']} images, extrapolated",
               "speedup": per_item * n / p50, "peak_rss_mb": q["peak_rss_mb"], "torch_loaded": q["torch_loaded"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(big)
    shutil.rmtree(built)
    return rows


def ms(value) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def paired(p50: dict) -> str:
    return f"{ms(p50['onnxruntime'])} / {ms(p50['numpy'])} ({p50['numpy'] / p50['onnxruntime']:.2f})"


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="default,full", help="NAME[+proj][:DTYPE], comma-separated")
    p.add_argument("--sizes", default="10000,30000,100000")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--build", type=int, default=None, help="images built (default: the config's, 2,000 or 500)")
    p.add_argument("--slice", type=int, default=None, help="images timed exhaustively (default: 1,000 or 100)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored embeddings")
    p.add_argument("--first-stage", default="head", choices=["head", "mean"],
                   help="the models' global head (256 values an item) or the mean embeddings (d values)")
    p.add_argument("--captions", default=os.path.join(ROOT, "data", "synthetic", "test_caps.txt"))
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file (else refused)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    p.add_argument("--shortlist", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--exhaustive", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    p.check_output_file(args.json, "--json", args.overwrite)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated image counts, got {args.sizes!r}")
    for flag in ("sizes", "queries", "build", "slice", "threads"):
        values = getattr(args, flag)
        if any(v is not None and v < 1 for v in (values if isinstance(values, list) else [values])):
            p.error(f"--{flag} must be >= 1, got {values}")
    try:
        with open(args.captions, encoding="utf-8") as f:
            if not any(line.strip() for line in f):
                p.error(f"--captions {args.captions}: no captions in it")
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"--captions {args.captions}: cannot be read ({e})")
    specs = [parse_config(c, args.dtype) for c in args.configs.split(",")]
    print(f"load average {os.getloadavg()[0]:.2f}; first stage: {args.first_stage}", flush=True)
    work, models = tempfile.mkdtemp(prefix="search-bench-", dir=args.work), {}
    try:
        rows = [r for spec in specs for r in bench_config(spec, args, work, models)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("\n| config | images | build img/s | size on disk | bytes/image | p50 | p95 | paired p50: ours / numpy product (x) | "
          "encode | first stage | read | "
          "projections | matcher | exhaustive | x | peak RSS |")
    print("| --- |" + " ---: |" * 15)
    for r in rows:
        st = r["steps_ms"]
        print(f"| {r['config']} d = {r['d']} {r['dtype']} ({r['weights']}), {r['device']} | {r['images']:,} | "
              f"{r['build_images_per_s']:.0f} | {r['size_mb']:,.0f} MB | {r['bytes_per_image'] / 1e3:,.1f} KB | "
              f"{ms(r['p50_ms'])} | {ms(r['p95_ms'])} | {paired(r['paired_p50_ms'])} | "
              f"{ms(st['encode'])} | {ms(st['first_stage'])} | "
              f"{ms(st['gather'])} | {ms(st['projections'])} | {ms(st['matcher'])} | "
              f"{r['exhaustive_ms'] / 1e3:,.1f} s | {r['speedup']:,.0f} | {r['peak_rss_mb']:,.0f} MB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
