"""Index and search benchmark: build rate, size on disk, query latency (shortlist and exhaustive), peak RSS.

    python benchmarks/search.py                                   # d = 64 and d = 1024, 10K / 30K / 100K images
    python benchmarks/search.py --configs default --sizes 10000 --queries 10 --json out.json

For each model (``default``: runs/default/model when it exists, else the same shape with random
weights: d = 64, img_dim 256; ``full``: d = 1024, img_dim 2048, K = 3, Full, random weights):

1. Build: ``python -m runtime.index FEATURES.npy`` on BUILD_IMAGES random feature sets of 36
   regions, in its own process, timed end to end (model loading included): images/s.
2. Each gallery size N: the built index is grown to N images by repeating its encoded rows
   (embeddings as they are; each repeat's first-stage vector gets a little noise, so the first stage
   does not meet thousands of exact ties) -- written with runtime.indexdir like a real part.
   Size on disk. Then, in a fresh process that imports no torch (runtime.Index, memory-mapped):
   one caption a query, --queries of them after one warm-up, at shortlist 100: p50 / p95 of the
   wall-clock latency; the time the re-ranking spends making the shortlist's projections; the
   process's peak RSS (VmHWM).
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

CONFIGS = {  # build images, exhaustive slice
    "default": {"embed_size": 64, "word_dim": 64, "img_dim": 256, "build": 2000, "slice": 1000},
    "full": {"embed_size": 1024, "word_dim": 300, "img_dim": 2048, "build": 500, "slice": 100},
}
N_REGION = 36


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


# --------------------------------------------------------------------------- worker (no torch)
def worker(args) -> None:
    from runtime import Index
    index = Index(args.index, threads=args.threads)
    with open(args.captions, encoding="utf-8") as f:
        captions = [line.strip() for line in f if line.strip()][:args.queries + 1]
    lat, proj, first = [], [], []
    for i, caption in enumerate(captions):
        t0 = time.perf_counter()
        rows, _ = index.search([caption], top_k=10, shortlist=args.shortlist, exhaustive=args.exhaustive)
        dt = time.perf_counter() - t0
        if i:  # the first one warms up
            lat.append(dt)
        if not args.exhaustive and i < 6:
            query = index.encode_queries([caption])
            t0 = time.perf_counter()
            cand = index.first_stage(query["global"], args.shortlist)[0][0]
            first.append(time.perf_counter() - t0)
            items, _ = index.gather(np.sort(cand))
            t0 = time.perf_counter()
            index.scorer.project("region", items)
            proj.append(time.perf_counter() - t0)
    print(json.dumps({"latency_s": lat, "projection_s": float(np.median(proj)) if proj else None,
                      "first_stage_s": float(np.median(first)) if first else None,
                      "peak_rss_mb": peak_rss_mb(), "torch_loaded": "torch" in sys.modules, "n": len(index)}))


def run_worker(index: str, captions: str, queries: int, shortlist: int, exhaustive: bool, threads) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--index", index, "--captions", captions,
           "--queries", str(queries), "--shortlist", str(shortlist)] + (["--exhaustive"] if exhaustive else []) + \
          (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- setup (torch)
def model_dir_for(name: str, work: str) -> tuple[str, str]:
    """(model dir, where it came from)."""
    trained = os.path.join(ROOT, "runs", "default", "model")
    if name == "default" and os.path.exists(os.path.join(trained, "manifest.json")):
        return trained, "trained runs/default/model"
    import torch
    from export.__main__ import main as export_main
    from imram_min.checkpoint import save_checkpoint
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
    with contextlib.redirect_stdout(io.StringIO()):
        export_main([ckpt, "--out", out, "--no-verify"])
    return out, "random weights"


def grow(src: str, dst: str, n: int, seed: int = 0) -> None:
    """An index of n images at dst: src's rows repeated (first-stage vectors with a little noise)."""
    from runtime import indexdir
    m = indexdir.read_manifest(src)
    part = indexdir.open_part(src, m["parts"][0], m["model"]["embed_size"], m["dtype"])
    n_src, rng = len(part["ids"]), np.random.default_rng(seed)
    os.makedirs(dst)
    writer = indexdir.PartWriter(dst, n, n * m["n_region"], m["model"]["embed_size"], m["dtype"])
    for i in range(0, n, n_src):
        k = min(n_src, n - i)
        g = part["global"][:k] + (rng.normal(0, 0.02, (k, part["global"].shape[1])) if i else 0)
        g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
        writer.add(part["embs"][:k * m["n_region"]], np.full(k, m["n_region"]), g, [f"rep{i // n_src}:{j}" for j in range(k)])
    indexdir.commit(dst, {**m, "parts": [writer.close()], "n_items": n})


def slice_index(src: str, dst: str, n: int) -> None:
    from runtime import indexdir
    m = indexdir.read_manifest(src)
    part = indexdir.open_part(src, m["parts"][0], m["model"]["embed_size"], m["dtype"])
    os.makedirs(dst)
    writer = indexdir.PartWriter(dst, n, n * m["n_region"], m["model"]["embed_size"], m["dtype"])
    writer.add(part["embs"][:n * m["n_region"]], np.full(n, m["n_region"]), part["global"][:n], part["ids"][:n])
    indexdir.commit(dst, {**m, "parts": [writer.close()], "n_items": n})


def bench_config(name: str, args, work: str) -> list[dict]:
    c = CONFIGS[name]
    model, origin = model_dir_for(name, work)
    from runtime.modeldir import load_manifest
    img_dim = load_manifest(model)["model_config"]["img_dim"]
    feats = os.path.join(work, "feats.npy")
    np.save(feats, np.random.default_rng(0).normal(0, 1, (c["build"], N_REGION, img_dim)).astype(np.float32))
    built = os.path.join(work, f"{name}_built")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "runtime.index", feats, "--model", model, "--out", built, "--quiet",
                    "--dtype", args.dtype],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    build_rate = c["build"] / (time.perf_counter() - t0)
    os.remove(feats)
    sliced = os.path.join(work, f"{name}_slice")
    slice_index(built, sliced, c["slice"])
    ex = run_worker(sliced, args.captions, max(2, args.queries // 5), 100, True, args.threads)
    per_item = float(np.median(ex["latency_s"])) / c["slice"]
    rows = []
    for n in args.sizes:
        big = os.path.join(work, f"{name}_{n}")
        grow(built, big, n)
        q = run_worker(big, args.captions, args.queries, 100, False, args.threads)
        p50, p95 = (float(np.percentile(q["latency_s"], p)) for p in (50, 95))
        row = {"model": name, "weights": origin, "d": c["embed_size"], "dtype": args.dtype, "images": n, "build_images_per_s": build_rate,
               "size_mb": folder_mb(big), "p50_ms": 1e3 * p50, "p95_ms": 1e3 * p95,
               "projection_ms": 1e3 * q["projection_s"], "first_stage_ms": 1e3 * q["first_stage_s"], "exhaustive_ms": 1e3 * per_item * n,
               "exhaustive_from": f"{c['slice']} images, extrapolated", "speedup": per_item * n / p50,
               "peak_rss_mb": q["peak_rss_mb"], "torch_loaded": q["torch_loaded"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(big)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="default,full")
    p.add_argument("--sizes", default="10000,30000,100000")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored embeddings")
    p.add_argument("--captions", default=os.path.join(ROOT, "data", "synthetic", "test_caps.txt"))
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    p.add_argument("--shortlist", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--exhaustive", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="search-bench-", dir=args.work)
    try:
        rows = [r for name in args.configs.split(",") for r in bench_config(name, args, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n| model | images | build img/s | size on disk | p50 | p95 | first stage | projections | exhaustive | x | peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| d = {r['d']} ({r['weights']}) | {r['images']:,} | {r['build_images_per_s']:.0f} | "
              f"{r['size_mb']:,.0f} MB | {r['p50_ms']:.1f} ms | {r['p95_ms']:.1f} ms | {r['first_stage_ms']:.1f} ms | "
              f"{r['projection_ms']:.1f} ms | "
              f"{r['exhaustive_ms'] / 1e3:,.1f} s | {r['speedup']:,.0f} | {r['peak_rss_mb']:,.0f} MB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
