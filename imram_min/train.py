"""Train IMRAM (or the mean-pooled baseline) on a precomp data folder.

    python -m imram_min.train --data DIR --out RUN [--embed-size 1024 ...] [--resume RUN/last.pt]

Settings, in order of precedence: an explicit flag > DIR/train_defaults.json (if present; one
line says which values came from it) > the paper's defaults (``IMRAMConfig`` and ``TrainConfig``).
vocab_size and img_dim always come from the data (DIR/vocab.json, DIR/train_*.npy).

One epoch: shuffled batches of (image, caption) pairs, one item per caption as the original
(so a batch may hold the same image twice; the loss treats the copy as a negative, as the
original does), scores of all pairs of the batch, the hinge ranking loss (hardest negatives
by default), Adam, gradient-norm clipping. lr = lr0 * 0.1 ** (epoch // lr_update), epochs
counted from 0. After each epoch: dev rsum (first ``max_dev_captions`` captions), RUN/best.pt
if it is the best so far, RUN/last.pt with the whole training state, a line of RUN/log.jsonl.

Outputs, all written atomically:
    RUN/config.json   {"model": IMRAMConfig, "train": TrainConfig, "from_defaults_file": [...]}
    RUN/best.pt       checkpoint of the best dev rsum (imram_min.checkpoint format)
    RUN/last.pt       checkpoint after the last finished epoch + "train_state" for --resume
    RUN/log.jsonl     per epoch: epoch (1-based: epochs done), lr, train_loss (mean per batch),
                      i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr, t2i_..., rsum, seconds

``--resume RUN/last.pt`` continues exactly where last.pt stopped: weights, Adam state, epoch
(hence the lr schedule), best rsum and the RNG states (torch, CUDA, numpy, random, and the
generator that shuffles the batches), so 2 epochs straight and 1 + resume + 1 give identical
weights. On resume the stored settings are used; explicit flags may change the training
settings (e.g. --num-epochs to train longer) but not the model.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

from imram_min import evaluate, schedule
from imram_min.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from imram_min.data import PrecompDataset, collate, load_features, load_vocab
from imram_min.model import IMRAM, IMRAMConfig, contrastive_loss
from runtime import atomic


@dataclass
class TrainConfig:
    """Training settings; defaults are the paper's / original code's."""

    data: str = ""
    out: str = ""
    batch_size: int = 128
    num_epochs: int = 30
    lr: float = 2e-4
    lr_update: int = 15  # lr x 0.1 every lr_update epochs
    grad_clip: float = 2.0  # max gradient norm; <= 0 disables clipping
    warmup_epochs: int = 0  # first epochs sum over all negatives, then max violation (0 = the paper)
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    max_dev_captions: int = 5000  # evaluate dev on its first N captions (0 = all)


MODEL_KEYS = [f.name for f in fields(IMRAMConfig) if f.name not in ("vocab_size", "img_dim")]
TRAIN_KEYS = [f.name for f in fields(TrainConfig) if f.name not in ("data", "out")]
DEFAULTS_FILE = "train_defaults.json"
RUNTIME_KEYS = ("device", "workers")  # may differ between a run and its resumption without changing the result


def build_parser() -> argparse.ArgumentParser:
    """Every flag defaults to SUPPRESS, so that parse_args holds exactly the flags given."""
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(description="Train IMRAM on precomputed region features.", argument_default=S)
    p.add_argument("--data", help="data folder (precomp layout, see imram_min.data)")
    p.add_argument("--out", help="run folder to write (default with --resume: the folder of the checkpoint)")
    p.add_argument("--resume", help="RUN/last.pt to continue from")
    m = p.add_argument_group("model (IMRAMConfig)")
    m.add_argument("--embed-size", dest="embed_size", type=int, help="joint embedding size d (1024)")
    m.add_argument("--word-dim", dest="word_dim", type=int, help="word embedding size (300)")
    m.add_argument("--num-layers", dest="num_layers", type=int, help="GRU layers (1)")
    m.add_argument("--no-bi-gru", dest="bi_gru", action="store_false", help="unidirectional GRU")
    m.add_argument("--img-encoder", dest="img_encoder", choices=["basic", "weight_norm"], help="(basic)")
    m.add_argument("--no-imgnorm", dest="no_imgnorm", action="store_true", help="no l2norm of region embeddings")
    m.add_argument("--no-txtnorm", dest="no_txtnorm", action="store_true", help="no l2norm of word embeddings")
    m.add_argument("--raw-feature-norm", dest="raw_feature_norm", help="attention normalisation (clipped_l2norm)")
    m.add_argument("--lambda-softmax", dest="lambda_softmax", type=float, help="attention inverse temperature (9)")
    m.add_argument("--mode", choices=["full", "text", "image", "mean"], help="full, text, image IMRAM (full)")
    m.add_argument("--n-steps", "--iteration-step", dest="n_steps", type=int, help="matching steps K (3)")
    m.add_argument("--no-imram-norm", dest="no_IMRAM_norm", action="store_true", help="no l2norm of the memory")
    m.add_argument("--margin", type=float, help="ranking loss margin (0.2)")
    m.add_argument("--no-max-violation", dest="max_violation", action="store_false", help="sum over negatives")
    m.add_argument("--baseline", choices=["mean"], help="train the mean-pooled VSE baseline (mode mean)")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", dest="batch_size", type=int, help="(128)")
    t.add_argument("--num-epochs", dest="num_epochs", type=int, help="(30)")
    t.add_argument("--lr", type=float, help="initial learning rate (2e-4)")
    t.add_argument("--lr-update", dest="lr_update", type=int, help="lr x 0.1 every N epochs (15)")
    t.add_argument("--grad-clip", dest="grad_clip", type=float, help="max gradient norm, <= 0: none (2.0)")
    t.add_argument("--warmup-epochs", dest="warmup_epochs", type=int,
                   help="epochs that sum the loss over all negatives before hardest negatives take over, "
                        "as VSE-infinity's warm-up; 0 = max violation from the start, as the paper (0)")
    t.add_argument("--seed", type=int, help="(0)")
    t.add_argument("--device", help="auto (cuda if available), cpu, cuda (auto)")
    t.add_argument("--workers", type=int, help="data-loader workers (0)")
    t.add_argument("--max-dev-captions", dest="max_dev_captions", type=int,
                   help="dev captions evaluated, 0 = all (5000)")
    return p


def read_defaults_file(data_dir: str) -> dict:
    """DIR/train_defaults.json as {setting: value}, keys restricted to known settings ({} if absent)."""
    path = os.path.join(data_dir, DEFAULTS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    raw = {("n_steps" if k == "iteration_step" else k): v for k, v in raw.items()}
    unknown = sorted(k for k in raw if k not in MODEL_KEYS and k not in TRAIN_KEYS)
    if unknown:
        print(f"warning: {path}: ignoring unknown settings {unknown}", file=sys.stderr)
    return {k: v for k, v in raw.items() if k not in unknown}


def resolve_settings(given: dict, data_dir: str) -> tuple[dict, dict, list[str]]:
    """given flags -> (model settings, train settings, names taken from train_defaults.json)."""
    given = dict(given)
    if given.pop("baseline", None) == "mean":
        if given.get("mode", "mean") != "mean":
            raise SystemExit(f"--baseline mean conflicts with --mode {given['mode']}")
        given["mode"] = "mean"
    file_defaults = read_defaults_file(data_dir)
    settings = {**{k: getattr(IMRAMConfig, k) for k in MODEL_KEYS}, **asdict(TrainConfig())}
    from_file = sorted(k for k in file_defaults if k not in given)
    settings.update({k: file_defaults[k] for k in from_file})
    settings.update(given)
    if from_file:
        print(f"from {os.path.join(data_dir, DEFAULTS_FILE)}: "
              + ", ".join(f"{k}={file_defaults[k]}" for k in from_file))
    return {k: settings[k] for k in MODEL_KEYS}, {k: settings[k] for k in asdict(TrainConfig())}, from_file


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


def train_epoch(model: IMRAM, loader, optimizer, cfg: TrainConfig, device: torch.device, epoch: int) -> float:
    """One pass over the loader; returns the mean batch loss."""
    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.num_epochs}", leave=False, dynamic_ncols=True)
    for region_feats, tokens, lengths, _cap_ids, _img_ids in bar:
        region_embs = model.encode_images(region_feats.to(device, non_blocking=True))
        word_embs = model.encode_captions(tokens.to(device, non_blocking=True), lengths)  # lengths stay on the CPU
        pair_scores = schedule.score_pairs(model, region_embs, word_embs, lengths)  # (B, B)
        max_violation = model.cfg.max_violation and epoch >= cfg.warmup_epochs
        loss = contrastive_loss(pair_scores, model.cfg.margin, max_violation)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # stop before the weights are spoilt
            raise FloatingPointError(f"epoch {epoch + 1}, batch {n + 1}: loss {loss.item()}, gradient norm "
                                     f"{grad_norm.item()}; not finite, the step was not taken")
        optimizer.step()
        total, n = total + loss.item(), n + 1
        bar.set_postfix(loss=f"{total / n:.4f}")
    bar.close()
    return total / max(n, 1)


def dev_metrics(model: IMRAM, dataset: PrecompDataset, cfg: TrainConfig, device: torch.device) -> dict:
    """Flat dev metrics: i2t_r1 .. t2i_meanr, rsum."""
    r = evaluate.evaluate_split(model, dataset, device, batch_size=cfg.batch_size)
    names = ("r1", "r5", "r10", "medr", "meanr")
    flat = {f"{d}_{k}": float(v) for d in ("i2t", "t2i") for k, v in zip(names, r[d])}
    flat["rsum"] = float(r["rsum"])
    return flat


def rewrite_log(src: str, dst: str, keep_epochs: int) -> None:
    """Copy log lines of epochs <= keep_epochs from src to dst (a resumed run drops later lines)."""
    lines = []
    if os.path.exists(src):
        with open(src, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["epoch"] <= keep_epochs]
    atomic.write_text(dst, "".join(lines))


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the last epoch's log entry (or {} if there was nothing left to train)."""
    given = vars(build_parser().parse_args(argv))
    schedule.retain_freed_memory()
    resume_path = given.pop("resume", None)
    state = None
    if resume_path:
        ckpt = load_checkpoint(resume_path)
        if "train_state" not in ckpt:
            raise SystemExit(f"{resume_path} has no training state (resume from a last.pt)")
        state = ckpt["train_state"]
        stored_model, stored_train = ckpt["config"], state["train_config"]
        changed = sorted(k for k in MODEL_KEYS if k in given and given[k] != stored_model[k])
        if given.get("baseline") == "mean" and stored_model["mode"] != "mean":
            changed.append("mode")
        if changed:
            raise SystemExit(f"cannot change model settings on resume: {changed}")
        given.pop("baseline", None)
        train_settings = {**stored_train, **{k: v for k, v in given.items() if k in asdict(TrainConfig())}}
        if "out" not in given:
            train_settings["out"] = os.path.dirname(os.path.abspath(resume_path))
        tcfg = TrainConfig(**train_settings)
        from_file = state.get("from_defaults_file", [])
    else:
        if "data" not in given or "out" not in given:
            raise SystemExit("--data and --out are required (unless --resume)")
        model_settings, train_settings, from_file = resolve_settings(given, given["data"])
        tcfg = TrainConfig(**train_settings)

    device = schedule.resolve_device(tcfg.device)
    os.makedirs(tcfg.out, exist_ok=True)
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)
    loader_generator = torch.Generator().manual_seed(tcfg.seed)

    vocab = load_vocab(tcfg.data)
    if state is not None:
        model, vocab = model_from_checkpoint(ckpt, device)
    else:
        img_dim = int(load_features(tcfg.data, "train").shape[2])
        model = IMRAM(IMRAMConfig(vocab_size=len(vocab), img_dim=img_dim, **model_settings)).to(device)
    train_set = PrecompDataset(tcfg.data, "train", vocab)
    max_dev = tcfg.max_dev_captions or None  # more than the split holds = all of it
    dev_set = PrecompDataset(tcfg.data, "dev", vocab, max_captions=max_dev)
    loader = torch.utils.data.DataLoader(train_set, batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=tcfg.workers, generator=loader_generator,
                                         pin_memory=device.type == "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr)

    start_epoch, best_rsum = 0, -float("inf")
    log_path = os.path.join(tcfg.out, "log.jsonl")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_rsum = int(state["epoch"]), float(state["best_rsum"])
        set_rng_state(state["rng"], loader_generator)
        src_dir = os.path.dirname(os.path.abspath(resume_path))
        rewrite_log(os.path.join(src_dir, "log.jsonl"), log_path, start_epoch)
        src_best, dst_best = os.path.join(src_dir, "best.pt"), os.path.join(tcfg.out, "best.pt")
        if os.path.exists(src_best) and os.path.abspath(src_best) != os.path.abspath(dst_best):
            with open(src_best, "rb") as f:  # a new run folder starts with the best so far
                atomic.write_bytes(dst_best, f.read())
        print(f"resumed from {resume_path} after epoch {start_epoch} (best dev rsum {best_rsum:.2f})")
    else:
        rewrite_log(log_path, log_path, 0)  # a fresh run starts a fresh log
    atomic.write_json(os.path.join(tcfg.out, "config.json"),
                      {"model": model.cfg.to_dict(), "train": asdict(tcfg), "from_defaults_file": from_file})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"mode={model.cfg.mode} params={n_params:,} train={len(train_set)} captions / {train_set.n_images} images, "
          f"dev={len(dev_set)} captions, device={device}")

    entry = {}
    for epoch in range(start_epoch, tcfg.num_epochs):
        t0 = time.perf_counter()
        lr = learning_rate(tcfg.lr, epoch, tcfg.lr_update)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss = train_epoch(model, loader, optimizer, tcfg, device, epoch)
        dev = dev_metrics(model, dev_set, tcfg, device)
        entry = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **dev,
                 "seconds": round(time.perf_counter() - t0, 3)}
        is_best = dev["rsum"] > best_rsum
        best_rsum = max(best_rsum, dev["rsum"])
        meta = {"epoch": epoch + 1, "dev": dev, "best_rsum": best_rsum}
        if is_best:
            save_checkpoint(os.path.join(tcfg.out, "best.pt"), model, vocab, meta)
        train_state = {"epoch": epoch + 1, "best_rsum": best_rsum, "optimizer": optimizer.state_dict(),
                       "rng": rng_state(loader_generator), "train_config": asdict(tcfg),
                       "from_defaults_file": from_file}
        with open(log_path, "a", encoding="utf-8") as f:  # before last.pt: a resume drops lines past its epoch
            f.write(json.dumps(entry) + "\n")
        save_checkpoint(os.path.join(tcfg.out, "last.pt"), model, vocab, meta, train_state)
        print(f"epoch {epoch + 1}/{tcfg.num_epochs} lr {lr:.2e} loss {train_loss:.4f} dev rsum {dev['rsum']:.2f} "
              f"(i2t R@1 {dev['i2t_r1']:.1f}, t2i R@1 {dev['t2i_r1']:.1f}){' *best*' if is_best else ''} "
              f"{entry['seconds']:.1f}s")
    return entry


if __name__ == "__main__":
    main()
