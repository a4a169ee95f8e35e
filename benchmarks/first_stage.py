"""First stage: exact numpy top-N (runtime.search.exact_top) against approximate FAISS indexes
(runtime.faiss_stage; needs the optional faiss package): latency of one query, recall, build time.

    python benchmarks/first_stage.py                                      # d = 256 and 64, 100K .. 3M vectors
    python benchmarks/first_stage.py --dims 256 --sizes 100000,1000000 --factories IVF,HNSW32 --json out.json

Per width G and gallery size N: N random unit vectors (Gaussian, l2-normalised; seeded) written as
an index part's global.npy (float32), read back by the exact scan from the file (page cache), as
runtime.Index does. Queries: a gallery vector plus Gaussian noise, l2-normalised, cosine
QUERY_COS with it on average (a query with one true match, the rest of the gallery random).
Uniform random vectors have no structure for an approximate index to use (the worst case); with
``--cluster-size M`` the gallery is N / M random unit centres, each item a centre plus Gaussian
noise, cosine CLUSTER_COS with it (a structured gallery: the exact top-N is mostly the query's cluster).

- exact: runtime.search.exact_top per query; its top-N is the reference.
- each FAISS factory (``IVF``: IVF{nlist},Flat with nlist ~ 4 sqrt(N) rounded to a power of 2, at
  most MAX_NLIST, trained on at most 64 vectors a list; any other index_factory string as given), built in memory
  with inner product, timed; then for each search parameter (nprobe, efSearch) of a sweep: recall
  (the share of the exact top-N it returns, mean over the queries), hit (queries whose true match it
  returns) and the latency of one query (median).

The table: per (G, N) exact's p50 and, for each recall target (and for keeping the true match of
HIT of the queries), the fastest FAISS setting reaching it, its p50 and the ratio exact / FAISS
(> 1: FAISS is faster). The sweep of a factory stops at the first setting of recall >= 0.99.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUERY_COS = 0.6
CLUSTER_COS = 0.7
MAX_NLIST = 4096  # IVF lists at most (training k-means on 64 x 8192 vectors took too long here)
CHUNK = 1 << 18  # vectors generated at a time
TARGETS = (0.9, 0.95, 0.99)  # recall of the exact top-N
HIT = 0.99  # share of queries whose true match FAISS returns (or the exact top-N's share, if lower)
SWEEP = {"nprobe": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), "efSearch": (100, 128, 192, 256, 384, 512, 768, 1024)}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def noisy(x: np.ndarray, cos: float, rng) -> np.ndarray:
    """unit(x + Gaussian noise), of cosine ~cos with the unit vectors x."""
    r = np.sqrt(1 / cos ** 2 - 1)  # |noise| for that cosine
    return unit(x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(r / np.sqrt(x.shape[1])))


def write_gallery(path: str, n: int, d: int, seed: int, cluster_size: int = 0) -> np.memmap:
    from runtime.indexdir import NpyStream
    rng, stream = np.random.default_rng(seed), NpyStream(path, (n, d), "float32")
    centres = unit(rng.standard_normal((max(1, n // cluster_size), d), dtype=np.float32)) if cluster_size else None
    for i in range(0, n, CHUNK):
        k = min(CHUNK, n - i)
        if centres is None:
            stream.write(unit(rng.standard_normal((k, d), dtype=np.float32)))
        else:
            stream.write(noisy(centres[rng.integers(len(centres), size=k)], CLUSTER_COS, rng))
    stream.close()
    return np.load(path, mmap_mode="r")


def make_queries(gallery: np.ndarray, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries (Q, G), their true matches (Q,)): gallery rows + noise of cosine ~QUERY_COS."""
    rng = np.random.default_rng(seed + 1)
    truth = np.sort(rng.choice(len(gallery), n_queries, replace=False))
    return noisy(np.asarray(gallery[truth]), QUERY_COS, rng), truth


def latency(fn, queries: np.ndarray) -> tuple[float, list]:
    """(median seconds of fn(one query), the results), after one warm-up call."""
    fn(queries[:1])
    times, out = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q[None]))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def factory_for(name: str, n: int) -> str:
    if name == "IVF":
        return f"IVF{min(MAX_NLIST, 2 ** int(round(np.log2(4 * np.sqrt(n)))))},Flat"
    return name


def bench(d: int, n: int, args, work: str) -> dict:
    from runtime import faiss_stage
    from runtime.search import exact_top
    gallery = write_gallery(os.path.join(work, "global.npy"), n, d, args.seed, args.cluster_size)
    queries, truth = make_queries(gallery, args.queries, args.seed)
    k = args.shortlist
    exact_s, exact_out = latency(lambda q: exact_top([gallery], [0], q, k)[0][0], queries)
    ref = [set(r.tolist()) for r in exact_out]
    row = {"d": d, "n": n, "cluster_size": args.cluster_size, "shortlist": k, "queries": args.queries, "exact_ms": 1e3 * exact_s,
           "exact_hit": float(np.mean([t in r for t, r in zip(truth, ref)])), "faiss": []}
    print(f"G = {d}, N = {n:,}: exact {1e3 * exact_s:.2f} ms, hit {row['exact_hit']:.3f}", flush=True)
    for name in args.factories.split(","):
        if name.startswith("HNSW") and n > args.hnsw_max:
            continue
        factory = factory_for(name, n)
        index = faiss_stage.new_index(factory, d)
        t0 = time.perf_counter()
        faiss_stage.add_vectors(index, gallery)
        build_s = time.perf_counter() - t0
        param = "nprobe" if factory.startswith("IVF") else "efSearch" if factory.startswith("HNSW") else None
        values = [v for v in SWEEP[param] if param != "nprobe" or v <= index.nlist] if param else [None]
        for v in values:
            if v is not None:
                faiss_stage.set_params(index, f"{param}={v}")
            s, out = latency(lambda q: faiss_stage.search(index, q, k)[0][0], queries)
            recall = float(np.mean([len(ref[i] & set(o.tolist())) / k for i, o in enumerate(out)]))
            hit = float(np.mean([t in set(o.tolist()) for t, o in zip(truth, out)]))
            entry = {"factory": factory, "param": None if v is None else f"{param}={v}", "build_s": build_s,
                     "ms": 1e3 * s, "recall": recall, "hit": hit, "speedup": exact_s / s}
            row["faiss"].append(entry)
            print(f"  {factory} {entry['param'] or ''}: build {build_s:.1f} s, {1e3 * s:.3f} ms, recall {recall:.3f}, "
                  f"hit {hit:.3f}, x{exact_s / s:.1f}", flush=True)
            if recall >= max(TARGETS):
                break
        del index
    del gallery
    os.remove(os.path.join(work, "global.npy"))
    return row


def best_at(row: dict, target: float, key: str = "recall") -> dict | None:
    ok = [e for e in row["faiss"] if e[key] >= target]
    return min(ok, key=lambda e: e["ms"]) if ok else None


def table(rows: list[dict]) -> None:
    goals = [(t, "recall") for t in TARGETS] + [(HIT, "hit")]
    print("\n| G | N | exact p50 | " + " | ".join(f"{k} >= {t}: fastest FAISS, p50, x exact" for t, k in goals) + " |")
    print("| ---: | ---: | ---: |" + " --- |" * len(goals))
    for r in rows:
        cells = []
        for t, k in goals:
            b = best_at(r, min(t, r["exact_hit"]) if k == "hit" else t, k)  # the exact top-N's own hit rate at most
            cells.append("none" if b is None else
                         f"{b['factory']} {b['param'] or ''} ({b[k]:.3f}), {b['ms']:.2f} ms, {b['speedup']:.1f}x")
        print(f"| {r['d']} | {r['n']:,} | {r['exact_ms']:.2f} ms | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    from runtime.cli import ArgumentParser  # a bad flag or an existing --json: one error line, exit 2
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="256,64")
    p.add_argument("--sizes", default="100000,300000,1000000,3000000")
    p.add_argument("--factories", default="IVF,HNSW32", help="IVF (nlist from N) or index_factory strings")
    p.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest gallery an HNSW index is built for")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--shortlist", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cluster-size", type=int, default=0, help="items a cluster (0: uniform random vectors)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file (else refused)")
    p.add_argument("--table", metavar="JSON", help="print the table of a saved run and stop")
    args = p.parse_args(argv)
    p.check_output_file(args.json, "--json", args.overwrite)
    if args.table:
        with open(args.table) as f:
            return table(json.load(f))
    import faiss
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; numpy {np.__version__}; "
          f"gallery: {f'clusters of {args.cluster_size}' if args.cluster_size else 'uniform'}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    work = tempfile.mkdtemp(prefix="first-stage-", dir=args.work)
    try:
        rows = [bench(int(d), int(n), args, work) for d in args.dims.split(",") for n in args.sizes.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
