"""Evaluate a checkpoint on a split: cross-modal retrieval with the SCAN protocol.

    python -m imram_min.evaluate RUN/best.pt --data DIR --split test [--fold5] [--json OUT.json]
                                             [--save-sims SIMS.npy] [--overwrite] [--device auto] [--batch-size 128]

(the command is imram_min/evaluate/__main__.py; this module is the protocol it runs)

Steps: encode every image of the split once and every caption (batched), score all
(image, caption) pairs in bounded-memory blocks (``tiling.similarity_matrix``), then rank:

* i2t (image -> text, caption retrieval): for image i the rank of its best-ranked ground-truth
  caption; the ground truth of image i is captions cpi*i .. cpi*i + cpi-1 (cpi = captions per
  image, 5 or 1), or in another layout the captions DIR/{split}_cap2img.txt gives image i (any
  number >= 1; ``layout`` below is then the (n_cap,) image row of each caption).
* t2i (text -> image, image retrieval): for caption j the rank of its image j // cpi (or its row
  in the sidecar). On the SCAN layout both give exactly the SCAN numbers; no caption is ever
  repeated to make 5.

Rank and ties: the rank of a ground truth is the number of candidates that score *strictly
higher* than it (0 = first). A tie with the ground truth therefore counts in its favour; for
i2t the best ground-truth caption is the one with the highest score, so other ground-truth
captions never count against it. Without ties this is exactly SCAN's argsort-based rank.

Metrics: R@K = 100 * mean(rank < K) for K = 1, 5, 10; medr = floor(median(rank)) + 1;
meanr = mean(rank) + 1; rsum = the sum of the six recalls.

``--fold5``: the COCO 1K protocol. The split's images are cut into 5 equal folds (1000 images
each for the 5000-image COCO test split) with their captions, each fold is evaluated on its
own, and the metrics are averaged over the folds (rsum = mean of the folds' rsums). Without
it the whole split is one retrieval pool (COCO 5K, Flickr30K 1K).

Memory: the caption embeddings are held padded to the split's longest caption, (n_cap, n_word,
d) float32 on the CPU, as the original does; blocks of captions are moved to the device one at a time.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from imram_min.engineering import tiling
from imram_min.data import PrecompDataset
from imram_min.model import IMRAM


# --------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_split(model: IMRAM, dataset: PrecompDataset, device: str | torch.device = "cpu", batch_size: int = 128,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed each image of ``dataset`` once and all its captions.

    Returns, on the CPU: region_embs (n_images, n_region, d) float32, word_embs (n_captions,
    n_word_max, d) float32 with zeros past each caption's length, lengths (n_captions,) int64.
    """
    model.eval()
    device = torch.device(device)
    token_lists = getattr(dataset, "tokens", None)  # PrecompDataset keeps them; else read them item by item
    if token_lists is None:
        token_lists = [dataset[i][1].tolist() for i in range(len(dataset))]
    n_img, n_cap = dataset.n_images, len(token_lists)
    region_embs = []
    for i in tqdm(range(0, n_img, batch_size), desc="encode images", disable=not progress, leave=False):
        feats = torch.from_numpy(np.array(dataset.images[i:i + batch_size], dtype=np.float32))
        region_embs.append(model.encode_images(feats.to(device)).float().cpu())
    if not region_embs:
        region_embs = [torch.zeros(0, dataset.images.shape[1], model.cfg.embed_size)]
    region_embs = torch.cat(region_embs)

    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)
    n_word = int(lengths.max()) if n_cap else 0
    word_embs = torch.zeros(n_cap, n_word, model.cfg.embed_size)
    for j in tqdm(range(0, n_cap, batch_size), desc="encode captions", disable=not progress, leave=False):
        lens = lengths[j:j + batch_size]
        tokens = torch.zeros(len(lens), int(lens.max()), dtype=torch.int64)  # <pad> = 0
        for row, ids in enumerate(token_lists[j:j + batch_size]):
            tokens[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
        out = model.encode_captions(tokens.to(device), lens)
        word_embs[j:j + len(lens), :out.shape[1]] = out.float().cpu()
    return region_embs, word_embs, lengths


# --------------------------------------------------------------------------- ranking
def _check(sims: np.ndarray, caps_per_image) -> tuple[int, int]:
    sims = np.asarray(sims)
    if isinstance(caps_per_image, (int, np.integer)):
        if sims.ndim != 2 or sims.shape[1] != caps_per_image * sims.shape[0]:
            raise ValueError(f"sims must be (n_img, {caps_per_image} * n_img), got shape {sims.shape}")
    else:
        rows = np.asarray(caps_per_image)
        if sims.ndim != 2 or rows.shape != (sims.shape[1],):
            raise ValueError(f"sims (n_img, n_cap) and image_of_caption (n_cap,) must agree, got shapes {sims.shape} "
                             f"and {rows.shape}")
        if len(rows) and (rows[0] != 0 or rows[-1] != sims.shape[0] - 1 or not np.isin(np.diff(rows), (0, 1)).all()):
            raise ValueError("image_of_caption must be grouped by image in image order, every image with a caption")
    if not np.isfinite(sims).all():
        raise ValueError("sims contains NaN or inf")
    return sims.shape


def image_of_caption(layout, n_cap: int) -> np.ndarray:
    """(n_cap,) int64 image row of each caption: ``layout`` is 5 or 1 (captions per image, the SCAN
    layout) or already the (n_cap,) rows (any number per image, grouped by image in image order)."""
    if isinstance(layout, (int, np.integer)):
        return np.arange(n_cap, dtype=np.int64) // int(layout)
    return np.asarray(layout, dtype=np.int64)


def i2t_ranks(sims: np.ndarray, caps_per_image=5) -> np.ndarray:
    """(n_img,) int64: per image, the number of captions scoring strictly higher than its best ground truth.

    caps_per_image: 5 or 1 (the SCAN layout), or image_of_caption (n_cap,): any number of captions per image."""
    n_img, n_cap = _check(sims, caps_per_image)
    sims = np.asarray(sims)
    if isinstance(caps_per_image, (int, np.integer)):
        gt = sims.reshape(n_img, n_img, caps_per_image)[np.arange(n_img), np.arange(n_img)].max(1)  # (n_img,)
    else:  # the best of each image's own captions: a max over each image's run of captions
        rows = np.asarray(caps_per_image)
        own = sims[rows, np.arange(n_cap)]  # (n_cap,): every caption's score with its own image
        gt = np.maximum.reduceat(own, np.flatnonzero(np.r_[True, np.diff(rows) > 0]))  # (n_img,)
    ranks = np.empty(n_img, dtype=np.int64)
    for i in range(0, n_img, 1024):  # rows in chunks: the bool matrix stays small
        ranks[i:i + 1024] = (sims[i:i + 1024] > gt[i:i + 1024, None]).sum(1)
    return ranks


def t2i_ranks(sims: np.ndarray, caps_per_image=5) -> np.ndarray:
    """(n_cap,) int64: per caption, the number of images scoring strictly higher than its own image.

    caps_per_image: 5 or 1 (the SCAN layout), or image_of_caption (n_cap,): any number of captions per image."""
    n_img, n_cap = _check(sims, caps_per_image)
    sims = np.asarray(sims)
    gt = sims[image_of_caption(caps_per_image, n_cap), np.arange(n_cap)]  # (n_cap,)
    ranks = np.empty(n_cap, dtype=np.int64)
    for j in range(0, n_cap, 4096):
        ranks[j:j + 4096] = (sims[:, j:j + 4096] > gt[None, j:j + 4096]).sum(0)
    return ranks


def rank_metrics(ranks: np.ndarray) -> tuple[float, float, float, float, float]:
    """(R@1, R@5, R@10 in percent, medr, meanr) of 0-based ranks."""
    ranks = np.asarray(ranks)
    r1, r5, r10 = (100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10))
    return r1, r5, r10, float(math.floor(np.median(ranks)) + 1), float(np.mean(ranks) + 1)


def i2t(sims: np.ndarray, caps_per_image=5, return_ranks: bool = False):
    """Image -> text retrieval on sims (n_img, n_cap): (r1, r5, r10, medr, meanr) [, ranks]."""
    ranks = i2t_ranks(sims, caps_per_image)
    return (rank_metrics(ranks), ranks) if return_ranks else rank_metrics(ranks)


def t2i(sims: np.ndarray, caps_per_image=5, return_ranks: bool = False):
    """Text -> image retrieval on sims (n_img, n_cap): (r1, r5, r10, medr, meanr) [, ranks]."""
    ranks = t2i_ranks(sims, caps_per_image)
    return (rank_metrics(ranks), ranks) if return_ranks else rank_metrics(ranks)


def metrics_from_sims(sims: np.ndarray, caps_per_image=5) -> dict:
    """{"i2t": [r1, r5, r10, medr, meanr], "t2i": [...], "rsum": float, "n_images", "n_captions"}.
    caps_per_image: 5 or 1, or image_of_caption (n_cap,) (``i2t_ranks``)."""
    a, b = i2t(sims, caps_per_image), t2i(sims, caps_per_image)
    return {"i2t": list(a), "t2i": list(b), "rsum": float(sum(a[:3]) + sum(b[:3])),
            "n_images": int(sims.shape[0]), "n_captions": int(sims.shape[1])}


def fold_slices(n_images: int, caps_per_image=5, n_folds: int = 5) -> list[tuple[slice, slice]]:
    """(image slice, caption slice) of each of ``n_folds`` equal folds of the images, in order.
    caps_per_image: 5 or 1, or image_of_caption (n_cap,) (a fold's captions are its images' own)."""
    if n_images % n_folds:
        raise ValueError(f"{n_images} images cannot be cut into {n_folds} equal folds")
    size = n_images // n_folds
    if isinstance(caps_per_image, (int, np.integer)):
        return [(slice(k * size, (k + 1) * size), slice(k * size * caps_per_image, (k + 1) * size * caps_per_image))
                for k in range(n_folds)]
    first = np.searchsorted(np.asarray(caps_per_image), np.arange(n_folds + 1) * size)  # first caption of each fold
    return [(slice(k * size, (k + 1) * size), slice(int(first[k]), int(first[k + 1]))) for k in range(n_folds)]


def fold_layout(layout, captions: slice):
    """The layout argument of one fold: 5 / 1 as it is, image rows renumbered from the fold's first image."""
    if isinstance(layout, (int, np.integer)):
        return layout
    rows = np.asarray(layout)[captions]
    return rows - rows[0]


def average_folds(folds: list[dict]) -> dict:
    """Mean of per-fold metric dicts (each metric and rsum averaged), with the folds kept under "folds"."""
    mean = {d: np.mean([f[d] for f in folds], 0).tolist() for d in ("i2t", "t2i")}
    return {**mean, "rsum": float(np.mean([f["rsum"] for f in folds])), "folds": folds}


def evaluate_split(model: IMRAM, dataset: PrecompDataset, device: str | torch.device = "cpu", batch_size: int = 128,
                   fold5: bool = False, return_sims: bool = False, progress: bool = False,
                   score_all=tiling.similarity_matrix) -> dict:
    """Encode, score and rank a split -> {"i2t", "t2i", "rsum", "n_images", "n_captions", "caps_per_image"}.

    caps_per_image: 5 or 1 (the SCAN layout), or None: another layout, ranked with
    ``dataset.image_of_caption``.

    With ``fold5`` the metrics are the mean over 5 folds and "folds" lists each fold's; only the
    within-fold blocks are scored unless ``return_sims`` (then the whole (n_img, n_cap) matrix is
    scored and returned under "sims", float32). ``score_all(model, region_embs, word_embs, lengths,
    device=, progress=)`` -> (n_img, n_cap) float32 numpy: tiling.similarity_matrix, or its
    distributed form (imram_min.engineering.distributed.sharded_similarity_matrix) under torchrun.
    """
    cpi = dataset.caps_per_image
    layout = cpi if cpi is not None else dataset.image_of_caption  # 5 / 1, or each caption's image row
    region_embs, word_embs, lengths = encode_split(model, dataset, device, batch_size, progress)
    n_img, n_cap = region_embs.shape[0], word_embs.shape[0]
    sims = None
    if return_sims or not fold5:
        sims = score_all(model, region_embs, word_embs, lengths, device=device, progress=progress)
    if fold5:
        folds = []
        for im, ca in fold_slices(n_img, layout):
            block = sims[im, ca] if sims is not None else score_all(
                model, region_embs[im], word_embs[ca], lengths[ca], device=device, progress=progress)
            folds.append(metrics_from_sims(block, fold_layout(layout, ca)))
        result = average_folds(folds)
    else:
        result = metrics_from_sims(sims, layout)
    result.update(n_images=n_img, n_captions=n_cap, caps_per_image=cpi, fold5=fold5)
    if return_sims:
        result["sims"] = sims
    return result


def per_image(dataset: PrecompDataset) -> str:
    """"5" or "1" (the SCAN layout), or "1 to 4" (another layout, from the sidecar)."""
    if dataset.caps_per_image is not None:
        return str(dataset.caps_per_image)
    counts = np.bincount(dataset.image_of_caption)
    return f"{counts.min()} to {counts.max()}"


def format_table(result: dict, title: str = "") -> str:
    """A readable table of one result dict (and of its folds, if any)."""
    head = f"{'':14s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}{'medr':>8s}{'meanr':>9s}"

    def rows(r):
        return [f"{name:14s}" + "".join(f"{v:8.2f}" for v in r[key][:4]) + f"{r[key][4]:9.2f}"
                for name, key in (("image->text", "i2t"), ("text->image", "t2i"))]

    lines = [title] if title else []
    for k, fold in enumerate(result.get("folds", [])):
        lines += [f"fold {k}: {fold['n_images']} images, {fold['n_captions']} captions", head, *rows(fold),
                  f"rsum {fold['rsum']:.2f}", ""]
    if "folds" in result:
        lines.append(f"mean over {len(result['folds'])} folds")
    lines += [head, *rows(result), f"rsum {result['rsum']:.2f}"]
    return "\n".join(lines)
