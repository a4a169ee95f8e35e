"""``python -m imram_min.evaluate CHECKPOINT --data DIR``: the command (see imram_min.evaluate).

    python -m imram_min.evaluate RUN/best.pt --data DIR --split test [--fold5] [--json OUT.json]
                                             [--save-sims SIMS.npy] [--overwrite] [--device auto] [--batch-size 128]
                                             [--shortlist K[,K...] [--global-head HEAD.pt | --no-global-head]]

The command lives here, apart from imram_min.evaluate (the protocol), because its --shortlist
path (imram_min.search.shortlist, imram_min.search.global_head) builds on the protocol: imram_min.evaluate
imports neither, so there is no import cycle.

The first stage of --shortlist follows python -m export's rule (imram_min.search.global_head.choose_head):
--global-head names a head; else, unless --no-global-head, RUN/global_head.pt beside the checkpoint
when it was distilled from that checkpoint; else the mean embeddings, with one ``note:`` line saying
why. The table and the JSON say which ("first_stage_vectors", "global_head").
"""
from __future__ import annotations

import functools
import sys

import numpy as np
import torch

from imram_min.engineering import checks, distributed, tiling
from imram_min.search import shortlist
from imram_min.search.global_head import GlobalHeadError, choose_head, default_head_path
from imram_min.engineering.checkpoint import load_model
from imram_min.data import PrecompDataset, whole_images_captions
from imram_min.evaluate import evaluate_split, format_table, per_image
from runtime import atomic, cli
from runtime.memory import retain_freed_memory

def main(argv: list[str] | None = None) -> dict:
    """Evaluate; returns the result dict. Bad input (flags, checkpoint, split, output paths): one
    ``error: ...`` line and SystemExit(2), found before anything is encoded or written."""
    return cli.call(_main, argv, user_errors=(*checks.USER_ERRORS, GlobalHeadError))


def _main(argv: list[str] | None) -> dict:
    p = cli.ArgumentParser(prog="python -m imram_min.evaluate",
                           description="Evaluate an imram-min checkpoint (image-text retrieval, SCAN protocol).")
    p.add_argument("checkpoint", help="an imram-min checkpoint (best.pt, last.pt, or one made by imram_min.engineering.convert)")
    p.add_argument("--data", required=True, help="data folder (precomp layout)")
    p.add_argument("--split", default="test", help="split name: DIR/{split}_ims.npy + DIR/{split}_caps.txt")
    p.add_argument("--fold5", action="store_true", help="mean over 5 folds of the images (COCO 1K)")
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON")
    p.add_argument("--save-sims", metavar="OUT.npy", help="write the (n_img, n_cap) float32 similarity matrix")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json or --save-sims file")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=128, help="images / captions per encoding batch")
    p.add_argument("--max-captions", type=int, default=None, help="evaluate the first N captions only")
    p.add_argument("--shortlist", metavar="K[,K...]", help="also the two-stage protocol (imram_min.search.shortlist): "
                   "a first stage over the split, IMRAM re-ranks its top K (a count or a percentage: 10%%)")
    p.add_argument("--global-head", metavar="HEAD.pt", help="with --shortlist: the first stage's vectors from this "
                   "head (python -m imram_min.search.global_head; default: global_head.pt beside the checkpoint, "
                   "when it was distilled from it)")
    p.add_argument("--no-global-head", action="store_true", help="with --shortlist: the first stage is the mean "
                   "embeddings, even with a head beside the checkpoint")
    args = p.parse_args(argv)

    # Every check before the long work: flags, device, split, checkpoint, output paths.
    cli.check_count(args.batch_size, "--batch-size", 1, checks.MAX_BATCH)
    if args.global_head is not None and args.no_global_head:
        raise cli.UserError("--global-head and --no-global-head: give one of them")
    device = checks.device(args.device)
    checks.data_folder(args.data)
    split = checks.split(args.data, args.split)
    checks.max_captions(args.max_captions, split, "--max-captions")
    checks.finite_features(split)  # NaN / Inf: one line naming the file and image row, before any encoding
    n_img = split.kept_images(args.max_captions)
    if args.fold5 and n_img % 5:
        raise cli.UserError(f"--fold5: {n_img} images of split {args.split!r} cannot be cut into 5 equal folds")
    inputs = [args.checkpoint, split.features, split.captions]
    if args.shortlist and not args.no_global_head:  # the head it may read: never an output
        inputs.append(args.global_head if args.global_head is not None else default_head_path(args.checkpoint))
    outputs = [("--json", args.json), ("--save-sims", args.save_sims)]
    for flag, path in outputs:
        if path is not None:
            cli.check_output_file(path, inputs, flag, overwrite=args.overwrite)
    cli.check_outputs_distinct(outputs, inputs)
    if args.shortlist:
        if args.fold5 or args.save_sims:
            raise cli.UserError("--shortlist reports the two-stage metrics of the whole split: without --fold5 "
                                "and --save-sims")
        try:
            n_cap = whole_images_captions(split.image_of_caption, args.max_captions or split.n_captions)
            shortlist.parse_shortlists(args.shortlist, n_img, n_cap)
        except ValueError as e:
            raise cli.UserError(str(e)) from None
    for flag, given in (("--global-head", args.global_head is not None), ("--no-global-head", args.no_global_head)):
        if given and not args.shortlist:
            raise cli.UserError(f"{flag} is the first stage of --shortlist: add --shortlist")
    if args.save_sims is not None and n_img * split.n_captions * 4 > (checks.physical_memory() or float("inf")):
        raise cli.UserError(f"--save-sims: the {n_img} x {split.n_captions} float32 matrix would not fit in memory; "
                            "use --max-captions or --fold5 without --save-sims")
    ctx = distributed.setup(device.type)  # torchrun: each process scores its share of the images
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", ctx.local_rank)
    model, vocab, meta = load_model(args.checkpoint, device)
    if model.cfg.img_dim != split.img_dim:
        raise cli.UserError(f"{split.features}: region features of size {split.img_dim}, but {args.checkpoint} "
                            f"takes img_dim {model.cfg.img_dim}")
    head = head_path = None
    if args.shortlist:  # the rule of python -m export; a file that is not a head: GlobalHeadError, one line
        head, head_path, head_said, head_warnings = choose_head(
            args.checkpoint, args.global_head, args.no_global_head, model.cfg.embed_size,
            without="the first stage is the mean embeddings")
        for warning in head_warnings:
            print(f"{'warning' if head is not None else 'note'}: {warning}", file=sys.stderr)
        if head is None and not head_warnings and not args.no_global_head:
            print(f"note: {head_said}: the first stage is the mean embeddings", file=sys.stderr)

    retain_freed_memory()
    dataset = PrecompDataset(args.data, args.split, vocab, max_captions=args.max_captions)
    if ctx.is_main:
        print(f"{args.checkpoint}: mode={model.cfg.mode}, {args.split}: {dataset.n_images} images, "
              f"{len(dataset)} captions ({per_image(dataset)} per image), device {device}, "
              f"processes {ctx.world}", file=sys.stderr)
    if args.shortlist:
        if ctx.world > 1:
            raise cli.UserError("--shortlist runs in one process (not under torchrun)")
        result = shortlist.run(model, dataset, device, args.shortlist, args.batch_size, head, head_path)
        if args.json:
            atomic.write_json(args.json, result)
        return result
    score_all = functools.partial(distributed.sharded_similarity_matrix, ctx=ctx, score_all=tiling.similarity_matrix)
    result = evaluate_split(model, dataset, device, args.batch_size, fold5=args.fold5,
                            return_sims=bool(args.save_sims), progress=ctx.is_main, score_all=score_all)
    distributed.teardown(ctx)
    sims = result.pop("sims", None)
    result["split"] = args.split
    if not ctx.is_main:
        return result
    print(format_table(result, f"{args.split}{' (5-fold mean)' if args.fold5 else ''}: "
                               f"{result['n_images']} images, {result['n_captions']} captions"))
    if args.json:
        atomic.write_json(args.json, result)
    if args.save_sims:
        atomic.save_npy(args.save_sims, sims.astype(np.float32, copy=False))
    return result


if __name__ == "__main__":
    main()
