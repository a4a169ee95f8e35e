"""This project's checkpoint format, and atomic file writes.

A checkpoint is one ``torch.save`` dict holding only tensors and plain Python values, so that
it loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling)::

    {
      "format": "imram-min/1",
      "config": IMRAMConfig.to_dict(),          # everything needed to rebuild the model
      "model":  model.state_dict(),
      "vocab":  Vocabulary.to_json_dict(),      # the SCAN JSON layout, no file path
      "meta":   {...},                          # small JSON-able facts: epoch, dev scores, source
      "train_state": {...},                     # last.pt only: optimiser, epoch, RNG states, args
    }

``best.pt`` and converted checkpoints have no ``train_state``. Checkpoints are written
atomically (``runtime.atomic``): a reader never sees a half-written file.
"""
from __future__ import annotations

import os

import torch

from imram_min.model import IMRAM, IMRAMConfig
from runtime.atomic import atomic_open
from runtime.text import SPECIAL_TOKENS, Vocabulary

FORMAT = "imram-min/1"


class CheckpointError(ValueError):
    """A file that is not a valid imram-min checkpoint."""


# --------------------------------------------------------------------------- atomic writes
def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj) to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


# --------------------------------------------------------------------------- vocabulary
def vocab_to_dict(vocab: Vocabulary) -> dict:
    """The vocabulary as plain data (SCAN JSON layout)."""
    return vocab.to_json_dict()


def vocab_from_dict(d: dict) -> Vocabulary:
    """Inverse of ``vocab_to_dict``; checks ids are 0..n-1 with the specials first."""
    word2idx = d.get("word2idx") if isinstance(d, dict) else None
    if not isinstance(word2idx, dict):
        raise CheckpointError("checkpoint vocab has no word2idx mapping")
    words = sorted(word2idx, key=word2idx.__getitem__)
    if [word2idx[w] for w in words] != list(range(len(words))):
        raise CheckpointError("checkpoint vocab ids are not exactly 0..n-1")
    if tuple(words[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise CheckpointError(f"checkpoint vocab must start with {SPECIAL_TOKENS}")
    return Vocabulary(words[len(SPECIAL_TOKENS):])


# --------------------------------------------------------------------------- save / load
RENAMED_PREFIXES = {"t2i.": "text_mdu.", "i2t.": "image_mdu."}  # imram-min's older names of the two MDUs


def upgrade_state_dict(state: dict) -> dict:
    """A model state dict with the parameter names of older imram-min checkpoints upgraded:
    ``t2i.*`` -> ``text_mdu.*`` (Text-IMRAM's MDU), ``i2t.*`` -> ``image_mdu.*`` (Image-IMRAM's).
    Other keys, and current names, are kept as they are."""
    def upgraded(key: str) -> str:
        for old, new in RENAMED_PREFIXES.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key
    return {upgraded(k): v for k, v in state.items()}


def make_checkpoint(model: IMRAM, vocab: Vocabulary, meta: dict | None = None,
                    train_state: dict | None = None) -> dict:
    """The checkpoint dict of ``model`` (weights copied to CPU)."""
    if len(vocab) != model.cfg.vocab_size:
        raise CheckpointError(f"vocabulary has {len(vocab)} words but the model has vocab_size={model.cfg.vocab_size}")
    ckpt = {
        "format": FORMAT,
        "config": model.cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": vocab_to_dict(vocab),
        "meta": dict(meta or {}),
    }
    if train_state is not None:
        ckpt["train_state"] = train_state
    return ckpt


def save_checkpoint(path: str | os.PathLike, model: IMRAM, vocab: Vocabulary, meta: dict | None = None,
                    train_state: dict | None = None) -> None:
    """Write a checkpoint atomically."""
    atomic_torch_save(make_checkpoint(model, vocab, meta, train_state), path)


def safe_load_reason(error: Exception) -> str:
    """The gist of a weights_only load failure, without torch's advice to load unsafely."""
    text = str(error).split("WeightsUnpickler error:")[-1].strip()
    return text.splitlines()[0].split(" Please use `torch.serialization")[0] if text else type(error).__name__


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint dict safely (weights_only=True, on CPU) and check its format."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign classes, RuntimeError for non-zip files, ...
        reason = safe_load_reason(e)
        hint = " (an original IMRAM checkpoint? convert it with python -m imram_min.convert)" \
            if "argparse.Namespace" in reason else ""
        raise CheckpointError(f"{path}: cannot load as an imram-min checkpoint "
                              f"(safe loading, weights_only=True): {reason}{hint}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = " (an original IMRAM checkpoint? convert it with python -m imram_min.convert)" \
            if isinstance(ckpt, dict) and "opt" in ckpt else ""
        raise CheckpointError(f"{path}: not an {FORMAT} checkpoint (format={found!r}){hint}")
    for key in ("config", "model", "vocab"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> tuple[IMRAM, Vocabulary]:
    """Rebuild (model in eval mode on ``device``, vocabulary) from a checkpoint dict."""
    cfg = IMRAMConfig.from_dict(ckpt["config"])
    vocab = vocab_from_dict(ckpt["vocab"])
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(f"checkpoint vocabulary has {len(vocab)} words but config.vocab_size={cfg.vocab_size}")
    model = IMRAM(cfg)
    model.load_state_dict(upgrade_state_dict(ckpt["model"]))  # strict: missing/unexpected keys raise
    return model.to(device).eval(), vocab


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[IMRAM, Vocabulary, dict]:
    """Load a checkpoint -> (model in eval mode on ``device``, vocabulary, meta).

    meta: the checkpoint's "meta" dict plus "format" and "config" (the training state of
    last.pt is not included; read it with ``load_checkpoint``).
    """
    ckpt = load_checkpoint(path)
    model, vocab = model_from_checkpoint(ckpt, device)
    meta = dict(ckpt.get("meta") or {})
    meta.update(format=ckpt["format"], config=dict(ckpt["config"]))
    return model, vocab, meta
