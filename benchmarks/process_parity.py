#!/usr/bin/env python
"""Does training on N processes end where one process ends? Two runs of the same flags, compared.

    python benchmarks/process_parity.py --data data/synthetic --epochs 2 --precision fp64
    python benchmarks/process_parity.py --data data/synthetic --epochs 2                    # fp32

Runs ``python -m imram_min.train`` once on one process (torch's default threads) and once under
``torchrun --standalone --nproc_per_node N`` (one thread each), with the same flags and seed: the
same global batches in the same order, the exact global-batch loss (imram_min.engineering.distributed). The
two differ only in the order of floating-point sums, so any gap is rounding, amplified by
training: hardest negatives (max violation) flip when two are within rounding of each other, and
Adam (lr 1e-3 in the built-in recipe) carries each flip on. Prints per epoch the train loss and
dev rsum of both runs and, at the end, the largest |difference| of any weight against the largest
|weight|. --precision fp64 makes the rounding ~1e-16 instead of ~1e-7. --nudge compares instead
with one process whose first weight starts one unit in the last place away: the same arithmetic
from a start 1 ulp apart, the smallest difference there is.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from runtime.cli import ArgumentParser, UserError, check_output_folder  # noqa: E402  (a bad flag: one line, exit 2)


# One process, the first weight moved by one unit in the last place of its precision (float32, or
# float64 under --precision fp64) just before Adam takes the parameters; all else as imram_min.train.
NUDGED_TRAIN = """
import sys, torch
import imram_min.train as train
adam = torch.optim.Adam
def nudged_adam(params, *args, **kwargs):
    params = list(params)
    with torch.no_grad():
        w = params[0].view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(float("inf"), dtype=w.dtype))
    return adam(params, *args, **kwargs)
torch.optim.Adam = nudged_adam
sys.exit(0 if train.main(sys.argv[1:]) is not None else 1)
"""


def train(args: list[str], processes: int, out: str, nudge: bool = False) -> float:
    """One training run -> seconds. processes 1: plain python (nudge: NUDGED_TRAIN); N > 1: torchrun,
    one thread each."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if nudge:
        cmd = [sys.executable, "-c", NUDGED_TRAIN]
    elif processes == 1:
        cmd = [sys.executable, "-m", "imram_min.train"]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "imram_min.train"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, *args, "--out", out], env=env, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def read_log(run: str) -> list[dict]:
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a data folder (e.g. data/synthetic from imram_min.data.synthetic)")
    p.add_argument("--epochs", type=int, default=2, help="(2)")
    p.add_argument("--processes", type=int, default=2, help="N of the torchrun run (2)")
    p.add_argument("--precision", default="fp32", help="train --precision of both runs (fp32)")
    p.add_argument("--nudge", action="store_true", help="the second run is one process too, with its first weight "
                   "moved by one unit in the last place: how far rounding alone carries a run")
    p.add_argument("--out", help="keep both runs here (default: a temporary folder)")
    p.add_argument("--json", help="also write the comparison as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json, and the runs already in --out")
    a, extra = p.parse_known_args(argv)  # anything else goes to both training runs
    if a.nudge:
        a.processes = "1+ulp"
    p.check_output_file(a.json, "--json", a.overwrite)
    if a.out:
        try:
            check_output_folder(a.out, "--out", overwrite=a.overwrite, outputs=["1proc", f"{a.processes}proc"])
        except UserError as e:
            p.error(str(e))
    args = ["--data", os.path.abspath(a.data), "--num-epochs", str(a.epochs), "--precision", a.precision,
            "--device", "cpu", *extra, *(["--overwrite"] if a.overwrite else [])]
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.abspath(a.out) if a.out else tmp
        runs = {1: os.path.join(base, "1proc"), a.processes: os.path.join(base, f"{a.processes}proc")}
        seconds = {n: train(args, 1 if a.nudge else n, run, nudge=a.nudge and n != 1) for n, run in runs.items()}
        logs = {n: read_log(run) for n, run in runs.items()}
        weights = {n: torch.load(os.path.join(run, "last.pt"), weights_only=True)["model"] for n, run in runs.items()}
    one, many = logs[1], logs[a.processes]
    other = "1 process, one weight 1 ulp up" if a.nudge else f"{a.processes} processes"
    print(f"\n{a.precision}, {a.epochs} epochs: 1 process ({seconds[1]:.0f} s) vs {other} ({seconds[a.processes]:.0f} s)")
    n = a.processes
    print(f"{'epoch':>5} {'loss 1':>10} {f'loss {n}':>10} {'rsum 1':>8} {f'rsum {n}':>8} {'|diff|':>7}")
    for e1, en in zip(one, many):
        print(f"{e1['epoch']:>5} {e1['train_loss']:>10.4f} {en['train_loss']:>10.4f} {e1['rsum']:>8.2f} "
              f"{en['rsum']:>8.2f} {abs(e1['rsum'] - en['rsum']):>7.2f}")
    w1, wn = weights[1], weights[a.processes]
    floats = [k for k in w1 if w1[k].is_floating_point()]
    max_diff = max(float((w1[k].double() - wn[k].double()).abs().max()) for k in floats)
    max_abs = max(float(w1[k].double().abs().max()) for k in floats)
    gap = abs(one[-1]["rsum"] - many[-1]["rsum"])
    print(f"weights after epoch {one[-1]['epoch']}: max |diff| {max_diff:.3g} (largest |w| {max_abs:.3g}); "
          f"final dev rsum gap {gap:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"precision": a.precision, "processes": a.processes, "args": args,
                                            "seconds": seconds, "logs": logs, "weights_max_abs_diff": max_diff,
                                            "weights_max_abs": max_abs, "rsum_gap": gap}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:  # the training run has said why, on stderr, above
        sys.exit(f"error: a training run ended with exit status {e.returncode} (its message is above)")
