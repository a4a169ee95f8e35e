#!/usr/bin/env python
"""Samples/s and gradient exactness of one IMRAM training step per way of scoring the batch, in one process.

    python benchmarks/train_step.py                     # CUDA if torch sees it (batch 128, d = 1024), else CPU (32, 256)
    python benchmarks/train_step.py --device cuda --batch-size 128 --embed-size 1024 --check-batch 32
    python benchmarks/train_step.py --device cpu --batch-size 32 --embed-size 256 --json out.json

A step is what imram_min.train does per batch: encode the B images and B captions, score the
B x B pairs, contrastive_loss (hardest negatives), backward, gradient-norm clipping (2.0), Adam
(lr 2e-4). Ways of scoring the B x B pairs:
    original     imram_min.reference.per_caption_similarity with autograd: the paper's loop, one
                 caption at a time against the batch's images (the baseline)
    fast         imram_min.engineering.tiling.tiled_similarity(..., checkpoint=True): blocks recomputed in the
                 backward pass (what training does on a GPU)
    fast-nockpt  imram_min.engineering.tiling.tiled_similarity(..., checkpoint=False)
    support      what training does with hardest negatives: every pair scored by fast-nockpt without
                 autograd, then the loss and its gradient from the 3B pairs it depends on
                 (imram_min.loss.support_loss, (F10))
    plain        IMRAM.similarity (model.py), on request
    fast-bf16    fast-nockpt under torch.autocast(bfloat16) (train --precision bf16); its gradients
                 are bf16-rounded, so its check is reported, not required
    ddp-N        support on N processes (gloo on the CPU, one thread each; DistributedDataParallel
                 around imram_min.loss.BatchLoss, as torchrun -m imram_min.train): the same
                 global batch and gradients, timed per global step (e.g. ddp-2)

Every scorer starts from the same weights (seed) and batch. Its first step is the gradient check:
on the first --check-batch samples (default: the whole batch), every parameter's gradient before
clipping is compared with the original's (PASS: max |diff| <= 1e-4 x the largest gradient). Then
--warmup untimed and --iters timed steps; a scorer stops early once it has used --max-seconds. On
CUDA the peak memory of each scorer's steps is torch.cuda.max_memory_allocated (model, Adam state,
activations); the original step at batch 128 x d = 1024 needs ~54 GB, so --check-batch 32 checks
its gradients on a batch that fits before its full step runs out of memory (reported as OOM).
Inputs are synthetic (seeded): Gaussian region features, random word ids, caption lengths uniform
in --min-len..--max-len; random weights, IMRAMConfig defaults but for d, mode and K.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from imram_min.engineering import tiling  # noqa: E402
from imram_min.engineering.distributed import Context, join, rank_slice, teardown  # noqa: E402
from imram_min.loss import BatchLoss  # noqa: E402
from imram_min.model import IMRAM, IMRAMConfig  # noqa: E402
from imram_min.reference import per_caption_similarity  # noqa: E402
from runtime.memory import retain_freed_memory  # noqa: E402
from score import load_line, shape_parser  # noqa: E402  (benchmarks/score.py)

SCORERS = ("original", "fast", "fast-nockpt", "support", "plain", "fast-bf16", "ddp-2", "ddp-4")
SIZES = {"cuda": (128, 1024), "cpu": (32, 256)}  # batch size, d
LR, GRAD_CLIP, GRAD_RTOL = 2e-4, 2.0, 1e-4


def make_batch(a, b: int):
    """region_feats (b, n_region, img_dim) f32, tokens (b, max length) i64 (0 past each length), lengths (b,) i64."""
    rng = np.random.default_rng(a.seed)
    lengths = rng.integers(a.min_len, a.max_len + 1, size=b).astype(np.int64)
    feats = rng.standard_normal((b, a.n_region, a.img_dim), dtype=np.float32)
    tokens = rng.integers(4, a.vocab_size, size=(b, int(lengths.max()))).astype(np.int64)
    tokens[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
    return [torch.from_numpy(x) for x in (feats, tokens, lengths)]


def run_scorer(name: str, a, device: torch.device, batch, rank: int = 0, init: str = "") -> tuple[dict, dict | None]:
    """One scorer's steps -> (result, the check step's gradients {parameter: tensor} or None). ddp-N:
    process ``rank`` of N, joined through ``init`` (``run_processes`` starts them)."""
    torch.manual_seed(a.seed)
    cfg = IMRAMConfig(vocab_size=a.vocab_size, img_dim=a.img_dim, word_dim=a.word_dim, embed_size=a.embed_size,
                      mode=a.mode, n_steps=a.steps)
    model = IMRAM(cfg).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    feats, tokens, lengths = batch[0].to(device), batch[1].to(device), batch[2]  # lengths stay on the CPU
    kw = {"max_elems": tiling.CUDA_MAX_ELEMS} if device.type == "cuda" else {}  # as training on each device
    score = {"original": per_caption_similarity, "plain": IMRAM.similarity,
             "fast": lambda *x: tiling.tiled_similarity(*x, checkpoint=True, **kw)}.get(
        name, lambda *x: tiling.tiled_similarity(*x, checkpoint=False, **kw))
    ctx, world = Context(), 1
    if name.startswith("ddp-"):
        world = int(name[4:])
        ctx = join(rank, world, init, device.type)
    loss_of = BatchLoss(model, score, ctx, support=name == "support" or world > 1)  # else every pair with autograd
    step_module = loss_of if world == 1 else torch.nn.parallel.DistributedDataParallel(loss_of)
    bf16 = name == "fast-bf16"
    grads = None

    def step(b: int, keep: bool = False) -> float:
        nonlocal grads
        t0 = time.perf_counter()
        own = rank_slice(b, world, rank)
        n = lengths[:b][own]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_module(feats[:b][own], tokens[:b][own][:, :int(n.max())], n, cfg.max_violation)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if keep:
            grads = {k: p.grad.detach().float().cpu().clone() for k, p in model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    res, start = {"name": name, "status": "ok", "step_times": []}, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        step(a.check_batch, keep=True)  # the check step, also the first warm-up step
        for i in range(a.warmup + a.iters):
            if time.perf_counter() - start > a.max_seconds:
                res["note"] = f"stopped after {len(res['step_times'])} timed steps (--max-seconds)"
                break
            t = step(a.batch_size)
            if i >= a.warmup:
                res["step_times"].append(t)
    except Exception as e:  # noqa: BLE001 - reported in the table; the other scorers go on
        res.update(status="oom" if "out of memory" in str(e).lower() or isinstance(e, MemoryError) else "error",
                   error=f"{type(e).__name__}: {str(e).strip()[:300]}")
    if device.type == "cuda":
        res["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if res["step_times"]:
        res["seconds_per_step"] = float(np.mean(res["step_times"]))
        res["samples_per_s"] = a.batch_size / res["seconds_per_step"]
    if world > 1:
        teardown(ctx)
    del model, optimizer
    return res, grads


def _process(rank: int, name: str, a, folder: str) -> None:
    torch.set_num_threads(1)
    res, grads = run_scorer(name, a, torch.device("cpu"), make_batch(a, a.batch_size), rank, f"file://{folder}/init")
    if rank == 0:
        torch.save({"res": res, "grads": grads}, os.path.join(folder, "out.pt"))


def run_processes(name: str, a) -> tuple[dict, dict | None]:
    """ddp-N: N processes (spawned, one thread each) run ``run_scorer``; rank 0's result and gradients."""
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_process, args=(name, a, folder), nprocs=int(name[4:]), start_method="spawn")
        out = torch.load(os.path.join(folder, "out.pt"), weights_only=False)  # our own file, just written
    return out["res"], out["grads"]


def main(argv: list[str] | None = None) -> int:
    p = shape_parser(__doc__, "d (cuda 1024, cpu 256)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(auto: cuda if torch sees it)")
    p.add_argument("--batch-size", type=int, help="B (cuda 128, cpu 32)")
    p.add_argument("--scorers", default="original,fast,fast-nockpt,support", help="comma-separated, of " + ",".join(SCORERS))
    p.add_argument("--iters", type=int, default=3, help="timed steps (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the check step (1)")
    p.add_argument("--check-batch", type=int, help="samples of the gradient-check step (default: the batch size)")
    p.add_argument("--max-seconds", type=float, default=900, help="per scorer: no new step after this long (900)")
    a = p.parse_args(argv)
    p.check_output_file(a.json, "--json", a.overwrite)
    device = torch.device(tiling.resolve_device(a.device))
    a.batch_size = a.batch_size or SIZES[device.type][0]
    a.embed_size = a.embed_size or SIZES[device.type][1]
    a.check_batch = min(a.batch_size, a.check_batch or a.batch_size)
    names = [n for n in SCORERS if n in a.scorers.split(",")]  # the original first: it is the reference
    if set(a.scorers.split(",")) - set(SCORERS) or not 1 <= a.min_len <= a.max_len or a.batch_size < 2:
        p.error(f"scorers are {','.join(SCORERS)}; need 1 <= --min-len <= --max-len and --batch-size >= 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact float32
    retain_freed_memory()
    print(f"machine: {load_line()}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)\ntrain step on {device.type}: batch "
          f"{a.batch_size}, d = {a.embed_size}, {a.n_region} regions, caption lengths {a.min_len}..{a.max_len}, "
          f"K = {a.steps}, mode {a.mode}; gradient check on {a.check_batch} samples, {a.warmup} warm-up + "
          f"{a.iters} timed steps", flush=True)
    batch, results, grads = make_batch(a, a.batch_size), {}, {}
    for name in names:
        results[name], grads[name] = run_processes(name, a) if name.startswith("ddp-") else \
            run_scorer(name, a, device, batch)
        print(f"  {name:<12} {results[name]['status']} {results[name].get('samples_per_s', 0):.2f} samples/s", flush=True)
    ref, ref_grads = results.get("original", {}), grads.get("original")
    print(f"{'scorer':<13}{'status':>7}{'samples/s':>11}{'s/step':>9}{'x orig':>8}{'peak MB':>9}"
          f"{'grad max|diff|':>16}{'check':>7}  notes")
    for name, r in results.items():
        if ref_grads is not None and grads[name] is not None and name != "original":
            scale = max(float(g.abs().max()) for g in ref_grads.values())
            same = grads[name].keys() == ref_grads.keys()
            r["grad_max_abs_diff"] = max(float((grads[name][k] - g).abs().max()) for k, g in ref_grads.items()) \
                if same else float("inf")
            r["grad_max_abs"], r["grad_check"] = scale, "PASS" if r["grad_max_abs_diff"] <= GRAD_RTOL * scale else \
                ("bf16" if name == "fast-bf16" else "FAIL")
        sps, per_step, peak = r.get("samples_per_s"), r.get("seconds_per_step"), r.get("peak_mb")
        ratio = f"{sps / ref['samples_per_s']:.2f}" if sps and ref.get("samples_per_s") else "-"
        diff = "ref" if name == "original" else (f"{r['grad_max_abs_diff']:.2e}" if "grad_max_abs_diff" in r else "-")
        print(f"{name:<13}{r['status'].upper():>7}{(f'{sps:.2f}' if sps else '-'):>11}"
              f"{(f'{per_step:.3f}' if per_step else '-'):>9}{ratio:>8}"
              f"{(f'{peak:.0f}' if peak is not None else '-'):>9}{diff:>16}{r.get('grad_check', '-'):>7}  "
              f"{r.get('note', '')}{r.get('error', '')[:160]}")
    print(f"grad max|diff|: every parameter's gradient in the check step ({a.check_batch} samples, before clipping) vs "
          f"the original's; PASS <= {GRAD_RTOL:g} x max |gradient|. peak MB: torch.cuda.max_memory_allocated (CUDA only)")
    if a.json:
        Path(a.json).write_text(json.dumps({"config": vars(a), "scorers": results},
                                           indent=2, default=str) + "\n")
    return 1 if any(r["status"] == "error" or r.get("grad_check") == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
