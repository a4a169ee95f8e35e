"""The training command's settings: ``TrainConfig``, its flags, DIR/train_defaults.json, and the
checks every setting and the run folder pass before anything is trained or written.

Precedence: an explicit flag > DIR/train_defaults.json (if present) > the paper's defaults
(``IMRAMConfig`` and ``TrainConfig``). vocab_size and img_dim always come from the data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch

from imram_min.engineering import checks
from imram_min.model import IMRAM, MODES, RAW_FEATURE_NORMS, IMRAMConfig
from runtime import cli
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
    precision: str = "fp32"  # fp32 (the paper), autocast to bf16 / fp16 (fp16 with a gradient scaler), or fp64


MODEL_KEYS = [f.name for f in fields(IMRAMConfig) if f.name not in ("vocab_size", "img_dim")]
TRAIN_KEYS = [f.name for f in fields(TrainConfig) if f.name not in ("data", "out")]
DEFAULTS_FILE = "train_defaults.json"
NEW_TRAIN_KEYS = ("precision",)  # added after the first checkpoints: a resumed old run takes their defaults
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
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16", "fp64"],
                   help="fp32: exact float32, the paper (default); bf16 / fp16: autocast mixed precision, "
                        "fp16 with a gradient scaler; fp64: float64 weights and arithmetic (slow: for checking "
                        "that runs agree, e.g. on different process counts)")
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
_CHOICES = {"precision": ("fp32", "bf16", "fp16", "fp64"), "mode": MODES, "raw_feature_norm": RAW_FEATURE_NORMS, "img_encoder": ("basic", "weight_norm")}


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
