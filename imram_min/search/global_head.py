"""A first-stage head distilled from a trained IMRAM model: one global vector per image and caption.

    python -m imram_min.search.global_head RUN/best.pt --data DIR [--out RUN/global_head.pt] [--epochs N] [--overwrite]

The two-stage search (imram_min.search.shortlist, runtime.index / runtime.search) ranks the whole gallery
by one cosine per item, then re-ranks a shortlist with IMRAM exactly. The mean of the model's own
region (word) embeddings keeps too few of IMRAM's top matches in a small shortlist; this head is
trained after the model, with the IMRAM weights frozen (the matcher and its training objective
are untouched: the head changes which items are shortlisted, never their scores). It is saved
beside the checkpoint (HEAD_FILE, RUN/global_head.pt) by default; scripts/run.sh makes it, and
``python -m export`` includes a head found there when it was distilled from that checkpoint, and
``python -m imram_min.evaluate --shortlist`` ranks its first stage with it (one rule: ``choose_head``),
so runtime.index and the two-stage evaluation use it with no other step:

    image: region_embs (n, n_region, d) -> per region MLP d -> hidden -> out -> max over the regions -> l2norm
    text:  word_embs (n, n_word, d), lengths (n,) -> the same (own weights) over the valid words -> l2norm

Training, on the train split: the frozen embeddings are encoded once. Loss per step: InfoNCE on
the ground-truth pairs of a batch of images and all their captions (i2t with the 5 captions as
positives, t2i with the one image), temperature TAU; plus, with weight ``distill``, the
KL divergence from IMRAM's own scores to the head's over a group of images and their captions
(both directions), so that the head ranks as IMRAM does, IMRAM's top-1 included, not only the
ground truth. The groups are images that the mean embeddings find close to each other (hard
negatives); their IMRAM scores (tiling.tiled_similarity, no grad) are computed once before training.

The file (torch.save, weights_only-safe): {"format": FORMAT, "config": {...}, "state": state_dict,
"meta": {checkpoint sha256, data, epochs, seconds, final loss}}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from runtime.modeldir import sha256_file

FORMAT = "imram-min-global-head/1"
HEAD_FILE = "global_head.pt"  # the default --out, beside the checkpoint (where python -m export looks for it)
DEFAULTS = {"hidden": 256, "out_size": 256}
TAU = 0.05  # the head's softmax temperature (cosines / TAU)
TEACHER_TAU = 0.05  # IMRAM scores / TEACHER_TAU: soft targets of the distillation
GROUP = 32  # images per distillation group (with their captions)


class GlobalHeadError(ValueError):
    """A file that is not a global head, or one that does not fit the model."""


# --------------------------------------------------------------------------- the head
class SideHead(nn.Module):
    """One side: vectors (n, m, d) [+ lengths (n,)] -> (n, out) l2-normalised; per-vector MLP, max-pool."""

    def __init__(self, embed_size: int, hidden: int, out_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_size, hidden), nn.ReLU(), nn.Linear(hidden, out_size))

    def forward(self, embs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.mlp(embs)
        if lengths is not None:
            valid = torch.arange(embs.shape[1], device=embs.device)[None, :] < lengths[:, None]
            h = h.masked_fill(~valid[:, :, None], -1e4)
        g = h.max(dim=1).values
        return g / (g.norm(dim=1, keepdim=True) + 1e-8)


class GlobalHead(nn.Module):
    """image(region_embs) -> (n, out); text(word_embs, lengths) -> (n, out); both l2-normalised."""

    def __init__(self, embed_size: int, hidden: int = DEFAULTS["hidden"], out_size: int = DEFAULTS["out_size"]):
        super().__init__()
        self.config = {"embed_size": int(embed_size), "hidden": int(hidden), "out_size": int(out_size)}
        self.image_head = SideHead(embed_size, hidden, out_size)
        self.text_head = SideHead(embed_size, hidden, out_size)

    def image(self, region_embs: torch.Tensor) -> torch.Tensor:
        return self.image_head(region_embs)

    def text(self, word_embs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_head(word_embs, lengths)


def save_head(head: GlobalHead, path: str | os.PathLike, meta: dict | None = None) -> None:
    from imram_min.engineering.checkpoint import atomic_torch_save
    atomic_torch_save({"format": FORMAT, "config": dict(head.config), "state": head.state_dict(),
                       "meta": meta or {}}, path)


def default_head_path(checkpoint: str | os.PathLike) -> str:
    """HEAD_FILE in the checkpoint's folder: where the command writes a head and export looks for one."""
    return os.path.join(os.path.dirname(os.fspath(checkpoint)), HEAD_FILE)


def load_head(path: str | os.PathLike, embed_size: int | None = None) -> GlobalHead:
    """A saved head, in eval mode (weights_only=True), with ``head.meta`` the file's meta dict (the
    command records "checkpoint_sha256", the checkpoint it was distilled from); GlobalHeadError for
    a file that is not one, or one made for another embed_size."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GlobalHeadError(f"{path}: no such global head file (make one with python -m imram_min.search.global_head)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError for a non-zip file, ...
        raise GlobalHeadError(f"{path}: cannot be read as a global head ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise GlobalHeadError(f"{path}: not a global head file (format {FORMAT})")
    cfg = obj.get("config")
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), int) and cfg[k] > 0
                                            for k in ("embed_size", "hidden", "out_size")):
        raise GlobalHeadError(f"{path}: its config is malformed")
    if embed_size is not None and cfg["embed_size"] != embed_size:
        raise GlobalHeadError(f"{path}: made for embed_size {cfg['embed_size']}, the model has {embed_size}")
    head = GlobalHead(**cfg)
    try:
        head.load_state_dict(obj["state"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise GlobalHeadError(f"{path}: weights do not fit its config ({' '.join(str(e).split())[:200]})") from None
    head.meta = dict(obj["meta"]) if isinstance(obj.get("meta"), dict) else {}
    return head.eval()


class HeadChoice(NamedTuple):
    """What ``choose_head`` decided: the head (None: the mean embeddings), its path, the choice in
    words, and warnings (each one line, without its "warning: " prefix)."""
    head: GlobalHead | None
    path: str | None
    said: str
    warnings: list[str]


def choose_head(checkpoint: str | os.PathLike, given: str | os.PathLike | None = None, disabled: bool = False,
                embed_size: int | None = None, *, without: str) -> HeadChoice:
    """The first-stage head of ``checkpoint``, one rule for every command that has --global-head and
    --no-global-head (python -m export, python -m imram_min.evaluate --shortlist):

    given (--global-head) is used, with a warning if it was distilled from another checkpoint;
    disabled (--no-global-head): none; else the head beside the checkpoint (``default_head_path``),
    used only if its recorded "checkpoint_sha256" is the checkpoint's SHA-256 (a head of another
    checkpoint is left out, with a warning: it would shortlist from embeddings it was not trained on);
    else none. ``without`` says what having no head means for the caller (export: "runtime.index's
    first stage will be the mean embeddings"). GlobalHeadError for a file that is not a head or
    does not fit embed_size."""
    checkpoint = os.fspath(checkpoint)
    if disabled:
        return HeadChoice(None, None, "no global head (--no-global-head)", [])
    path = os.fspath(given) if given is not None else default_head_path(checkpoint)
    if given is None and not os.path.isfile(path):
        return HeadChoice(None, None, f"no global head (no {path} beside the checkpoint)", [])
    head = load_head(path, embed_size)
    made_from = head.meta.get("checkpoint_sha256")
    if made_from == sha256_file(checkpoint):
        return HeadChoice(head, path, f"global head {path}", [])
    source = f"{path} was distilled from " + (f"a checkpoint other than {checkpoint}" if made_from
                                              else "a checkpoint it does not record")
    if given is not None:
        return HeadChoice(head, path, f"global head {path}",
                          [f"{source}: its shortlists may miss this model's best matches"])
    return HeadChoice(None, None, f"no global head ({path} is of another checkpoint)", [
        f"{source}: left out ({without}); distil it again "
        f"(python -m imram_min.search.global_head {checkpoint} --data DIR --overwrite), name one with --global-head, "
        f"or add --no-global-head"])


@torch.no_grad()
def head_vectors(head: GlobalHead, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                 batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(image vectors (n_img, out), caption vectors (n_cap, out)) of encoded embeddings, in batches."""
    head.eval()
    img = torch.cat([head.image(region_embs[i:i + batch]) for i in range(0, len(region_embs), batch)]) \
        if len(region_embs) else torch.zeros(0, head.config["out_size"])
    cap = torch.cat([head.text(word_embs[i:i + batch], lengths[i:i + batch])
                     for i in range(0, len(word_embs), batch)]) \
        if len(word_embs) else torch.zeros(0, head.config["out_size"])
    return img, cap


# --------------------------------------------------------------------------- training
def mean_groups(region_embs: torch.Tensor, size: int, seed: int = 0) -> list[np.ndarray]:
    """The images cut into groups of ``size`` that are close under the mean embeddings (greedy: a
    random unassigned image and its nearest unassigned neighbours)."""
    g = region_embs.mean(1)
    g = (g / g.norm(dim=1, keepdim=True).clamp_min(1e-8)).numpy()
    rng = np.random.default_rng(seed)
    left = np.ones(len(g), bool)
    groups = []
    for i in rng.permutation(len(g)):
        if not left[i]:
            continue
        cos = g[i] @ g.T
        cos[~left] = -np.inf
        members = np.argsort(-cos, kind="stable")[:min(size, int(left.sum()))]
        left[members] = False
        groups.append(np.sort(members))
    return groups


def captions_of(images, cpi) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption indices, owner: each caption's position in ``images``) of the images ``images`` (sorted
    rows), all their captions. cpi: 5 or 1 (the SCAN layout: captions cpi*i .. cpi*i + cpi - 1), or
    each caption's image row, (n_cap,) (DIR/{split}_cap2img.txt: any number per image, grouped)."""
    images = torch.as_tensor(np.asarray(images), dtype=torch.int64)
    if isinstance(cpi, (int, np.integer)):
        caps = (images[:, None] * cpi + torch.arange(cpi)).reshape(-1)
        return caps, torch.arange(len(caps)) // cpi
    starts = torch.from_numpy(np.searchsorted(np.asarray(cpi), np.arange(int(cpi[-1]) + 2)))
    counts = starts[images + 1] - starts[images]
    caps = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in images])
    return caps, torch.repeat_interleave(torch.arange(len(images)), counts)


@torch.no_grad()
def teacher_scores(model, region_embs, word_embs, lengths, groups, cpi, progress: bool = True) -> list:
    """IMRAM's scores (len(group), n_captions of the group) of each group's images against their captions
    (``captions_of``)."""
    from imram_min.engineering import tiling
    model.eval()
    out = []
    for members in tqdm(groups, desc="IMRAM scores of the groups", disable=not progress, leave=False):
        caps, _ = captions_of(members, cpi)
        lens = lengths[caps]
        out.append(tiling.tiled_similarity(model, region_embs[torch.from_numpy(members)],
                                       word_embs[caps, :int(lens.max())], lens).float())
    return out


def contrastive_loss(img: torch.Tensor, cap: torch.Tensor, cpi) -> torch.Tensor:
    """InfoNCE on ground truth: img (B, o), cap (B * cpi, o), caption j of image j // cpi; or cpi the
    (n_cap,) owner of each caption (its image's position in ``img``, ``captions_of``)."""
    logits = img @ cap.T / TAU  # (B, B * cpi)
    owner = cpi.to(img.device) if isinstance(cpi, torch.Tensor) else \
        torch.arange(cap.shape[0], device=img.device) // cpi
    t2i = F.cross_entropy(logits.T, owner)
    pos = owner[None, :] == torch.arange(img.shape[0], device=img.device)[:, None]
    i2t = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, -1e4), 1)).mean()
    return (t2i + i2t) / 2


def distill_loss(img: torch.Tensor, cap: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(IMRAM / TEACHER_TAU) || softmax(head / TAU)), rows (i2t) and columns (t2i)."""
    student = img @ cap.T / TAU
    target = teacher / TEACHER_TAU
    kl = 0.0
    for s, t in ((student, target), (student.T, target.T)):
        kl = kl + F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    return kl / 2


def train_head(model, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor, cpi: int,
               epochs: int = 20, batch: int = 128, lr: float = 2e-3, distill: float = 1.0, seed: int = 0,
               hidden: int = DEFAULTS["hidden"], out_size: int = DEFAULTS["out_size"],
               progress: bool = True) -> tuple[GlobalHead, list[float]]:
    """Train a GlobalHead on frozen embeddings (caption j belongs to image j // cpi, or to image cpi[j]
    when cpi is the (n_cap,) image rows of a sidecar layout); returns (head in eval mode, mean loss of
    each epoch). distill > 0 needs ``model`` (IMRAM's group scores)."""
    torch.manual_seed(seed)
    head = GlobalHead(region_embs.shape[2], hidden, out_size)
    n_img = len(region_embs)
    groups = mean_groups(region_embs, GROUP, seed) if distill > 0 else []
    teacher = teacher_scores(model, region_embs, word_embs, lengths, groups, cpi, progress) if distill > 0 else []
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(n_img / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    rng = np.random.default_rng(seed)
    history = []
    bar = tqdm(range(epochs), desc="global head", disable=not progress)
    for _ in bar:
        head.train()
        order, total = rng.permutation(n_img), 0.0
        for s in range(steps_per_epoch):
            ims = torch.from_numpy(np.sort(order[s * batch:(s + 1) * batch]))
            caps, owner = captions_of(ims, cpi)
            lens = lengths[caps]
            loss = contrastive_loss(head.image(region_embs[ims]),
                                    head.text(word_embs[caps, :int(lens.max())], lens),
                                    cpi if isinstance(cpi, (int, np.integer)) else owner)
            if distill > 0:
                g = int(rng.integers(len(groups)))
                members = torch.from_numpy(groups[g])
                gcaps, _ = captions_of(groups[g], cpi)
                glens = lengths[gcaps]
                loss = loss + distill * distill_loss(head.image(region_embs[members]),
                                                     head.text(word_embs[gcaps, :int(glens.max())], glens), teacher[g])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        history.append(total / steps_per_epoch)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    return head.eval(), history


# --------------------------------------------------------------------------- CLI
def _main(argv) -> dict:
    from imram_min.engineering import checks
    from imram_min.engineering.checkpoint import load_model
    from imram_min.data import PrecompDataset
    from imram_min.evaluate import encode_split
    from runtime import cli
    p = cli.ArgumentParser(prog="python -m imram_min.search.global_head",
                           description="Distil a first-stage global head from a trained IMRAM checkpoint "
                                       "(IMRAM frozen), for the two-stage search.")
    p.add_argument("checkpoint", help="RUN/best.pt")
    p.add_argument("--data", required=True, metavar="DIR", help="the data folder (its train split)")
    p.add_argument("--out", metavar="FILE", help=f"default: {HEAD_FILE} beside the checkpoint (where python -m "
                   "export looks for it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="images per step (with all their captions)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--distill", type=float, default=1.0, help="weight of the IMRAM-score distillation (0: off)")
    p.add_argument("--out-size", type=int, default=DEFAULTS["out_size"])
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag, value, high in (("--epochs", args.epochs, 10000), ("--batch-size", args.batch_size, 1 << 16),
                              ("--out-size", args.out_size, 1 << 14), ("--hidden", args.hidden, 1 << 14)):
        cli.check_count(value, flag, 1, high)
    if not (args.lr > 0 and math.isfinite(args.lr)) or not (args.distill >= 0 and math.isfinite(args.distill)):
        raise cli.UserError("--lr must be > 0 and --distill >= 0")
    checks.data_folder(args.data)
    split = checks.split(args.data, "train")
    out = args.out or default_head_path(args.checkpoint)
    cli.check_output_file(out, [args.checkpoint, split.features, split.captions], "--out", overwrite=args.overwrite)
    model, vocab, _ = load_model(args.checkpoint)
    if model.cfg.img_dim != split.img_dim:
        raise cli.UserError(f"{split.features}: region features of size {split.img_dim}, but {args.checkpoint} "
                            f"takes img_dim {model.cfg.img_dim}")
    dataset = PrecompDataset(args.data, "train", vocab)
    t0 = time.perf_counter()
    torch.set_grad_enabled(True)
    region_embs, word_embs, lengths = encode_split(model, dataset, progress=True)
    layout = dataset.caps_per_image if dataset.caps_per_image is not None else dataset.image_of_caption
    head, history = train_head(model, region_embs, word_embs, lengths, layout, args.epochs,
                               args.batch_size, args.lr, args.distill, args.seed, args.hidden, args.out_size)
    seconds = time.perf_counter() - t0
    meta = {"checkpoint": os.path.basename(args.checkpoint), "checkpoint_sha256": sha256_file(args.checkpoint),
            "data": os.fspath(args.data), "epochs": args.epochs, "distill": args.distill, "seconds": seconds,
            "loss": history}
    save_head(head, out, meta)
    print(f"wrote {out}: {len(region_embs)} images, {len(word_embs)} captions, loss {history[0]:.3f} -> "
          f"{history[-1]:.3f}, {seconds:.1f}s")
    return {"out": out, **meta}


def main(argv=None) -> dict:
    """Train and save; returns {"out", meta...}. Bad input: one ``error: ...`` line, SystemExit(2)."""
    from imram_min.engineering import checks
    from runtime import cli
    return cli.call(_main, argv, user_errors=(*checks.USER_ERRORS, GlobalHeadError))


if __name__ == "__main__":
    main()
    sys.exit(0)
