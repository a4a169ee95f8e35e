"""This project's checkpoint format, and atomic file writes.

A checkpoint is one ``torch.save`` dict holding only tensors and plain Python values, so that
it loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling)::

    {
      "format": "imram-min/1",
      "config": IMRAMConfig.to_dict(),          # everything needed to rebuild the model
      "model":  model.state_dict(),
      "vocab":  Vocabulary.to_json_dict(),      # the SCAN JSON layout, no file path
      "tokenizer": {"rules_version": 1},        # the tokeniser rules training used (runtime.text)
      "meta":   {...},                          # small JSON-able facts: epoch, dev scores, source
      "train_state": {...},                     # last.pt only: optimiser, epoch, RNG states, args
    }

``best.pt`` and converted checkpoints have no ``train_state``. Checkpoints are written
atomically (``runtime.atomic``): a reader never sees a half-written file. A process killed in
the rename window leaves its temporary file ``.NAME.XXXXXXXX.tmp``; the next save of NAME (and
the next training start in that folder) removes it. A full disk during a save is one
``DiskFullError`` naming the device, with the temporary file removed and the old NAME kept.
"""
from __future__ import annotations

import errno
import glob
import os
import re

import torch

from imram_min.model import IMRAM, IMRAMConfig
from runtime.atomic import atomic_open
from runtime.text import SPECIAL_TOKENS, Tokenizer, Vocabulary

FORMAT = "imram-min/1"


class CheckpointError(ValueError):
    """A file that is not a valid imram-min checkpoint."""


class DiskFullError(CheckpointError):
    """A checkpoint that could not be written for lack of space (the message names the device)."""


# --------------------------------------------------------------------------- atomic writes
_TEMP_SUFFIX = re.compile(r"\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp's random part, as runtime.atomic names it


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Remove the temporary files ``.NAME.XXXXXXXX.tmp`` that an atomic write of ``path`` left when it
    was killed between writing and renaming; returns their paths. Only regular files are removed."""
    folder, name = os.path.split(os.path.abspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), glob.escape("." + name) + ".*.tmp")):
        rest = os.path.basename(tmp)[len(name) + 1:]
        try:
            if _TEMP_SUFFIX.fullmatch(rest) and os.path.isfile(tmp) and not os.path.islink(tmp):
                os.remove(tmp)
                removed.append(tmp)
        except FileNotFoundError:  # gone meanwhile
            pass
    return removed


def _disk_full(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind ``error``, following __cause__ / __context__: torch.save into
    a Python file re-raises the write's OSError as its own RuntimeError ("unexpected pos", from
    inline_container.cc, raised by write_end_of_file in the writer's __exit__) with the OSError as
    its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def device_of(path: str | os.PathLike) -> str:
    """The device holding ``path``'s folder, as the user knows it: "/dev/sda1 (mounted at /data)", or
    the mount point alone when /proc/self/mounts does not say (not Linux)."""
    folder = os.path.dirname(os.path.abspath(path))
    mount = folder
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    source = None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[1].replace("\\040", " ") == mount:
                    source = fields[0]  # the last mount at that point is the one in effect
    except OSError:
        pass
    return f"{source} (mounted at {mount})" if source else f"mounted at {mount}"


def _free_bytes(path: str | os.PathLike) -> int | None:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj) to ``path`` atomically. Stale temporary files of ``path`` are removed first;
    a full disk raises DiskFullError (one line naming the device and the free space; the temporary
    file is removed, an existing ``path`` is kept)."""
    remove_stale_temps(path)
    try:
        with atomic_open(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        full = _disk_full(e)
        if full is None:
            raise
        free = _free_bytes(path)
        left = f", {free / 2 ** 20:.1f} MiB free" if free is not None else ""
        kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
        raise DiskFullError(f"{os.fspath(path)}: no space left on device {device_of(path)}{left} "
                            f"({os.strerror(full.errno)}); {kept}") from None


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
        "tokenizer": {"rules_version": Tokenizer.builtin().rules_version},  # training's: the built-in rules
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
    """The gist of a weights_only load failure, on one line, without torch's advice to load unsafely.

    A refused class or function: "it pickles NAME, which is not plain tensors/containers"; other
    failures: what is wrong with the file (empty, truncated, not a PyTorch file). Never a hint to
    load with weights_only=False."""
    text = str(error)
    refused = re.search(r"GLOBAL\s+([\w.]+)", text)
    if refused:
        return f"it pickles {refused.group(1)}, which is not plain tensors/containers (nothing in it was run)"
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand:
        return (f"not a PyTorch checkpoint, or it pickles something other than plain tensors/containers "
                f"(pickle opcode {operand.group(1)}; nothing in it was run)")
    if isinstance(error, EOFError):
        return "the file is empty or truncated"
    if isinstance(error, OSError) and error.errno not in (errno.ENOENT, errno.EACCES, errno.EISDIR, errno.EPERM):
        return f"the file is truncated or corrupted ({' '.join(text.split())})"
    if "PytorchStreamReader" in text or "zip archive" in text:
        gist = text.split(". ")[0].strip().rstrip(".")
        return f"the file is truncated or corrupted ({gist})"
    if isinstance(error, (KeyError, UnicodeDecodeError)) or not text.strip():
        return "not a PyTorch checkpoint file"
    keep = [s for s in re.split(r"(?<=\.)\s+", " ".join(text.split()))
            if s and not re.search(r"weights_only|torch\.serialization|safe_globals|Weights only load failed", s)]
    return " ".join(keep)[:300] or type(error).__name__


def load_failure(path: str | os.PathLike, error: Exception) -> str:
    """One line: ``path`` could not be loaded safely, and why (``safe_load_reason``)."""
    reason = safe_load_reason(error)
    verb = "refused to load" if reason.startswith("it pickles") else "cannot load"
    return f"{os.fspath(path)}: {verb}: {reason}"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint dict safely (weights_only=True, on CPU) and check its format."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{os.fspath(path)}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign classes, RuntimeError for non-zip files, ...
        hint = " (an original IMRAM checkpoint? convert it with python -m imram_min.engineering.convert)" \
            if "argparse.Namespace" in str(e) else ""
        raise CheckpointError(load_failure(path, e) + hint) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = " (an original IMRAM checkpoint? convert it with python -m imram_min.engineering.convert)" \
            if isinstance(ckpt, dict) and "opt" in ckpt else ""
        raise CheckpointError(f"{path}: not an {FORMAT} checkpoint (format={found!r}){hint}")
    for key in ("config", "model", "vocab"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> tuple[IMRAM, Vocabulary]:
    """Rebuild (model in eval mode on ``device``, vocabulary) from a checkpoint dict."""
    try:
        cfg = IMRAMConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint config is not a valid IMRAMConfig: {e}") from None
    vocab = vocab_from_dict(ckpt["vocab"])
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(f"checkpoint vocabulary has {len(vocab)} words but config.vocab_size={cfg.vocab_size}")
    model = IMRAM(cfg)
    try:
        model.load_state_dict(ckpt["model"])  # strict: missing/unexpected keys raise
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError("checkpoint weights do not fit its config: " + " ".join(str(e).split())[:600]) from None
    return model.to(device).eval(), vocab


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[IMRAM, Vocabulary, dict]:
    """Load a checkpoint -> (model in eval mode on ``device``, vocabulary, meta).

    meta: the checkpoint's "meta" dict plus "format" and "config" (the training state of
    last.pt is not included; read it with ``load_checkpoint``).
    """
    ckpt = load_checkpoint(path)
    try:
        model, vocab = model_from_checkpoint(ckpt, device)
    except CheckpointError as e:
        raise CheckpointError(f"{os.fspath(path)}: {e}") from None
    meta = dict(ckpt.get("meta") or {})
    meta.update(format=ckpt["format"], config=dict(ckpt["config"]))
    return model, vocab, meta
