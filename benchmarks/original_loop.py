"""The original evaluation's way of scoring: one caption at a time against every image of a shard.

Written from the paper and the published behaviour of the original code: for caption j its
valid words are sliced out (no padding, no masks), repeated over the images of the shard, and
each direction runs K steps of attention + memory update, the update being applied after the
last step too (the original does; its result is unused). Used as the speed baseline
(``benchmarks/score.py``, ``benchmarks/train_step.py``).
"""
from __future__ import annotations

import torch

from imram_min.model import IMRAM, attend, cosine, l2norm


def _direction(query: torch.Tensor, context: torch.Tensor, memory, cfg) -> torch.Tensor:
    """query (n_img, n_q, d), context (n_img, n_c, d) -> summed step scores (n_img,)."""
    q, total = query, 0
    for _ in range(cfg.n_steps):
        attended, _ = attend(q, context, cfg)
        total = total + cosine(query, attended).mean(-1)
        q = memory(q, attended)
        if not cfg.no_IMRAM_norm:
            q = l2norm(q)
    return total


def per_caption_similarity(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor,
                           lengths: torch.Tensor) -> torch.Tensor:
    """(n_img, n_region, d), (n_cap, n_word, d), (n_cap,) -> (n_img, n_cap), a Python loop over captions."""
    n_img = region_embs.shape[0]
    columns = []
    for j in range(word_embs.shape[0]):
        words = word_embs[j, : int(lengths[j])][None].expand(n_img, -1, -1)  # (n_img, n_word_j, d)
        score = 0
        if model.text_mdu is not None:
            score = score + _direction(words, region_embs, model.text_mdu, model.cfg)
        if model.image_mdu is not None:
            score = score + _direction(region_embs, words, model.image_mdu, model.cfg)
        columns.append(score)
    return torch.stack(columns, 1)
