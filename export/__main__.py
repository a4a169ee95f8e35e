"""python -m export CKPT --out MODEL_DIR [--opset N] [--matcher plain|fast] [--no-verify]
                 [--feature-extractor [--feature-size PX] [--grid N]] [--global-head HEAD.pt | --no-global-head]

Writes image_encoder.onnx, text_encoder.onnx, matcher.onnx, vocab.json and manifest.json, and
for the fast matcher of a model that updates its memory region_projection.onnx and
word_projection.onnx (see export/onnx_export.py). --feature-extractor adds
feature_extractor.onnx (EfficientNet-Lite0 grid features, for models with img_dim 1280) so that
``python -m runtime.score`` takes pictures; its size and grid are those recorded with the
checkpoint's training data (features.json of the data folder), or --feature-size and --grid:
with neither, export refuses (an extractor at guessed settings would be wrong). A --out that
already holds a model dir's files is not replaced without --overwrite.
The first-stage global head of ``python -m imram_min.search.global_head`` (export.global_head) is
included as image_global.onnx and text_global.onnx, which runtime.index / runtime.search use: by
default the one beside the checkpoint (CKPT's folder/global_head.pt, where that command and
scripts/run.sh write it) when it was distilled from this checkpoint; --global-head names another,
--no-global-head leaves it out (the first stage is then the mean embeddings). The last line says
which.

A bad checkpoint or argument: one "error: ..." line, exit status 2; graphs that fail their check
(invalid ONNX, or ONNX Runtime != PyTorch): exit status 1.
"""
from __future__ import annotations

import os
import sys
import time

from runtime import cli

from .conformance import FILES as CONFORMANCE_FILES
from .global_head import GLOBAL_FILES, add_global_head
from .graphs import DEFAULT_MATCHER, MATCHER_FORMS
from .onnx_export import (DEFAULT_OPSET, FEATURE_EXTRACTOR, FEATURE_EXTRACTOR_FILE, FILES, MANIFEST_FILE, MAX_OPSET,
                          MIN_OPSET, PROJECTION_FILES, VOCAB_FILE, ExportError, ExportSettingsError, export_checkpoint)

MAX_FEATURE_SIZE, MAX_GRID = 2048, 64  # as python -m imram_min.data.features


def main(argv: list[str] | None = None) -> int:
    """Export; 0 on success, 2 after one error line for bad input, 1 when the graphs fail their check."""
    from imram_min.engineering.checkpoint import CheckpointError
    from imram_min.search.global_head import GlobalHeadError
    return cli.run(_main, argv, user_errors=(CheckpointError, ExportSettingsError, GlobalHeadError))


def _main(argv: list[str] | None) -> int:
    p = cli.ArgumentParser(prog="python -m export",
                           description="Export an imram-min checkpoint to ONNX (3 graphs + vocab + manifest, "
                                       "and optionally a picture feature extractor).")
    p.add_argument("checkpoint", help="an imram-min checkpoint (best.pt, last.pt, or made by imram_min.engineering.convert)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="folder to write (created if needed)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default %(default)s)")
    p.add_argument("--matcher", default=DEFAULT_MATCHER, help="matcher formulation: plain (model.py) or fast (fast.py); "
                                                             "default %(default)s")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--feature-extractor", action="store_true",
                   help="also export feature_extractor.onnx (EfficientNet-Lite0 grid features; img_dim 1280 models), "
                        "so the runtime scores image files")
    p.add_argument("--feature-size", type=int, default=None, metavar="PX",
                   help="picture side the extractor takes (default: as recorded with the training data, "
                        "features.json of its data folder; needed when none is recorded)")
    p.add_argument("--grid", type=int, default=None, metavar="N",
                   help="N x N regions per picture (default: as recorded with the training data; needed when none "
                        "is recorded)")
    p.add_argument("--overwrite", action="store_true", help="replace the model dir's files already in --out")
    p.add_argument("--global-head", metavar="HEAD.pt", help="the first-stage head to include as image_global.onnx "
                   "and text_global.onnx (python -m imram_min.search.global_head; default: global_head.pt beside the "
                   "checkpoint, when it was distilled from it)")
    p.add_argument("--no-global-head", action="store_true", help="include no global head: runtime.index's first "
                   "stage is then the mean embeddings")
    args = p.parse_args(argv)
    opset, matcher = args.opset, args.matcher
    cli.check_count(opset, "--opset", MIN_OPSET, MAX_OPSET)
    if matcher not in MATCHER_FORMS:
        raise cli.UserError(f"--matcher must be one of {', '.join(MATCHER_FORMS)}, got {matcher!r}")
    if not args.feature_extractor and (args.feature_size is not None or args.grid is not None):
        raise cli.UserError("--feature-size and --grid set up the feature extractor: add --feature-extractor")
    if args.feature_size is not None:
        cli.check_count(args.feature_size, "--feature-size", 32, MAX_FEATURE_SIZE)
    if args.grid is not None:
        cli.check_count(args.grid, "--grid", 1, MAX_GRID)
    if args.global_head is not None and args.no_global_head:
        raise cli.UserError("--global-head and --no-global-head: give one of them")
    if not os.path.isfile(args.checkpoint):
        raise cli.UserError(f"{args.checkpoint}: no such checkpoint file")
    written = [*FILES.values(), *PROJECTION_FILES.values(), FEATURE_EXTRACTOR_FILE, VOCAB_FILE, MANIFEST_FILE,
               *GLOBAL_FILES.values(), *CONFORMANCE_FILES]
    from imram_min.search.global_head import choose_head, default_head_path
    cli.check_outputs_distinct([("--out", os.path.join(args.out, name)) for name in written],
                               [args.checkpoint, args.global_head, default_head_path(args.checkpoint)])
    cli.check_output_folder(args.out, "--out", overwrite=args.overwrite, outputs=written)  # after: an input first

    from imram_min.engineering.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    try:  # the checkpoint's weights fit its config: checked before any graph is made
        model, _ = model_from_checkpoint(load_checkpoint(args.checkpoint), "cpu")
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(args.checkpoint) else f"{args.checkpoint}: {message}") \
            from None
    head, head_path, head_said, head_warnings = choose_head(
        args.checkpoint, args.global_head, args.no_global_head, model.cfg.embed_size,
        without="runtime.index's first stage will be the mean embeddings")
    for warning in head_warnings:
        print(f"warning: {warning}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        manifest = export_checkpoint(args.checkpoint, args.out, opset=opset, matcher=matcher,
                                     verify=not args.no_verify, feature_extractor=args.feature_extractor,
                                     feature_size=args.feature_size, grid=args.grid)
        if head is not None:
            manifest = add_global_head(args.out, head, head_path, opset, check=not args.no_verify)
    except ExportError as e:  # the graphs came out wrong: a bug, not bad input
        print(f"error: export check failed: {cli.one_line(e)}", file=sys.stderr)
        return 1
    cfg = manifest["model_config"]
    check = manifest["verification"]
    note = "" if check is None else ", ONNX Runtime vs PyTorch max abs diff " + \
        ", ".join(f"{k} {v:.1e}" for k, v in check["max_abs_diff"].items())
    verified = (manifest.get("conformance") or {}).get("verified")
    if verified:  # export.conformance: the runtime passed the folder's conformance vectors
        note += f"; conformance vectors pass ({len(verified['max_abs_diff']) + 2} stages, runtime.check)"
    extractor = ""
    if FEATURE_EXTRACTOR in manifest["graphs"]:
        settings = manifest["source"]["feature_settings"]
        extractor = f", feature extractor {settings['size']} px grid {settings['grid']} (from {settings['from']})"
        recorded = settings.get("recorded")
        if recorded:
            print(f"warning: the training data's features were made at {recorded['size']} px grid {recorded['grid']} "
                  f"({recorded['from']}); the extractor makes {settings['size']} px grid {settings['grid']}, "
                  f"which this model was not trained on", file=sys.stderr)
    if head is not None:
        diffs = manifest["global_head"]["max_abs_diff"]
        extractor += f", {head_said}, {head.config['out_size']} values" + \
            ("" if diffs is None else " (" + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ")")
    else:
        extractor += f", {head_said}"
    print(f"wrote {args.out}: mode={cfg['mode']}, K={cfg['n_steps']}, d={cfg['embed_size']}, opset {opset}, "
          f"matcher {matcher}{extractor}{note} ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
