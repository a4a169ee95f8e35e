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

Checks and the run folder: every setting (flag, train_defaults.json value, resumed setting: type
and range), the device, the vocabulary and every split read (features shape and dtype, caption
count, train and dev of one img_dim), the model's memory and the run folder are checked before
anything is trained or written; bad input is one ``error: ...`` line, exit status 2, and leaves
every file as it was. A run folder holds one run: --out must be new or empty, or the folder of
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

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

from imram_min import checks, evaluate, schedule
from imram_min.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from imram_min.data import PrecompDataset, collate
from imram_min.model import IMRAM, MODES, RAW_FEATURE_NORMS, IMRAMConfig, contrastive_loss
from runtime import atomic, cli
from runtime.cli import UserError


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
    p = cli.ArgumentParser(prog="python -m imram_min.train", argument_default=S,
                           description="Train IMRAM on precomputed region features.")
    p.add_argument("--data", help="data folder (precomp layout, see imram_min.data)")
    p.add_argument("--out", help="run folder to write: a new or empty folder (default with --resume: the folder "
                                 "of the checkpoint)")
    p.add_argument("--resume", help="RUN/last.pt to continue from")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty --out folder (its config.json, log.jsonl, best.pt, last.pt)")
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
    """DIR/train_defaults.json as {setting: value} ({} if absent). Malformed JSON, anything but an
    object, or an unknown setting is a UserError naming the file (types are checked with the flags)."""
    path = os.path.join(data_dir, DEFAULTS_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object of settings, got {type(raw).__name__}")
    raw = {("n_steps" if k == "iteration_step" else k): v for k, v in raw.items()}
    unknown = sorted(k for k in raw if k not in MODEL_KEYS and k not in TRAIN_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {unknown}; known: {', '.join(MODEL_KEYS + TRAIN_KEYS)}")
    return raw


def resolve_settings(given: dict, data_dir: str) -> tuple[dict, dict, list[str]]:
    """given flags -> (model settings, train settings, names taken from train_defaults.json)."""
    given = dict(given)
    if given.pop("baseline", None) == "mean":
        if given.get("mode", "mean") != "mean":
            raise UserError(f"--baseline mean conflicts with --mode {given['mode']}")
        given["mode"] = "mean"
    file_defaults = read_defaults_file(data_dir)
    settings = {**{k: getattr(IMRAMConfig, k) for k in MODEL_KEYS}, **asdict(TrainConfig())}
    from_file = sorted(k for k in file_defaults if k not in given)
    settings.update({k: file_defaults[k] for k in from_file})
    settings.update(given)
    check_settings(settings, {k: os.path.join(data_dir, DEFAULTS_FILE) for k in from_file})
    return {k: settings[k] for k in MODEL_KEYS}, {k: settings[k] for k in asdict(TrainConfig())}, from_file


# --------------------------------------------------------------------------- up-front checks
_TYPES = {f.name: f.type for f in (*fields(IMRAMConfig), *fields(TrainConfig))}
_FLAGS = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}
_LIMITS = {  # setting: (low, high); high None = unbounded
    "embed_size": (1, 1 << 16), "word_dim": (1, 1 << 16), "num_layers": (1, 64), "n_steps": (1, 64),
    "batch_size": (1, checks.MAX_BATCH), "num_epochs": (0, 1 << 20), "lr_update": (1, None),
    "warmup_epochs": (0, None), "seed": (0, 2 ** 32 - 1), "workers": (0, checks.MAX_WORKERS),
    "max_dev_captions": (0, None),
}
_CHOICES = {"mode": MODES, "raw_feature_norm": RAW_FEATURE_NORMS, "img_encoder": ("basic", "weight_norm")}


def check_settings(settings: dict, sources: dict[str, str]) -> None:
    """Types and ranges of the resolved settings; an error names the flag, or the file a value came
    from (``sources``: setting -> file)."""
    def where(key):
        return f"{sources[key]}: {key}" if key in sources else _FLAGS.get(key, key)

    for key, kind in _TYPES.items():
        if key not in settings or key in ("data", "out", "vocab_size", "img_dim"):
            continue
        value = settings[key]
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "bool": isinstance(value, bool), "str": isinstance(value, str)}.get(kind, True)
        if not ok:
            raise UserError(f"{where(key)} must be a{'n' if kind == 'int' else ''} {kind}, got {value!r}")
        if kind == "float" and not math.isfinite(value):
            raise UserError(f"{where(key)} must be a finite number, got {value!r}")
        if key in _LIMITS:
            low, high = _LIMITS[key]
            if value < low or (high is not None and value > high):
                raise UserError(f"{where(key)} must be {f'>= {low}' if high is None else f'in {low}..{high}'}, "
                                f"got {value}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise UserError(f"{where(key)} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    if "lr" in settings and settings["lr"] <= 0:
        raise UserError(f"{where('lr')} must be > 0, got {settings['lr']}")


RUN_FILES = ("config.json", "log.jsonl", "best.pt", "last.pt")


def check_run_folder(out: str, data: str, resume_path: str | None, overwrite: bool) -> bool:
    """The run folder policy. A run folder holds one run: --out must be new or empty, or the folder
    being resumed (--resume OUT/last.pt), or else --overwrite must be given, and then the old run's
    files (RUN_FILES) are removed once every check has passed, before the new config.json is
    written. Returns whether to remove them. A refused run writes nothing anywhere."""
    cli.check_output_folder(out, "--out")
    if os.path.isdir(data) and os.path.isdir(out) and os.path.samefile(out, data):
        raise UserError(f"--out {out} is the data folder {data}: give a run folder of its own")
    if resume_path and os.path.isdir(out) and os.path.samefile(out, os.path.dirname(os.path.abspath(resume_path))):
        return False  # resuming in place: the run goes on
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not overwrite:
        held = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserError(f"--out {out} is not empty (holds {held}): "
                        "give a new folder, continue its run with --resume, or add --overwrite to replace it")
    return bool(entries)


def estimated_bytes(cfg: IMRAMConfig) -> int | None:
    """Memory of the weights, their gradients and Adam's two moments (float32), counted on the meta device."""
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in IMRAM(cfg).parameters())
    except Exception:  # an estimate only: never block training on it
        return None
    return 16 * n


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
        model_settings, train_settings, from_file = resolve_settings(given, given["data"])
        tcfg = TrainConfig(**train_settings)

    # Every check before anything is trained or written: device, data (vocabulary, every split
    # the run reads), model size, run folder.
    device = checks.device(tcfg.device)
    checks.data_folder(tcfg.data)
    train_split = checks.split(tcfg.data, "train", "--data")
    dev_split = checks.split(tcfg.data, "dev", "--data")
    checks.same_features(train_split, dev_split)
    max_dev = tcfg.max_dev_captions or None  # more than the split holds = all of it
    checks.max_captions(max_dev, dev_split, _FLAGS["max_dev_captions"])
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
    clear_old_run = check_run_folder(tcfg.out, tcfg.data, resume_path, overwrite)
    if state is None and from_file:  # said once every check has passed: a refused run prints only its error
        chosen = {**model_settings, **train_settings}
        print(f"from {os.path.join(tcfg.data, DEFAULTS_FILE)}: " + ", ".join(f"{k}={chosen[k]}" for k in from_file))

    if clear_old_run:  # --overwrite: the old run goes as a whole, before the new one writes anything
        for name in RUN_FILES:
            if os.path.exists(os.path.join(tcfg.out, name)):
                os.remove(os.path.join(tcfg.out, name))
    os.makedirs(tcfg.out, exist_ok=True)
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)
    loader_generator = torch.Generator().manual_seed(tcfg.seed)

    if state is not None:
        model = model.to(device)
    else:
        model = IMRAM(cfg).to(device)
    train_set = PrecompDataset(tcfg.data, "train", vocab)
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
    main()  # bad input: SystemExit(2) after one error line
