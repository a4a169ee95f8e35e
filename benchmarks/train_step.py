#!/usr/bin/env python
"""Samples/s, peak memory and gradient exactness of one IMRAM training step, per way of scoring the batch.

    python benchmarks/train_step.py                     # CUDA if torch sees it, else CPU at a smaller size
    python benchmarks/train_step.py --device cuda --batch-size 128 --embed-size 1024 --steps 3 --mode full
    python benchmarks/train_step.py --device cpu --batch-size 32 --embed-size 256 --json out.json

A step is what imram_min.train does per batch: encode the images and captions, score the B x B
batch, contrastive_loss (hardest negatives), backward, gradient-norm clipping (2.0), Adam
(lr 2e-4). Scorers of the B x B similarities:
    original     benchmarks/original_loop.per_caption_similarity with autograd: the original
                 training, one caption at a time against the batch's images
    fast         imram_min.schedule.similarity(..., checkpoint=True): blocks recomputed in backward
                 (what train.py does on a GPU, through schedule.score_pairs)
    fast-nockpt  imram_min.schedule.similarity(..., checkpoint=False) (train.py on the CPU)
    plain        IMRAM.similarity (model.py, the reference form), on request

Each scorer runs in its own process (``--only NAME`` + the same flags prints one JSON line) so
that its peak memory is its own: peak RSS (VmHWM) on the CPU, torch.cuda.max_memory_allocated on
CUDA (model, Adam state and activations). A process that runs out of memory is reported as OOM,
one that runs past --max-seconds as TIMEOUT (with the steps it finished, if any), not a crash.
On the CPU every process's address space is capped (--max-memory-gb) so that the original's
~100 GB at batch 128 x d = 1024 fails cleanly instead of swapping a shared machine.

Order per process: the gradient-check step (the first --check-batch samples; it is the first
warm-up step when --check-batch is the batch size), then --warmup steps, then --iters timed
steps. All processes start from the same weights (seed) and data, so the check step's gradients
(before clipping) are comparable: each scorer's max |diff| vs the original's is reported (PASS
<= 1e-4 x the largest gradient). At the default CUDA sizes the original needs ~100 GB, more than
an 80 GB GPU has: give --check-batch 32 (say) so that its gradients are still checked, on a
smaller batch, before its full step runs out of memory.

Inputs are synthetic (seeded): Gaussian region features, random word ids, caption lengths
uniform in --min-len..--max-len; random weights, IMRAMConfig defaults but for d, mode and K.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.score import (add_shape_args, busy_warning, is_oom, limit_address_space, machine_info,  # noqa: E402
                              mem_available_gb, peak_rss_mb, rss_mb, run_child)

SCORERS = ("original", "fast", "fast-nockpt", "plain")
DEFAULT_SCORERS = ("original", "fast", "fast-nockpt")
SIZES = {"cuda": {"batch_size": 128, "embed_size": 1024}, "cpu": {"batch_size": 32, "embed_size": 256}}
LR, GRAD_CLIP = 2e-4, 2.0  # imram_min.train.TrainConfig defaults
GRAD_RTOL = 1e-4  # gradient check: max |diff| <= GRAD_RTOL * max |gradient of the original|


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="IMRAM training-step benchmark: samples/s, peak memory, gradient exactness.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(auto: cuda if torch sees it)")
    p.add_argument("--batch-size", type=int, help="B (cuda 128; cpu 32: the original needs ~100 GB and hours "
                                                  "at 128 x d = 1024 on a CPU)")
    p.add_argument("--embed-size", type=int, help="d (cuda 1024; cpu 256)")
    add_shape_args(p)
    p.add_argument("--scorers", default=",".join(DEFAULT_SCORERS), help=f"comma-separated, of {','.join(SCORERS)} "
                                                                        f"({','.join(DEFAULT_SCORERS)})")
    p.add_argument("--iters", type=int, default=3, help="timed steps (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (1)")
    p.add_argument("--check-batch", type=int, help="samples of the gradient-check step (default: the batch size)")
    p.add_argument("--max-elems", type=int, help="schedule.similarity max_elems (default: its default, as train.py)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (default off: exact float32)")
    p.add_argument("--max-seconds", type=float, default=900, help="per scorer process (900)")
    p.add_argument("--max-memory-gb", type=float, help="address-space cap of each CPU process "
                                                       "(default 90%% of the memory available)")
    p.add_argument("--seed", type=int, default=0, help="(0)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--only", choices=SCORERS, help="run this scorer alone, in this process; print one JSON line")
    p.add_argument("--save-grads", help="(with --only) write the check step's gradients to this .npz")
    return p


def resolve(args) -> dict:
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = SIZES[device]
    explicit = args.batch_size is not None or args.embed_size is not None
    cfg = {"device": device, "batch_size": args.batch_size or preset["batch_size"],
           "embed_size": args.embed_size or preset["embed_size"], "n_steps": args.steps, "mode": args.mode,
           "n_region": args.n_region, "min_len": args.min_len, "max_len": args.max_len, "img_dim": args.img_dim,
           "word_dim": args.word_dim, "vocab_size": args.vocab_size, "iters": max(1, args.iters),
           "warmup": max(0, args.warmup), "max_elems": args.max_elems, "threads": args.threads, "tf32": args.tf32,
           "seed": args.seed, "max_seconds": args.max_seconds, "preset_sizes": not explicit}
    cfg["check_batch"] = min(cfg["batch_size"], args.check_batch or cfg["batch_size"])
    if not 1 <= cfg["min_len"] <= cfg["max_len"] or cfg["batch_size"] < 2:
        raise SystemExit("need 1 <= --min-len <= --max-len and --batch-size >= 2")
    return cfg


def make_batch(cfg: dict):
    """region_feats (B, n_region, img_dim) f32, tokens (B, max length) i64 (0 = <pad> past each length), lengths (B,)."""
    rng = np.random.default_rng(cfg["seed"])
    b = cfg["batch_size"]
    lengths = rng.integers(cfg["min_len"], cfg["max_len"] + 1, size=b).astype(np.int64)
    feats = rng.standard_normal((b, cfg["n_region"], cfg["img_dim"]), dtype=np.float32)
    tokens = rng.integers(4, cfg["vocab_size"], size=(b, int(lengths.max()))).astype(np.int64)
    tokens[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
    return feats, tokens, lengths


# --------------------------------------------------------------------------- one scorer, in this process
def run_one(name: str, cfg: dict, save_grads: str | None) -> dict:
    import torch

    from benchmarks.original_loop import per_caption_similarity
    from imram_min import schedule
    from imram_min.model import IMRAM, IMRAMConfig, contrastive_loss

    result = {"name": name, "status": "ok", "batch_size": cfg["batch_size"], "check_batch": cfg["check_batch"],
              "step_times": [], "warmup_times": [], "grads_saved": False}
    cuda = cfg["device"] == "cuda"
    t_start = time.perf_counter()
    try:
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        if cuda:
            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device")
            torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
            torch.backends.cudnn.allow_tf32 = cfg["tf32"]
            torch.set_float32_matmul_precision("high" if cfg["tf32"] else "highest")
            result["device"] = torch.cuda.get_device_name()
        else:
            result["device"] = "cpu"
        result["threads"] = torch.get_num_threads()
        device = torch.device(cfg["device"])
        torch.manual_seed(cfg["seed"])
        model_cfg = IMRAMConfig(vocab_size=cfg["vocab_size"], img_dim=cfg["img_dim"], word_dim=cfg["word_dim"],
                                embed_size=cfg["embed_size"], mode=cfg["mode"], n_steps=cfg["n_steps"])
        model = IMRAM(model_cfg).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        feats, tokens, lengths = make_batch(cfg)
        feats, tokens, lengths = torch.from_numpy(feats).to(device), torch.from_numpy(tokens).to(device), \
            torch.from_numpy(lengths)  # lengths stay on the CPU, as train.py keeps them
        # else as train.py (schedule.score_pairs): fast's default on the CPU, CUDA_MAX_ELEMS on a GPU
        from imram_min.schedule import CUDA_MAX_ELEMS
        max_elems = cfg["max_elems"] or (CUDA_MAX_ELEMS if device.type == "cuda" else None)
        fast_kw = {"max_elems": max_elems} if max_elems else {}

        def score(r, w, n):
            if name == "original":
                return per_caption_similarity(model, r, w, n)
            if name == "plain":
                return model.similarity(r, w, n)
            return schedule.similarity(model, r, w, n, checkpoint=(name == "fast"), **fast_kw)

        def step(b: int, keep_grads: bool = False):
            t0 = time.perf_counter()
            n = lengths[:b]
            r = model.encode_images(feats[:b])
            w = model.encode_captions(tokens[:b, :int(n.max())], n)
            loss = contrastive_loss(score(r, w, n), model_cfg.margin, model_cfg.max_violation)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            saving = 0.0
            if keep_grads and save_grads:  # not part of the step: its time is left out
                t_save = time.perf_counter()
                np.savez(save_grads, **{k: p.grad.detach().float().cpu().numpy() for k, p in model.named_parameters()
                                        if p.grad is not None})
                result["grads_saved"], result["check_loss"] = True, float(loss.detach())
                saving = time.perf_counter() - t_save
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0 - saving

        b = cfg["batch_size"]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result["mem_base_mb"] = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
        if cfg["check_batch"] < b:
            result["check_time"] = step(cfg["check_batch"], keep_grads=True)
        for i in range(cfg["warmup"] if cfg["check_batch"] < b else max(1, cfg["warmup"])):
            result["warmup_times"].append(step(b, keep_grads=(i == 0 and cfg["check_batch"] == b)))
        for _ in range(cfg["iters"]):
            last = (result["step_times"] or result["warmup_times"] or [0.0])[-1]
            if time.perf_counter() - t_start + last > 0.9 * cfg["max_seconds"]:
                result["note"] = f"stopped after {len(result['step_times'])} timed steps (--max-seconds)"
                break
            result["step_times"].append(step(b))
    except BaseException as e:  # noqa: BLE001 - reported in the table, not raised
        if isinstance(e, KeyboardInterrupt):
            raise
        result.update(status="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {str(e).strip()[:400]}")
    if cuda and torch.cuda.is_available():
        result["mem_peak_mb"], result["mem_kind"] = torch.cuda.max_memory_allocated() / 2**20, \
            "cuda max_memory_allocated"
    else:
        result["mem_peak_mb"], result["mem_kind"] = peak_rss_mb(), "peak RSS (VmHWM)"
    times = result["step_times"] or result["warmup_times"]  # no timed step: the warm-up's time, said so
    if times:
        result["seconds_per_step"] = float(np.mean(times))
        result["samples_per_s"] = cfg["batch_size"] / result["seconds_per_step"]
        result["timed_from"] = "timed steps" if result["step_times"] else "warm-up step only"
    result["torch"] = torch.__version__
    return result


# --------------------------------------------------------------------------- the parent
def child_argv(name: str, cfg: dict, args, save: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--only", name, "--device", cfg["device"],
            "--batch-size", str(cfg["batch_size"]), "--embed-size", str(cfg["embed_size"]),
            "--steps", str(cfg["n_steps"]), "--mode", cfg["mode"], "--n-region", str(cfg["n_region"]),
            "--min-len", str(cfg["min_len"]), "--max-len", str(cfg["max_len"]), "--img-dim", str(cfg["img_dim"]),
            "--word-dim", str(cfg["word_dim"]), "--vocab-size", str(cfg["vocab_size"]), "--iters", str(cfg["iters"]),
            "--warmup", str(cfg["warmup"]), "--check-batch", str(cfg["check_batch"]), "--seed", str(cfg["seed"]),
            "--max-seconds", str(cfg["max_seconds"]), "--save-grads", save]
    for flag, key in (("--threads", "threads"), ("--max-elems", "max_elems")):
        if cfg[key]:
            argv += [flag, str(cfg[key])]
    if cfg["tf32"]:
        argv.append("--tf32")
    if cfg["device"] == "cpu" and args.max_memory_gb:
        argv += ["--max-memory-gb", str(args.max_memory_gb)]
    return argv


def grad_diff(path_a: str, path_b: str) -> tuple[float, float]:
    """(max |a - b| over every parameter's gradient, max |b|)."""
    with np.load(path_a) as a, np.load(path_b) as b:
        if sorted(a.files) != sorted(b.files):
            return float("inf"), float("nan")
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in b.files)
        scale = max(float(np.abs(b[k]).max()) for k in b.files)
    return diff, scale


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.only:
        cfg = resolve(args)
        if cfg["device"] == "cpu":
            limit_address_space(args.max_memory_gb)
        print(json.dumps(run_one(args.only, cfg, args.save_grads)), flush=True)
        return 0

    names = args.scorers.split(",")
    bad = [n for n in names if n not in SCORERS]
    if bad:
        raise SystemExit(f"unknown scorers {bad}; choose from {','.join(SCORERS)}")
    names = [n for n in SCORERS if n in names]  # the original first: it is the reference
    cfg = resolve(args)
    if args.max_memory_gb is None:
        available = mem_available_gb()
        args.max_memory_gb = round(0.9 * available, 1) if math.isfinite(available) else None
    info = machine_info()
    if args.device == "cpu":  # the parent needs no torch: the scorer processes report its version
        gpu, torch_version = "not used", None
    else:
        import torch
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        torch_version = torch.__version__
    print(f"machine: {info['cpus']} CPUs, load average {info['load_avg']}, {info['mem_available_gb']} GB available, "
          f"GPU {gpu}; threads {args.threads or 'default'}", flush=True)
    if busy_warning(info):
        print(busy_warning(info), flush=True)
    if cfg["device"] == "cpu" and cfg["preset_sizes"]:
        print("note: on the CPU the default is --batch-size 32 --embed-size 256 (the original step at 128 x 1024 "
              "needs ~100 GB and hours); pass sizes to override", flush=True)
    print(f"train step on {cfg['device']}: batch {cfg['batch_size']}, d = {cfg['embed_size']}, {cfg['n_region']} regions, "
          f"caption lengths {cfg['min_len']}..{cfg['max_len']}, K = {cfg['n_steps']}, mode {cfg['mode']}; "
          f"{cfg['warmup']} warm-up + {cfg['iters']} timed steps; gradient check on {cfg['check_batch']} samples"
          + (f"; address space capped at {args.max_memory_gb} GB per process" if cfg["device"] == "cpu" else ""),
          flush=True)
    results, tmp = {}, tempfile.TemporaryDirectory(prefix="imram-train-bench-")
    for name in names:
        save = os.path.join(tmp.name, f"{name}.npz")
        t0 = time.perf_counter()
        res = run_child(child_argv(name, cfg, args, save), args.max_seconds + 30)
        res.setdefault("name", name)
        res["grads_file"] = save if os.path.exists(save) else None
        results[name] = res
        shown = f"{res['samples_per_s']:.2f} samples/s" if res.get("samples_per_s") else ""
        print(f"  {name:<12} {res['status']} {shown} ({time.perf_counter() - t0:.1f} s in all)", flush=True)

    ref = results.get("original")
    for name, res in results.items():
        if name == "original" or not res.get("grads_file") or not (ref and ref.get("grads_file")):
            continue
        diff, scale = grad_diff(res["grads_file"], ref["grads_file"])
        res["grad_max_abs_diff"], res["grad_max_abs"] = diff, scale
        res["grad_check"] = "PASS" if diff <= GRAD_RTOL * scale else "FAIL"
    for res in results.values():
        res.pop("grads_file", None)
    tmp.cleanup()

    header = (f"{'scorer':<13}{'status':>8}{'samples/s':>11}{'s/step':>9}{'x orig':>8}{'peak MB':>10}"
              f"{'grad max|diff|':>16}{'check':>7}  notes")
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        sps = res.get("samples_per_s")
        ratio = f"{sps / ref['samples_per_s']:.2f}" if sps and ref and ref.get("samples_per_s") else "-"
        diff = f"{res['grad_max_abs_diff']:.2e}" if "grad_max_abs_diff" in res else ("ref" if name == "original" else "-")
        peak = f"{res['mem_peak_mb']:.0f}" if res.get("mem_peak_mb") is not None else "-"
        per_step = f"{res['seconds_per_step']:.3f}" if sps else "-"
        notes = []
        if res.get("timed_from") == "warm-up step only":
            notes.append("time of the warm-up step (no timed step finished)")
        if res.get("note"):
            notes.append(res["note"])
        if res["status"] != "ok":
            notes.append(res.get("error", "")[:160])
        print(f"{name:<13}{res['status'].upper():>8}{(f'{sps:.2f}' if sps else '-'):>11}{per_step:>9}{ratio:>8}"
              f"{peak:>10}{diff:>16}{res.get('grad_check', '-'):>7}  {'; '.join(notes)}")
    kinds = sorted({r["mem_kind"] for r in results.values() if r.get("mem_kind")})
    scale = next((r["grad_max_abs"] for r in results.values() if "grad_max_abs" in r), None)
    print(f"peak MB: {'; '.join(kinds)}. grad max|diff|: every parameter's gradient in the check step "
          f"({cfg['check_batch']} samples, before clipping) vs the original's; PASS <= {GRAD_RTOL:g} x max |gradient|"
          + (f" (max |gradient| {scale:.3g})" if scale is not None else ""))
    load_end = [round(x, 2) for x in os.getloadavg()]
    torch_version = torch_version or next((r["torch"] for r in results.values() if r.get("torch")), None)
    print(f"torch {torch_version}; load average at the end: {load_end} (a busy machine makes timings noisy)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": info | {"gpu": gpu, "torch": torch_version, "load_avg_end": load_end},
                       "config": cfg, "scorers": results}, f, indent=2, default=str)
            f.write("\n")
    failed = [n for n, r in results.items() if r["status"] == "error" or r.get("grad_check") == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
