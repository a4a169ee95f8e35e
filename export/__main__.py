"""python -m export CKPT --out MODEL_DIR [--opset N] [--matcher plain|fast] [--no-verify]

Writes image_encoder.onnx, text_encoder.onnx, matcher.onnx, vocab.json and manifest.json
(see export/onnx_export.py). A bad checkpoint or argument: one "error: ..." line, exit status 2;
graphs that fail their check (invalid ONNX, or ONNX Runtime != PyTorch): exit status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .onnx_export import (DEFAULT_MATCHER, DEFAULT_OPSET, MATCHER_FORMS, MAX_OPSET, MIN_OPSET, ExportError,
                          export_checkpoint)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export",
                                description="Export an imram-min checkpoint to ONNX (3 graphs + vocab + manifest).")
    p.add_argument("checkpoint", help="an imram-min checkpoint (best.pt, last.pt, or made by imram_min.convert)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="folder to write (created if needed)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default %(default)s)")
    p.add_argument("--matcher", default=DEFAULT_MATCHER, help="matcher formulation: plain (model.py) or fast (fast.py); "
                                                             "default %(default)s")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    args = p.parse_args(argv)
    opset, matcher = args.opset, args.matcher
    if not MIN_OPSET <= opset <= MAX_OPSET:
        p.exit(2, f"error: --opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}\n")
    if matcher not in MATCHER_FORMS:
        p.exit(2, f"error: --matcher must be one of {', '.join(MATCHER_FORMS)}, got {matcher!r}\n")
    if not os.path.isfile(args.checkpoint):
        p.exit(2, f"error: {args.checkpoint}: no such checkpoint file\n")

    from imram_min.checkpoint import CheckpointError
    t0 = time.perf_counter()
    try:
        manifest = export_checkpoint(args.checkpoint, args.out, opset=opset, matcher=matcher,
                                     verify=not args.no_verify)
    except (CheckpointError, OSError) as e:
        p.exit(2, "error: " + " ".join(str(e).split()) + "\n")
    except ExportError as e:  # the graphs came out wrong: a bug, not bad input
        p.exit(1, f"error: export check failed: {e}\n")
    cfg = manifest["model_config"]
    check = manifest["verification"]
    note = "" if check is None else ", ONNX Runtime vs PyTorch max abs diff " + \
        ", ".join(f"{k} {v:.1e}" for k, v in check["max_abs_diff"].items())
    print(f"wrote {args.out}: mode={cfg['mode']}, K={cfg['n_steps']}, d={cfg['embed_size']}, opset {opset}, "
          f"matcher {matcher}{note} ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
