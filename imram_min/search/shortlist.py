"""Two-stage retrieval evaluation: a first stage over the whole split, IMRAM re-ranks its top K.

    python -m imram_min.evaluate RUN/best.pt --data DIR --split test --shortlist 10%
    python -m imram_min.evaluate RUN/best.pt --data DIR --split test --shortlist 1%,2%,5%,10%,20% --json OUT.json

The protocol, in both directions (t2i: each caption's images; i2t: each image's captions):

1. First stage, over the whole split: every image and caption gets one global vector: that of the
   global head (imram_min.search.global_head, distilled from the model; by default RUN/global_head.pt
   beside the checkpoint when it was distilled from it, or ``--global-head HEAD.pt``: the rule of
   python -m export, global_head.choose_head), else (``--no-global-head``, or no such head) the mean of
   its own region (word) embeddings, l2-normalised (what runtime.index stores for a model dir
   without a head); candidates are ranked by cosine and the top K kept (ties by lower index).
2. Re-ranking: the K candidates are scored by ``tiling.score_pairs``, the exact scorer of the
   exhaustive evaluation, and ranked by that score.

The two-stage ranking is the K re-ranked candidates, then every other item in first-stage order.
Ranks follow ``imram_min.evaluate``: a ground truth inside the shortlist ranks after the
candidates scoring strictly higher; one outside it ranks after the K candidates and the others of
strictly higher cosine; i2t takes the best-ranked of an image's captions. The metrics are then
exactly those of the exhaustive protocol (R@1/5/10, medr, meanr, rsum); with K = the whole gallery
the two protocols give the same ranks. Also reported: the first stage alone (its metrics), and
the share of queries whose ground truth is in the shortlist ("hit"). Times are wall-clock on
this machine: the exhaustive time is encoding excluded, scoring all pairs and ranking; the
two-stage time is the first stage plus the re-ranking.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from imram_min.engineering import tiling
from imram_min.evaluate import encode_split, image_of_caption, metrics_from_sims, rank_metrics
from imram_min.model import IMRAM


def mean_embedding_vectors(embs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(n, n_vec, d) embeddings (zeros past each length) -> (n, d): their mean, l2-normalised (as
    runtime.engine.mean_embedding_vectors)."""
    mean = embs.mean(1) if lengths is None else embs.sum(1) / lengths.to(embs.dtype)[:, None]
    return mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-8)


def first_stage_vectors(region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                        head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image vectors, caption vectors) of the first stage: the head's, or the mean embeddings'."""
    if head is not None:
        from imram_min.search.global_head import head_vectors
        return head_vectors(head, region_embs, word_embs, lengths)
    return mean_embedding_vectors(region_embs), mean_embedding_vectors(word_embs, lengths)


def parse_shortlists(spec: str, n_img: int, n_cap: int) -> list[tuple[str, int, int]]:
    """"50" or "10%" or "1%,5%,10%" -> [(label, K images (t2i), K captions (i2t))]: a count is the same
    in both directions, a percentage is of each direction's gallery (at least 1)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        try:
            if item.endswith("%"):
                frac = float(item[:-1]) / 100
                if not 0 < frac <= 1:
                    raise ValueError
                out.append((item, max(1, round(frac * n_img)), max(1, round(frac * n_cap))))
            else:
                k = int(item)
                if k < 1:
                    raise ValueError
                out.append((item, min(k, n_img), min(k, n_cap)))
        except ValueError:
            raise ValueError(f"--shortlist: {item!r} is not a count >= 1 or a percentage in (0, 100]") from None
    return out


def top_candidates(first: np.ndarray, k: int) -> np.ndarray:
    """(n_query, n_items) first-stage scores -> (n_query, k) candidates, best first, ties by lower index."""
    order = np.argsort(-first, axis=1, kind="stable")
    return order[:, :k]


def two_stage_ranks(rerank, first: np.ndarray, gt: list[np.ndarray], k: int,
                    progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of each query's best ground truth under the two-stage protocol, and whether any ground
    truth was in the shortlist. rerank(q, candidates) -> exact scores; first (n_query, n_items);
    gt[q]: the ground-truth items of query q; progress: a tqdm bar's label (None: no bar)."""
    cands = top_candidates(first, k)
    ranks, hit = np.empty(len(first), np.int64), np.zeros(len(first), bool)
    for q in tqdm(range(len(first)), desc=progress, disable=progress is None, leave=False):
        cand = cands[q]
        scores = rerank(q, cand)
        in_list = np.isin(cand, gt[q])
        outside = np.ones(first.shape[1], bool)
        outside[cand] = False
        best = np.iinfo(np.int64).max
        for g in gt[q]:
            pos = np.flatnonzero(cand == g)
            if len(pos):
                best = min(best, int((scores > scores[pos[0]]).sum()))
            else:
                best = min(best, k + int((first[q][outside] > first[q, g]).sum()))
        ranks[q], hit[q] = best, in_list.any()
    return ranks, hit


@torch.no_grad()
def evaluate_shortlists(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                        caps_per_image: int | np.ndarray, shortlists: list[tuple[str, int, int]],
                        device: str | torch.device = "cpu", head=None, progress: bool = False) -> dict:
    """{"first_stage": metrics, "shortlists": [{"shortlist", "k_images", "k_captions", "i2t", "t2i",
    "rsum", "hit_i2t", "hit_t2i", "seconds"}]} of the two-stage protocol on encoded embeddings;
    head: a GlobalHead for the first stage (None: the mean embeddings); progress: tqdm bars."""
    model.eval()
    device = torch.device(device)
    n_img, n_cap = len(region_embs), len(word_embs)
    t0 = time.perf_counter()
    img_g, cap_g = first_stage_vectors(region_embs, word_embs, lengths, head)
    first = (img_g @ cap_g.T).numpy()  # (n_img, n_cap) cosines
    first_seconds = time.perf_counter() - t0
    result = {"first_stage": {**metrics_from_sims(first, caps_per_image), "seconds": first_seconds},
              "shortlists": []}
    regions = region_embs.to(device)

    def rerank_t2i(j, cand):  # caption j against candidate images
        lens = lengths[j:j + 1]
        words = word_embs[j:j + 1, :int(lens[0])].to(device)
        return tiling.score_pairs(model, regions[torch.from_numpy(cand).to(device)], words, lens)[:, 0].cpu().numpy()

    def rerank_i2t(i, cand):  # image i against candidate captions
        idx = torch.from_numpy(cand)
        lens = lengths[idx]
        words = word_embs[idx, :int(lens.max())].to(device)
        return tiling.score_pairs(model, regions[i:i + 1], words, lens)[0].cpu().numpy()

    rows = image_of_caption(caps_per_image, n_cap)  # caps_per_image: 5 / 1, or each caption's image row
    gt_t2i = [rows[j:j + 1] for j in range(n_cap)]
    starts = np.searchsorted(rows, np.arange(n_img + 1))
    gt_i2t = [np.arange(starts[i], starts[i + 1]) for i in range(n_img)]
    for label, k_img, k_cap in shortlists:
        t0 = time.perf_counter()
        first = (img_g @ cap_g.T).numpy()
        bar = (lambda direction: f"shortlist {label} {direction}") if progress else (lambda direction: None)
        r_t2i, hit_t2i = two_stage_ranks(rerank_t2i, np.ascontiguousarray(first.T), gt_t2i, k_img, bar("t2i"))
        r_i2t, hit_i2t = two_stage_ranks(rerank_i2t, first, gt_i2t, k_cap, bar("i2t"))
        seconds = time.perf_counter() - t0
        a, b = rank_metrics(r_i2t), rank_metrics(r_t2i)
        result["shortlists"].append({"shortlist": label, "k_images": k_img, "k_captions": k_cap, "i2t": list(a),
                                     "t2i": list(b), "rsum": float(sum(a[:3]) + sum(b[:3])),
                                     "hit_i2t": 100.0 * float(hit_i2t.mean()),
                                     "hit_t2i": 100.0 * float(hit_t2i.mean()), "seconds": seconds})
    return result


def run(model: IMRAM, dataset, device, spec: str, batch_size: int = 128, head=None,
        head_path: str | None = None) -> dict:
    """The --shortlist path of ``python -m imram_min.evaluate``: encode once, the exhaustive protocol
    (timed), then the two-stage protocol at every shortlist of ``spec`` (first stage: ``head``, read
    from ``head_path``, or the mean embeddings); prints the table."""
    cpi = dataset.caps_per_image  # None: a layout of DIR/{split}_cap2img.txt, ranked by its rows
    layout = cpi if cpi is not None else dataset.image_of_caption
    region_embs, word_embs, lengths = encode_split(model, dataset, device, batch_size, progress=True)
    shortlists = parse_shortlists(spec, len(region_embs), len(word_embs))
    t0 = time.perf_counter()
    sims = tiling.similarity_matrix(model, region_embs, word_embs, lengths, device, progress=True)
    exhaustive = {**metrics_from_sims(sims, layout), "seconds": time.perf_counter() - t0}
    result = {"exhaustive": exhaustive, **evaluate_shortlists(model, region_embs, word_embs, lengths, layout,
                                                              shortlists, device, head, progress=True),
              "first_stage_vectors": "global head" if head is not None else "mean embeddings",
              "global_head": head_path if head is not None else None,
              "n_images": len(region_embs), "n_captions": len(word_embs), "caps_per_image": cpi}
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    head = (f"{'protocol':22s}{'i2t R@1':>8s}{'R@5':>7s}{'R@10':>7s}{'t2i R@1':>8s}{'R@5':>7s}{'R@10':>7s}"
            f"{'rsum':>8s}{'hit i2t':>8s}{'hit t2i':>8s}{'seconds':>9s}")

    def row(name, r, hit=("", "")):
        return (f"{name:22s}" + "".join(f"{v:7.1f}" if n else f"{v:8.1f}" for n, v in
                                         zip((0, 1, 1, 0, 1, 1), r["i2t"][:3] + r["t2i"][:3]))
                + f"{r['rsum']:8.1f}{hit[0]:>8s}{hit[1]:>8s}{r['seconds']:9.1f}")
    first = result["first_stage_vectors"] + (f" {result['global_head']}" if result["global_head"] else "")
    lines = [f"{result['n_images']} images, {result['n_captions']} captions; first stage: {first}", head,
             row("exhaustive", result["exhaustive"]), row("first stage alone", result["first_stage"])]
    for s in result["shortlists"]:
        lines.append(row(f"shortlist {s['shortlist']} ({s['k_images']}/{s['k_captions']})", s,
                         (f"{s['hit_i2t']:.1f}", f"{s['hit_t2i']:.1f}")))
    return "\n".join(lines)
