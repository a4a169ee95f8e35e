"""Train IMRAM (or the mean-pooled baseline) on a precomp data folder.

    python -m imram_min.train --data DIR --out RUN [--embed-size 1024 ...] [--resume RUN/last.pt]

Settings, in order of precedence: an explicit flag > DIR/train_defaults.json (if present; one
line says which values came from it) > the paper's defaults (``IMRAMConfig`` and ``TrainConfig``).
vocab_size and img_dim always come from the data (DIR/vocab.json, DIR/train_*.npy).

One epoch: shuffled batches of (image, caption) pairs, one item per caption as the original
(so a batch may hold the same image twice; in the SCAN layout, 5 or 1 captions per image, the
loss treats the copy as a negative, as the original does; in another layout, any number of
captions per image given by DIR/train_cap2img.txt, pairs of one picture are no negatives: see
imram_min.loss), scores of all pairs of the batch, the hinge ranking loss (12) (hardest negatives
by default; ``imram_min.loss.BatchLoss``), Adam, gradient-norm clipping. lr = lr0 * 0.1 **
(epoch // lr_update), epochs counted from 0. After each epoch: dev rsum (first ``max_dev_captions``
captions), RUN/best.pt if it is the best so far, RUN/last.pt with the whole training state, a line
of RUN/log.jsonl.

Outputs, all written atomically:
    RUN/config.json   {"model": IMRAMConfig, "train": TrainConfig, "from_defaults_file": [...]}
    RUN/best.pt       checkpoint of the best dev rsum (imram_min.engineering.checkpoint format)
    RUN/last.pt       checkpoint after the last finished epoch + "train_state" for --resume
    RUN/log.jsonl     per epoch: epoch (1-based: epochs done), lr, train_loss (mean per batch),
                      i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr, t2i_..., rsum, seconds

Checks and the run folder: every setting (flag, train_defaults.json value, resumed setting: type
and range), the device, the vocabulary and every split read (features shape and dtype, every
feature finite (read in chunks; a NaN or Inf names the file and image row), caption count or the
DIR/{split}_cap2img.txt sidecar, train and dev of one img_dim), the model's memory and the run
folder are checked before anything is trained or written; bad input is one ``error: ...`` line,
exit status 2, and leaves every file as it was. A run folder holds one run: --out must be new or empty, or the folder of
the --resume checkpoint, else --overwrite must be given, and then the old run's config.json,
log.jsonl, best.pt and last.pt are removed together (other files are kept) once the checks have
passed, before the new config.json is written.

``--resume RUN/last.pt`` continues exactly where last.pt stopped: weights, Adam state, epoch
(hence the lr schedule), best rsum and the RNG states (torch, CUDA, numpy, random, and the
generator that shuffles the batches), so 2 epochs straight and 1 + resume + 1 give identical
weights. On resume the stored settings are used; explicit flags may change the training
settings (e.g. --num-epochs to train longer) but not the model.
"""
from __future__ import annotations

import copy
import errno
import functools
import json
import os
import random
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from imram_min import evaluate
from imram_min.data import PrecompDataset, collate
from imram_min.loss import BatchLoss
from imram_min.model import IMRAM, IMRAMConfig
from imram_min.engineering import checks, distributed, tiling
from imram_min.engineering.checkpoint import (CheckpointError, DiskFullError, device_of, load_checkpoint,
                                              model_from_checkpoint, remove_stale_temps, save_checkpoint)
from imram_min.engineering.settings import (_FLAGS, DEFAULTS_FILE, MODEL_KEYS, NEW_TRAIN_KEYS, RUN_FILES,  # noqa: F401
                                            TrainConfig, build_parser, check_run_folder, check_settings,
                                            estimated_bytes, resolve_settings)
from runtime import atomic, cli
from runtime.cli import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": None}  # the autocast dtype


# --------------------------------------------------------------------------- RNG state
def rng_state(loader_generator: torch.Generator) -> dict:
    """All RNG states as tensors and plain Python values (safe for weights_only loading)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "internal": list(py_state[1]), "gauss_next": py_state[2]},
        "loader": loader_generator.get_state(),
    }


def set_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    loader_generator.set_state(state["loader"])


# --------------------------------------------------------------------------- training
def learning_rate(lr0: float, epoch: int, lr_update: int) -> float:
    """lr of epoch ``epoch`` (0-based): lr0 * 0.1 ** (epoch // lr_update)."""
    return lr0 * 0.1 ** (epoch // lr_update)


def train_epoch(step: torch.nn.Module, loader, optimizer, scaler, cfg: TrainConfig, device: torch.device,
                epoch: int, ctx: distributed.Context, same_image_negatives: bool = True) -> float:
    """One pass over the loader; returns the mean batch loss of the global batches.

    same_image_negatives: True (the SCAN layout, the original) a repeat of an image in a batch is
    a negative; False (another layout) the batch's image ids go to the loss, which skips such pairs.

    step: ``loss.BatchLoss`` (in DistributedDataParallel on N processes): this process's
    slice of a global batch -> its loss term. The autocast of ``cfg.precision`` covers the forward
    pass; fp16 scales the loss (``scaler``) and skips a step whose gradients overflowed."""
    model = step.module.model if isinstance(step, torch.nn.parallel.DistributedDataParallel) else step.model
    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", leave=False, dynamic_ncols=True,
               disable=not ctx.is_main)
    dtype, weights_dtype = PRECISIONS[cfg.precision], next(model.parameters()).dtype
    max_violation = model.cfg.max_violation and epoch >= cfg.warmup_epochs
    for region_feats, tokens, lengths, _cap_ids, img_ids in bar:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step(region_feats.to(device, weights_dtype, non_blocking=True), tokens.to(device, non_blocking=True),
                        lengths, max_violation, None if same_image_negatives else img_ids)  # lengths stay on the CPU
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        batch_loss = distributed.all_reduce_sum(float(loss) / ctx.world, ctx)  # the global batch's loss
        overflow_skipped = scaler.is_enabled() and not torch.isfinite(grad_norm)
        if not (np.isfinite(batch_loss) and (torch.isfinite(grad_norm) or overflow_skipped)):
            raise FloatingPointError(f"epoch {epoch + 1}, batch {n + 1}: loss {batch_loss}, gradient norm "
                                     f"{grad_norm.item()}; not finite, the step was not taken")
        scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
        scaler.update()
        total, n = total + batch_loss, n + 1
        bar.set_postfix(loss=f"{total / n:.4f}")
    bar.close()
    return total / max(n, 1)


def dev_metrics(model: IMRAM, dataset: PrecompDataset, cfg: TrainConfig, device: torch.device,
                ctx: distributed.Context) -> dict:
    """Flat dev metrics: i2t_r1 .. t2i_meanr, rsum. On N processes each scores its share of the images.
    Scored in float32, as evaluate does (a float32 copy of an fp64 model)."""
    model = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    score_all = functools.partial(distributed.sharded_similarity_matrix, ctx=ctx, score_all=tiling.similarity_matrix)
    r = evaluate.evaluate_split(model, dataset, device, batch_size=cfg.batch_size, score_all=score_all)
    names = ("r1", "r5", "r10", "medr", "meanr")
    flat = {f"{d}_{k}": float(v) for d in ("i2t", "t2i") for k, v in zip(names, r[d])}
    flat["rsum"] = float(r["rsum"])
    return flat


def rewrite_log(src: str, dst: str, keep_epochs: int) -> str | None:
    """Copy log lines of epochs <= keep_epochs from src to dst (a resumed run drops later lines).

    A torn last line (the run was killed while appending it) is dropped: returns a note saying so
    (else None). Any other line that is not a JSON object with an "epoch" is a UserError naming it."""
    lines, note = [], None
    if keep_epochs > 0 and os.path.exists(src):
        with open(src, encoding="utf-8", errors="replace") as f:
            raw = f.read().split("\n")
        numbered = [(k + 1, ln) for k, ln in enumerate(raw) if ln.strip()]
        for position, (line_no, ln) in enumerate(numbered):
            try:
                epoch = json.loads(ln)["epoch"]
                if not isinstance(epoch, int):
                    raise TypeError(epoch)
            except (ValueError, KeyError, TypeError, IndexError):
                if position == len(numbered) - 1:  # the last line: torn by a kill while it was written
                    note = (f"note: {src}: dropped its last line {line_no} (torn, not a complete JSON log entry: "
                            f"{ln[:60]!r})")
                    break
                raise UserError(f"{src}: line {line_no} is not a JSON log entry with an epoch ({ln[:60]!r}); "
                                "repair or remove the line to resume") from None
            if epoch <= keep_epochs:
                lines.append(ln + "\n")
    atomic.write_text(dst, "".join(lines))
    return note


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the last epoch's log entry (or {} if there was nothing left to train).

    Bad input (flags, data, checkpoint, run folder): one ``error: ...`` line on stderr and
    SystemExit(2), found before anything is trained or written (runtime/cli.py)."""
    return cli.call(_main, argv, user_errors=(*checks.USER_ERRORS, FloatingPointError))


def _main(argv: list[str] | None) -> dict:
    given = vars(build_parser().parse_args(argv))
    overwrite = given.pop("overwrite", False)
    resume_path = given.pop("resume", None)
    state = None
    if resume_path:
        ckpt = load_checkpoint(resume_path)
        if not isinstance(ckpt.get("train_state"), dict):
            raise UserError(f"{resume_path} has no training state (resume from a last.pt)")
        state = ckpt["train_state"]
        stored_model, stored_train = ckpt["config"], state.get("train_config")
        if isinstance(stored_train, dict):  # settings added since the checkpoint was written: their defaults
            stored_train = {**{k: v for k, v in asdict(TrainConfig()).items() if k in NEW_TRAIN_KEYS}, **stored_train}
        if not isinstance(stored_model, dict) or not isinstance(stored_train, dict) \
                or set(stored_train) != set(asdict(TrainConfig())):
            raise CheckpointError(f"{resume_path}: its training state does not hold this version's settings")
        changed = sorted(k for k in MODEL_KEYS if k in given and given[k] != stored_model.get(k))
        if given.get("baseline") == "mean" and stored_model.get("mode") != "mean":
            changed.append("mode")
        if changed:
            raise UserError(f"cannot change model settings on resume: {changed}")
        given.pop("baseline", None)
        train_settings = {**stored_train, **{k: v for k, v in given.items() if k in asdict(TrainConfig())}}
        if "out" not in given:
            train_settings["out"] = os.path.dirname(os.path.abspath(resume_path))
        check_settings(train_settings, {k: f"{resume_path} (train_config)" for k in stored_train if k not in given})
        tcfg = TrainConfig(**train_settings)
        from_file = state.get("from_defaults_file", [])
    else:
        if "data" not in given or "out" not in given:
            raise UserError("--data and --out are required (unless --resume)")
        checks.data_folder(given["data"])
        checks.vocabulary(given["data"])  # first: a folder without one is told which command makes it
        model_settings, train_settings, from_file = resolve_settings(given, given["data"])
        tcfg = TrainConfig(**train_settings)

    # Every check before anything is trained or written: device, data (vocabulary, every split
    # the run reads), model size, run folder.
    device = checks.device(tcfg.device)
    ctx = distributed.setup(device.type)  # torchrun: join the process group (gloo on the CPU, nccl on CUDA)
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    checks.data_folder(tcfg.data)
    train_split = checks.split(tcfg.data, "train", "--data")
    dev_split = checks.split(tcfg.data, "dev", "--data")
    checks.same_features(train_split, dev_split)
    max_dev = tcfg.max_dev_captions or None  # more than the split holds = all of it
    checks.max_captions(max_dev, dev_split, _FLAGS["max_dev_captions"])
    for split in (train_split, dev_split):  # NaN / Inf in a feature file: found now, naming its row
        checks.finite_features(split)
    if state is not None:
        try:
            model, vocab = model_from_checkpoint(ckpt, "cpu")
        except CheckpointError as e:
            raise CheckpointError(f"{resume_path}: {e}") from None
        if model.cfg.img_dim != train_split.img_dim:
            raise UserError(f"{train_split.features}: region features of size {train_split.img_dim}, but "
                            f"{resume_path} was trained on img_dim {model.cfg.img_dim}")
    else:
        vocab = checks.vocabulary(tcfg.data)
        try:
            cfg = IMRAMConfig(vocab_size=len(vocab), img_dim=train_split.img_dim, **model_settings)
        except ValueError as e:
            raise UserError(str(e)) from None
        need, have = estimated_bytes(cfg), checks.physical_memory()
        if need is not None and have is not None and need > have:
            raise UserError(f"the model would need about {need / 2 ** 30:.1f} GiB for its weights, gradients and "
                            f"Adam state, more than this machine's {have / 2 ** 30:.1f} GiB: use a smaller "
                            "--embed-size / --word-dim / --num-layers")
    check_global_batch(train_split.n_captions, tcfg.batch_size, ctx.world)
    clear_old_run = check_run_folder(tcfg.out, tcfg.data, resume_path, overwrite)
    say = print if ctx.is_main else (lambda *a, **k: None)  # rank 0 speaks and writes for the run
    if state is None and from_file:  # said once every check has passed: a refused run prints only its error
        chosen = {**model_settings, **train_settings}
        say(f"from {os.path.join(tcfg.data, DEFAULTS_FILE)}: " + ", ".join(f"{k}={chosen[k]}" for k in from_file))

    if clear_old_run and ctx.is_main:  # --overwrite: the old run goes as a whole, before the new one writes anything
        for name in RUN_FILES:
            if os.path.exists(os.path.join(tcfg.out, name)):
                os.remove(os.path.join(tcfg.out, name))
    if ctx.is_main:
        os.makedirs(tcfg.out, exist_ok=True)
        for name in RUN_FILES:  # temporary files of a run killed in a rename window
            for tmp in remove_stale_temps(os.path.join(tcfg.out, name)):
                say(f"note: removed {tmp}, the temporary file of a killed save", file=sys.stderr)
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)
    loader_generator = torch.Generator().manual_seed(tcfg.seed)

    if state is not None:
        model = model.to(device)
    else:
        model = IMRAM(cfg).to(device)
    if tcfg.precision == "fp64":  # float64 weights and arithmetic throughout the step
        model = model.double()
        if state is not None:
            model.load_state_dict(ckpt["model"])  # the stored float64 values, not rounded
    train_set = PrecompDataset(tcfg.data, "train", vocab)
    dev_set = PrecompDataset(tcfg.data, "dev", vocab, max_captions=max_dev)
    # the global batches of one process's DataLoader(shuffle=True); each process loads its slice of each
    batches = distributed.GlobalBatchSampler(torch.utils.data.RandomSampler(train_set, generator=loader_generator),
                                             tcfg.batch_size, ctx.rank, ctx.world)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=collate, num_workers=tcfg.workers,
                                         generator=loader_generator, pin_memory=device.type == "cuda")
    step = BatchLoss(model, tiling.score_pairs, ctx)
    if ctx.world > 1:
        step = torch.nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.precision == "fp16")

    start_epoch, best_rsum = 0, -float("inf")
    log_path = os.path.join(tcfg.out, "log.jsonl")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_rsum = int(state["epoch"]), float(state["best_rsum"])
        set_rng_state(state["rng"], loader_generator)
        src_dir = os.path.dirname(os.path.abspath(resume_path))
        src_best, dst_best = os.path.join(src_dir, "best.pt"), os.path.join(tcfg.out, "best.pt")
        if ctx.is_main:
            note = rewrite_log(os.path.join(src_dir, "log.jsonl"), log_path, start_epoch)
            if note:
                say(note, file=sys.stderr)
            if os.path.exists(src_best) and os.path.abspath(src_best) != os.path.abspath(dst_best):
                with open(src_best, "rb") as f:  # a new run folder starts with the best so far
                    atomic.write_bytes(dst_best, f.read())
        say(f"resumed from {resume_path} after epoch {start_epoch} (best dev rsum {best_rsum:.2f})")
    elif ctx.is_main:
        rewrite_log(log_path, log_path, 0)  # a fresh run starts a fresh log
    if ctx.is_main:
        atomic.write_json(os.path.join(tcfg.out, "config.json"),
                          {"model": model.cfg.to_dict(), "train": asdict(tcfg), "from_defaults_file": from_file})
    n_params = sum(p.numel() for p in model.parameters())
    say(f"mode={model.cfg.mode} params={n_params:,} train={len(train_set)} captions / {train_set.n_images} images, "
          f"dev={len(dev_set)} captions, device={device}, processes={ctx.world}, precision={tcfg.precision}")

    entry = {}
    for epoch in range(start_epoch, tcfg.num_epochs):
        t0 = time.perf_counter()
        lr = learning_rate(tcfg.lr, epoch, tcfg.lr_update)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss = train_epoch(step, loader, optimizer, scaler, tcfg, device, epoch, ctx,
                                 same_image_negatives=train_set.caps_per_image is not None)
        dev = dev_metrics(model, dev_set, tcfg, device, ctx)
        entry = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **dev,
                 "seconds": round(time.perf_counter() - t0, 3)}
        is_best = dev["rsum"] > best_rsum
        best_rsum = max(best_rsum, dev["rsum"])
        meta = {"epoch": epoch + 1, "dev": dev, "best_rsum": best_rsum}
        if not ctx.is_main:
            continue
        train_state = {"epoch": epoch + 1, "best_rsum": best_rsum, "optimizer": optimizer.state_dict(),
                       "rng": rng_state(loader_generator), "train_config": asdict(tcfg),
                       "from_defaults_file": from_file}
        try:
            if is_best:
                save_checkpoint(os.path.join(tcfg.out, "best.pt"), model, vocab, meta)
            with open(log_path, "a", encoding="utf-8") as f:  # before last.pt: a resume drops lines past its epoch
                f.write(json.dumps(entry) + "\n")
            save_checkpoint(os.path.join(tcfg.out, "last.pt"), model, vocab, meta, train_state)
        except (DiskFullError, OSError) as e:  # a full disk: one line naming the device (checkpoint.device_of)
            if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            last = os.path.join(tcfg.out, "last.pt")
            resume = f"; free space, then resume with --resume {last}" if os.path.exists(last) else ""
            why = e if isinstance(e, DiskFullError) else f"{log_path}: no space left on device {device_of(log_path)}"
            raise UserError(f"epoch {epoch + 1} was not saved: {why}{resume}") from None
        say(f"epoch {epoch + 1}/{tcfg.num_epochs} lr {lr:.2e} loss {train_loss:.4f} dev rsum {dev['rsum']:.2f} "
              f"(i2t R@1 {dev['i2t_r1']:.1f}, t2i R@1 {dev['t2i_r1']:.1f}){' *best*' if is_best else ''} "
              f"{entry['seconds']:.1f}s")
    distributed.teardown(ctx)
    return entry


def check_global_batch(n_items: int, batch_size: int, world: int) -> None:
    """On N processes every one needs an item of every global batch, the last (smaller) one too."""
    if world > 1 and (batch_size < world or 0 < n_items % batch_size < world):
        raise UserError(f"--batch-size {batch_size} over {n_items} captions leaves a global batch of fewer items than "
                        f"the {world} processes: choose a batch size whose last batch has at least {world}")


if __name__ == "__main__":
    main()  # bad input: SystemExit(2) after one error line
