#!/usr/bin/env python
"""Speed and exactness of every way this project scores image x caption pairs, in one process.

    python benchmarks/score.py                                  # --size full, then --size small
    python benchmarks/score.py --size full --repeat 2 --rounds 3 --json score.json
    python benchmarks/score.py --size full --n-img 1000 --n-cap 5000 \\
        --scorers loop,loop-cuda,fast-cuda,onnx-cuda --slice loop=200x5 --slice loop-cuda=100

Scorers; each scores the same precomputed embeddings and is timed on that alone:
    loop        imram_min.reference.per_caption_similarity: the paper's loop, one caption at a time
                against every image of the shard, as the original evaluation (the baseline)
    plain       IMRAM.similarity (imram_min/model.py), batched
    fast        imram_min.engineering.tiling.tiled_similarity (imram_min/fast.py's exact restructuring, in blocks)
    onnx-cpu    the same random model exported (matcher="fast") to a temporary folder and scored by
                runtime.Scorer.score_embeddings on ONNX Runtime, as python -m runtime.score does
    loop-cuda, plain-cuda, fast-cuda, onnx-cuda    the same on CUDA, where torch / onnxruntime offer it

Printed per scorer: pairs/s, x loop (its pairs/s over the loop's on the same device in this run;
"*": over the CPU loop), GFLOP/s (the FLOPs per pair of its own form, ``imram_min.fast.flops_per_pair``:
"original" for loop, "plain" for plain, "fast" for fast and onnx), max |diff| vs the loop on the pairs
both scored (float32; PASS <= 1e-5), and the analytic FLOPs per pair of the three forms, whose
ratios are the ideal speed-ups. A loop may score a slice of the shard (--slice NAME=[IMGSx]CAPS); its
pairs/s is then the slice's. --rounds N runs the scorers N times in turn (loop, plain, fast, ...,
loop, ...) so that on a machine whose speed drifts all meet the same phases: each is shown at its
best, and the ratios to the loop within each round are printed too. Every scorer runs with glibc
keeping freed memory for reuse (runtime.memory.retain_freed_memory), as training and evaluation.

Inputs are synthetic: random weights (IMRAMConfig defaults but d, mode, K; torch.manual_seed(--seed)),
l2-normalised Gaussian embeddings with a shared component (mean pairwise cosine ~0.2, so that the
clipped attention has positive scores to work on), caption lengths uniform in --min-len..--max-len,
word embeddings zero past each length (as the text encoder gives). CUDA runs in exact float32.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from imram_min.engineering import tiling  # noqa: E402
from imram_min.fast import FLOP_FORMS, flops_per_pair  # noqa: E402
from imram_min.model import IMRAM, IMRAMConfig  # noqa: E402
from imram_min.reference import per_caption_similarity  # noqa: E402
from runtime.cli import ArgumentParser  # noqa: E402  (a bad flag or an existing --json: one error line, exit 2)
from runtime.memory import retain_freed_memory  # noqa: E402

SIZES = {"full": {"embed_size": 1024, "n_img": 32, "n_cap": 40}, "small": {"embed_size": 256, "n_img": 48, "n_cap": 64}}
LOOP_CUDA_PAIRS = 100_000  # default slice of loop-cuda; the CPU loop scores the preset shard's pairs at most
SCORERS = ("loop", "plain", "fast", "onnx-cpu", "loop-cuda", "plain-cuda", "fast-cuda", "onnx-cuda")
SHARED, TOL = 0.5, 1e-5


def shape_parser(doc: str, embed_help: str) -> argparse.ArgumentParser:
    """The parser of this benchmark and train_step.py, with their shared model and input shape flags."""
    p = ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embed-size", type=int, help=embed_help)
    p.add_argument("--mode", choices=["full", "text", "image"], default="full", help="(full)")
    p.add_argument("--steps", type=int, default=3, help="matching steps K (3)")
    p.add_argument("--n-region", type=int, default=36, help="regions per image (36)")
    p.add_argument("--min-len", type=int, default=8, help="shortest caption, words (8)")
    p.add_argument("--max-len", type=int, default=16, help="longest caption, words (16)")
    p.add_argument("--img-dim", type=int, default=2048, help="region feature size of the model (2048)")
    p.add_argument("--word-dim", type=int, default=300, help="word embedding size of the model (300)")
    p.add_argument("--vocab-size", type=int, default=10000, help="vocabulary of the model (10000)")
    p.add_argument("--threads", type=int, help="torch / ONNX Runtime intra-op threads (default: theirs)")
    p.add_argument("--seed", type=int, default=0, help="(0)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file (else refused)")
    return p


def build_model(a, embed_size: int) -> IMRAM:
    torch.manual_seed(a.seed)
    return IMRAM(IMRAMConfig(vocab_size=a.vocab_size, img_dim=a.img_dim, word_dim=a.word_dim, embed_size=embed_size,
                             mode=a.mode, n_steps=a.steps)).eval()


def load_line() -> str:
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    busy = " (other work is running: timings will be noisy)" if load > 0.5 * cpus else ""
    return f"{cpus} CPUs, load average {load:.2f}{busy}"


def make_inputs(a, n_img: int, n_cap: int, d: int):
    """region_embs (n_img, n_region, d) f32, word_embs (n_cap, max length, d) f32 zero past each length,
    lengths (n_cap,) i64: unit vectors with a shared component, from numpy's RNG (--seed)."""
    rng = np.random.default_rng(a.seed)
    lengths = rng.integers(a.min_len, a.max_len + 1, size=n_cap).astype(np.int64)
    shared = SHARED * rng.standard_normal(d, dtype=np.float32)

    def unit(shape):
        x = rng.standard_normal(shape, dtype=np.float32) + shared
        return x / (np.sqrt(np.square(x).sum(-1, keepdims=True)) + np.float32(1e-8))

    regions, words = unit((n_img, a.n_region, d)), unit((n_cap, int(lengths.max()), d))
    words[np.arange(words.shape[1])[None, :] >= lengths[:, None]] = 0.0
    return regions, words, lengths


def make_scorer(name: str, model: IMRAM, model_dir: str | None, regions, words, lengths, threads: int | None):
    """-> score(n_img, n_cap): the (n_img, n_cap) float32 scores of the first images x captions."""
    cuda, kind = name.endswith("-cuda"), name.split("-")[0]
    if kind == "onnx":
        from runtime.scorer import Scorer
        scorer = Scorer(model_dir, device="cuda" if cuda else "cpu", threads=threads)
        if cuda and scorer.provider != "CUDAExecutionProvider":
            raise RuntimeError(f"ONNX Runtime runs on {scorer.provider}, not CUDA")
        return lambda i, j: scorer.score_embeddings(regions[:i], words[:j], lengths[:j])
    device = torch.device("cuda" if cuda else "cpu")
    m = copy.deepcopy(model).to(device) if cuda else model
    r, w, n = torch.from_numpy(regions).to(device), torch.from_numpy(words).to(device), torch.from_numpy(lengths)
    kw = {"max_elems": tiling.CUDA_MAX_ELEMS} if cuda else {}  # the block size of evaluation on each device
    fn = {"loop": per_caption_similarity, "plain": IMRAM.similarity,
          "fast": lambda *args: tiling.tiled_similarity(*args, **kw)}[kind]

    @torch.no_grad()
    def score(i, j):
        return fn(m, r[:i], w[:j, :int(n[:j].max())], n[:j]).float().cpu().numpy()  # .cpu() waits for CUDA
    return score


def run_size(size: str, a, names: list[str]) -> dict:
    d = a.embed_size or SIZES[size]["embed_size"]
    n_img, n_cap = a.n_img or SIZES[size]["n_img"], a.n_cap or SIZES[size]["n_cap"]
    print(f"\n=== size {size}: d = {d}, {a.n_region} regions, caption lengths {a.min_len}..{a.max_len}, K = {a.steps}, "
          f"mode {a.mode}, shard {n_img} images x {n_cap} captions, seed {a.seed}", flush=True)
    regions, words, lengths = make_inputs(a, n_img, n_cap, d)
    model, tmp = build_model(a, d), tempfile.TemporaryDirectory(prefix="imram-bench-")
    slices = {n: (n_img, n_cap) for n in names}
    for name in ("loop", "loop-cuda"):  # default: a bounded number of pairs; --slice NAME=[IMGSx]CAPS
        pairs = SIZES[size]["n_img"] * SIZES[size]["n_cap"] if name == "loop" else LOOP_CUDA_PAIRS
        imgs, _, caps = a.slices.get(name, f"{min(n_img, pairs)}x{max(1, pairs // min(n_img, pairs))}").rpartition("x")
        slices[name] = (min(n_img, int(imgs or n_img)), min(n_cap, int(caps)))
    model_dir = os.path.join(tmp.name, "model")
    if any(n.startswith("onnx") for n in names):
        from export.onnx_export import export_model
        from runtime.text import Vocabulary
        export_model(model, Vocabulary(f"w{i}" for i in range(a.vocab_size - 4)), model_dir, matcher="fast")
    res, scorers, outs = {n: {"status": "ok", "times": [], "round_pps": []} for n in names}, {}, {}
    for rnd in range(a.rounds):
        for name in names:
            r = res[name]
            if r["status"] != "ok":
                continue
            try:
                if name not in scorers:
                    scorers[name] = make_scorer(name, model, model_dir, regions, words, lengths, a.threads)
                    scorers[name](min(2, n_img), min(4, n_cap))  # warm-up
                times = []
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    outs[name] = scorers[name](*slices[name])
                    times.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - reported in the table; the other scorers go on
                oom = isinstance(e, MemoryError) or "out of memory" in str(e).lower()
                r.update(status="oom" if oom else "error", error=f"{type(e).__name__}: {str(e).strip()[:300]}")
                print(f"  {name:<10} {r['status'].upper()}: {r['error']}", flush=True)
                continue
            r["times"].append(min(times))
            r["round_pps"].append(np.prod(slices[name]) / min(times))
            print(f"  round {rnd + 1}/{a.rounds} {name:<10} {r['round_pps'][-1]:10.1f} pairs/s", flush=True)
    tmp.cleanup()

    ref = next((n for n in ("loop", "loop-cuda") if n in outs), None)
    mean = {f: float(np.mean([flops_per_pair(f, a.n_region, int(n), d, a.steps, a.mode) for n in lengths]))
            for f in FLOP_FORMS}
    print(f"{'scorer':<11}{'pairs/s':>11}{'x loop':>9}{'GFLOP/s':>9}{'max|diff|':>11}{'check':>7}  pairs timed")
    for name, r in res.items():
        if r["status"] != "ok":
            print(f"{name:<11}{r['status'].upper():>11}   {r['error'][:150]}")
            continue
        options = (("loop-cuda", ""), ("loop", "*")) if name.endswith("cuda") else (("loop", ""),)
        loop = next((x for x in options if res.get(x[0], {}).get("round_pps")), None)
        imgs, caps = slices[name]
        r.update(imgs=imgs, caps=caps, pairs=imgs * caps, seconds=min(r["times"]), pairs_per_s=max(r["round_pps"]))
        form = {"loop": "original", "plain": "plain"}.get(name.split("-")[0], "fast")
        r["gflops_per_s"] = r["pairs_per_s"] * mean[form] / 1e9
        r["x_loop"] = r["pairs_per_s"] / res[loop[0]]["pairs_per_s"] if loop else None
        r["x_loop_rounds"] = [p / q for p, q in zip(r["round_pps"], res[loop[0]]["round_pps"])] if loop else []
        if name == ref:
            r["max_abs_diff"], r["check"] = 0.0, "ref"
        elif ref is not None:
            i, j = min(imgs, slices[ref][0]), min(caps, slices[ref][1])
            r["max_abs_diff"] = float(np.abs(outs[name][:i, :j] - outs[ref][:i, :j]).max())
            r["check"] = "PASS" if r["max_abs_diff"] <= TOL else "FAIL"
        ratio = f"{r['x_loop']:.2f}{loop[1]}" if loop else "-"
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-"
        print(f"{name:<11}{r['pairs_per_s']:>11.1f}{ratio:>9}{r['gflops_per_s']:>9.1f}{diff:>11}"
              f"{r.get('check', 'n/a'):>7}  {imgs}x{caps}, best of {a.rounds} round(s) x {a.repeat}")
    print(f"x loop: over the loop's pairs/s on the same device (*: the CPU loop's). max|diff|: vs {ref}, float32, "
          f"PASS <= {TOL:g}. Analytic FLOPs per pair (imram_min.fast.flops_per_pair): original "
          f"{mean['original'] / 1e9:.4g} G, plain {mean['plain'] / 1e9:.4g} G, fast {mean['fast'] / 1e9:.4g} G; "
          f"ideal speed-up original / fast = {mean['original'] / mean['fast']:.2f}x, "
          f"plain / fast = {mean['plain'] / mean['fast']:.2f}x")
    if a.rounds > 1:
        print("x loop within each round: " + "; ".join(f"{n} {', '.join(f'{x:.2f}' for x in r['x_loop_rounds'])}"
                                                        for n, r in res.items() if r.get("x_loop_rounds")))
    return {"config": {"embed_size": d, "n_img": n_img, "n_cap": n_cap, "n_region": a.n_region, "mode": a.mode,
                       "n_steps": a.steps, "min_len": a.min_len, "max_len": a.max_len, "slices": slices},
            "flops_per_pair": mean, "ideal_speedup": mean["original"] / mean["fast"],
            "ideal_speedup_over_plain": mean["plain"] / mean["fast"], "reference": ref, "scorers": res}


def main(argv: list[str] | None = None) -> int:
    p = shape_parser(__doc__, "d (full 1024, small 256)")
    p.add_argument("--size", choices=["full", "small", "both"], default="both", help="(both)")
    p.add_argument("--n-img", type=int, help="images in the shard (full 32, small 48)")
    p.add_argument("--n-cap", type=int, help="captions in the shard (full 40, small 64)")
    p.add_argument("--scorers", help="comma-separated (default: the CPU ones, and the CUDA ones where available)")
    p.add_argument("--slice", action="append", default=[], metavar="LOOP=[IMGSx]CAPS",
                   help="the pairs loop or loop-cuda scores (default: the preset shard's pairs, 100000 on CUDA)")
    p.add_argument("--repeat", type=int, default=1, help="timed calls per scorer and round, the best counts (1)")
    p.add_argument("--rounds", type=int, default=1, help="every scorer this many times in turn (1)")
    a = p.parse_args(argv)
    p.check_output_file(a.json, "--json", a.overwrite)
    a.slices = dict(s.split("=", 1) for s in a.slice)
    a.repeat, a.rounds = max(1, a.repeat), max(1, a.rounds)
    if not 1 <= a.min_len <= a.max_len:
        p.error("need 1 <= --min-len <= --max-len")
    import onnxruntime as ort
    cuda = ["loop-cuda", "plain-cuda", "fast-cuda"] if torch.cuda.is_available() else []
    cuda += ["onnx-cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    names = a.scorers.split(",") if a.scorers else ["loop", "plain", "fast", "onnx-cpu", *cuda]
    if set(names) - set(SCORERS) or set(a.slices) - {"loop", "loop-cuda"}:
        p.error(f"scorers are {','.join(SCORERS)}; --slice is for loop and loop-cuda")
    names = [n for n in SCORERS if n in names]  # the loops first: they are the reference
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact float32
    retain_freed_memory()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"machine: {load_line()}, GPU {gpu}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"onnxruntime {ort.__version__}; scorers {','.join(names)}", flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__, "onnxruntime": ort.__version__,
                          "load_avg": os.getloadavg()}, "sizes": {}}
    for size in ["full", "small"] if a.size == "both" else [a.size]:
        report["sizes"][size] = run_size(size, a, names)
    results = [r for s in report["sizes"].values() for r in s["scorers"].values()]
    bad = sum(r["status"] == "error" or r.get("check") == "FAIL" for r in results)
    report["verdict"] = "FAIL" if bad else ("PASS" if any(r.get("check") == "PASS" for r in results) else "INCOMPLETE")
    print(f"\nexactness: {report['verdict']}; load average at the end {os.getloadavg()[0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
