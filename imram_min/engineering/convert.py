"""Convert an original IMRAM checkpoint (model_best.pth.tar) to this project's checkpoint format.

    python -m imram_min.engineering.convert model_best.pth.tar --vocab f30k_precomp_vocab.json --out f30k.pt \
        [--overwrite]

The original file is ``torch.save({"model": ..., "opt": argparse.Namespace, "epoch": ..., ...})``.
It is read with ``torch.load(weights_only=True)`` with ``argparse.Namespace`` as the only extra
class allowed: anything else pickled in it (any other class or function) is refused, never run.

"model" is accepted in either layout:

* a list of state dicts, in the original's order: img_enc, txt_enc, then (if saved) linear_t2i,
  gate_t2i, linear_i2t, gate_i2t;
* one flat state dict with the original names (img_enc.fc.* or img_enc.fc_local.*, txt_enc.embed.*,
  txt_enc.rnn.*, linear_t2i.*, gate_t2i.*, linear_i2t.*, gate_i2t.*).

``module.`` (DataParallel) components are dropped wherever they appear in a key. Names are mapped
to ``imram_min.model``:

    img_enc.fc{,_local}.{weight, bias, weight_g, weight_v} -> img_enc.fc.*
    txt_enc.embed.weight, txt_enc.rnn.*                     -> the same
    linear_t2i.* -> text_mdu.update.*    gate_t2i.* -> text_mdu.gate.*     (Text-IMRAM)
    linear_i2t.* -> image_mdu.update.*   gate_i2t.* -> image_mdu.gate.*    (Image-IMRAM)

The original builds all four memory layers whatever its model_mode; those of a direction the
mode does not use are dropped (and said so). Any other missing or unexpected key, or a shape
that differs from the model the options describe, is an error listing all of them.

"opt" -> IMRAMConfig: model_mode full_IMRAM / text_IMRAM / image_IMRAM -> mode full / text /
image, iteration_step -> n_steps, precomp_enc_type -> img_encoder, the other names are the same.
Sizes missing from opt (embed_size, word_dim, img_dim, num_layers, bi_gru) are read off the
weights; other missing options take the original code's defaults (ORIGINAL_DEFAULTS).
vocab_size is the number of rows of the word embedding and must equal the vocabulary's size.
"""
from __future__ import annotations

import argparse
import os
import re

import torch

from imram_min.engineering.checkpoint import safe_load_reason, save_checkpoint
from imram_min.model import IMRAM, IMRAMConfig
from runtime import cli
from runtime.text import Vocabulary, VocabularyError

# The original train.py's argparse defaults (store_true flags default to False).
ORIGINAL_DEFAULTS = {
    "model_mode": "full_IMRAM",
    "iteration_step": IMRAMConfig.n_steps,
    "lambda_softmax": IMRAMConfig.lambda_softmax,
    "raw_feature_norm": IMRAMConfig.raw_feature_norm,
    "no_IMRAM_norm": False,
    "precomp_enc_type": "basic",
    "no_imgnorm": False,
    "no_txtnorm": False,
    "margin": 0.2,
    "max_violation": False,
}
MODES = {"full_IMRAM": "full", "text_IMRAM": "text", "image_IMRAM": "image"}
LIST_ORDER = ("img_enc", "txt_enc", "linear_t2i", "gate_t2i", "linear_i2t", "gate_i2t")
MEMORY_NAMES = {"linear_t2i": "text_mdu.update", "gate_t2i": "text_mdu.gate",
                "linear_i2t": "image_mdu.update", "gate_i2t": "image_mdu.gate"}


class ConvertError(ValueError):
    """An original checkpoint that cannot be converted; the message says why."""


def load_original(path: str | os.PathLike) -> dict:
    """torch.load the original checkpoint safely: tensors, containers and argparse.Namespace only."""
    if not os.path.isfile(path):
        raise ConvertError(f"{os.fspath(path)}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign classes, RuntimeError / EOFError for broken files, ...
        reason = safe_load_reason(e).replace("plain tensors/containers",
                                             "plain tensors/containers or argparse.Namespace")
        verb = "refused to load" if reason.startswith("it pickles") else "cannot load"
        raise ConvertError(f"{os.fspath(path)}: {verb}: {reason}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ConvertError(f"{path}: expected a dict with a 'model' entry (an original IMRAM checkpoint)")
    return ckpt


def flatten_original(model_entry) -> dict[str, torch.Tensor]:
    """The "model" entry (list of state dicts or flat dict) -> one flat dict with original names, no module."""
    if isinstance(model_entry, (list, tuple)):
        if not 2 <= len(model_entry) <= len(LIST_ORDER):
            raise ConvertError(f"'model' is a list of {len(model_entry)} state dicts; expected 2 to "
                               f"{len(LIST_ORDER)} in the order {list(LIST_ORDER)}")
        flat = {}
        for name, sd in zip(LIST_ORDER, model_entry):
            if not isinstance(sd, dict):
                raise ConvertError(f"'model'[{LIST_ORDER.index(name)}] ({name}) is a {type(sd).__name__}, "
                                   "not a state dict")
            flat.update({f"{name}.{k}": v for k, v in sd.items()})
    elif isinstance(model_entry, dict):
        flat = dict(model_entry)
    else:
        raise ConvertError(f"'model' is a {type(model_entry).__name__}; expected a list of state dicts or a state dict")
    out = {}
    for key, value in flat.items():
        clean = ".".join(part for part in str(key).split(".") if part != "module")
        if not isinstance(value, torch.Tensor):
            raise ConvertError(f"{key}: expected a tensor, got {type(value).__name__}")
        if clean in out:
            raise ConvertError(f"{key}: appears twice once 'module.' is dropped")
        out[clean] = value
    return out


def map_name(key: str) -> str | None:
    """Original name (no module.) -> imram_min name, or None if it is not an IMRAM parameter."""
    m = re.fullmatch(r"img_enc\.(?:fc|fc_local)\.(weight|bias|weight_g|weight_v)", key)
    if m:
        return f"img_enc.fc.{m.group(1)}"
    if key == "txt_enc.embed.weight" or key.startswith("txt_enc.rnn."):
        return key
    head, _, tail = key.partition(".")
    if head in MEMORY_NAMES and tail in ("weight", "bias"):
        return f"{MEMORY_NAMES[head]}.{tail}"
    return None


def config_from_opt(opt, weights: dict[str, torch.Tensor], vocab_size: int) -> IMRAMConfig:
    """IMRAMConfig from the original options, sizes missing from opt read off the (mapped) weights."""
    o = dict(vars(opt)) if isinstance(opt, argparse.Namespace) else dict(opt or {})
    get = lambda name: o.get(name, ORIGINAL_DEFAULTS.get(name))  # noqa: E731
    if get("model_mode") not in MODES:
        raise ConvertError(f"opt.model_mode={get('model_mode')!r}; expected one of {list(MODES)}")
    if get("precomp_enc_type") not in ("basic", "weight_norm"):
        raise ConvertError(f"opt.precomp_enc_type={get('precomp_enc_type')!r}; expected 'basic' or 'weight_norm'")
    fc = weights.get("img_enc.fc.weight", weights.get("img_enc.fc.weight_v"))
    embed = weights.get("txt_enc.embed.weight")
    layers = [int(m.group(1)) for k in weights for m in [re.fullmatch(r"txt_enc\.rnn\.weight_ih_l(\d+)", k)] if m]

    def size(name, from_weights):
        if name in o:
            return int(o[name])
        if from_weights is None:
            raise ConvertError(f"opt has no {name} and the weights do not tell it")
        return int(from_weights)

    return IMRAMConfig(
        vocab_size=vocab_size,
        img_dim=size("img_dim", None if fc is None else fc.shape[1]),
        word_dim=size("word_dim", None if embed is None else embed.shape[1]),
        embed_size=size("embed_size", None if fc is None else fc.shape[0]),
        num_layers=size("num_layers", max(layers) + 1 if layers else None),
        bi_gru=bool(o["bi_gru"]) if "bi_gru" in o else any(k.endswith("_reverse") for k in weights),
        img_encoder=str(get("precomp_enc_type")),
        no_imgnorm=bool(get("no_imgnorm")),
        no_txtnorm=bool(get("no_txtnorm")),
        raw_feature_norm=str(get("raw_feature_norm")),
        lambda_softmax=float(get("lambda_softmax")),
        mode=MODES[get("model_mode")],
        n_steps=int(get("iteration_step")),
        no_IMRAM_norm=bool(get("no_IMRAM_norm")),
        margin=float(get("margin")),
        max_violation=bool(get("max_violation")),
    )


def convert_state(original: dict[str, torch.Tensor], model: IMRAM) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Flat original weights -> a state dict for ``model``; returns it and the names of dropped keys.

    Raises ConvertError listing every missing key, unexpected key and shape mismatch.
    """
    expected = model.state_dict()
    mapped, unexpected, dropped = {}, [], []
    for key, value in original.items():
        name = map_name(key)
        if name is None:
            unexpected.append(key)
        elif name not in expected and name.split(".")[0] in ("text_mdu", "image_mdu"):
            dropped.append(key)  # a memory the mode does not use
        elif name not in expected:
            unexpected.append(key)
        else:
            mapped[name] = value
    missing = sorted(set(expected) - set(mapped))
    mismatched = []
    for name, value in mapped.items():
        want = expected[name].shape
        if value.shape != want:
            if value.numel() == 1 and want.numel() == 1:  # weight_g saved as (1,) vs () by some versions
                mapped[name] = value.reshape(want)
            else:
                mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys (imram_min names): {missing}")
        if unexpected:
            parts.append(f"unexpected keys (original names): {sorted(unexpected)}")
        if mismatched:
            parts.append("shape mismatches: " + "; ".join(mismatched))
        raise ConvertError(f"the weights do not fit mode={model.cfg.mode} IMRAM: " + " | ".join(parts))
    return {k: v.to(expected[k].dtype) for k, v in mapped.items()}, sorted(dropped)


def convert(src: str | os.PathLike, vocab_path: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Convert ``src`` with the vocabulary ``vocab_path`` and write the checkpoint ``out``; returns its meta."""
    ckpt = load_original(src)
    weights = flatten_original(ckpt["model"])
    vocab = Vocabulary.load(vocab_path)
    embed = weights.get("txt_enc.embed.weight")
    if embed is None:
        raise ConvertError("missing keys: ['txt_enc.embed.weight'] (the word embedding)")
    if embed.shape[0] != len(vocab):
        raise ConvertError(f"vocabulary {vocab_path} has {len(vocab)} words but the checkpoint's word embedding "
                           f"has {embed.shape[0]} rows: not the vocabulary this model was trained with")
    canon = {map_name(k) or k: v for k, v in weights.items()}
    cfg = config_from_opt(ckpt.get("opt"), canon, len(vocab))
    model = IMRAM(cfg)
    state, dropped = convert_state(weights, model)
    model.load_state_dict(state)
    if dropped:
        print(f"dropped {len(dropped)} weights of the memory mode={cfg.mode} does not use: {dropped}")
    meta = {"source": os.path.abspath(os.fspath(src)), "converted_from": "original IMRAM checkpoint"}
    for key in ("epoch", "best_rsum", "Eiters"):
        value = ckpt.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)):
            meta[f"original_{key}"] = value
    save_checkpoint(out, model, vocab, meta)
    return meta


def main(argv: list[str] | None = None) -> dict:
    """Convert; returns the new checkpoint's meta. Bad input: one ``error: ...`` line, SystemExit(2)."""
    return cli.call(_main, argv, user_errors=(ConvertError, VocabularyError))


def _main(argv: list[str] | None) -> dict:
    p = cli.ArgumentParser(prog="python -m imram_min.engineering.convert",
                           description="Convert an original IMRAM checkpoint to the imram-min format.")
    p.add_argument("checkpoint", help="original model_best.pth.tar / checkpoint.pth.tar")
    p.add_argument("--vocab", required=True, help="the SCAN vocabulary JSON it was trained with")
    p.add_argument("--out", required=True, help="imram-min checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    for flag, path in (("checkpoint", args.checkpoint), ("--vocab", args.vocab)):
        if not os.path.isfile(path):
            raise cli.UserError(f"{flag} {path}: no such file")
    cli.check_output_file(args.out, [args.checkpoint, args.vocab], "--out", overwrite=args.overwrite)
    meta = convert(args.checkpoint, args.vocab, args.out)
    print(f"wrote {args.out} ({meta})")
    return meta


if __name__ == "__main__":
    main()
