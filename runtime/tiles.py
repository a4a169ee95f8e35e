"""The one tiler of the pair matrix (numpy only: the runtime, training and evaluation all use it).

Scoring every image against every caption is cut into blocks of ``img_block`` images x
``cap_block`` captions. Captions are sorted by length (longest first, stable) before they are cut,
so that each block is padded only to its own longest caption (bucketing) and the costliest blocks
start first; the scores are put back in the callers' order. Padding never changes a score (the
matchers mask it exactly), so the tiling changes nothing but speed and memory.
"""
from __future__ import annotations

import numpy as np


def block_sizes(n_img: int, n_cap: int, per_pair: int, max_elems: int, max_captions: int | None = None,
                square: bool = False) -> tuple[int, int]:
    """(img_block, cap_block): pairs per block such that one per-pair tensor of ``per_pair`` values
    (e.g. max(n_region, n_word) * 2d) holds at most ``max_elems`` values in all.

    square: as many images as captions (ONNX Runtime calls); else captions first, at most
    ``max_captions`` of them, and the rest of the budget in images.
    """
    pairs = max(1, max_elems // max(1, per_pair))
    if square:
        side = max(1, int(np.sqrt(pairs)))
        if max_captions is not None:
            side = min(side, max_captions)
        return max(1, min(n_img, side)), max(1, min(n_cap, side))
    cap_block = max(1, min(n_cap, pairs, max_captions or pairs))
    img_block = max(1, min(n_img, pairs // cap_block))
    return img_block, cap_block


def caption_blocks(lengths: np.ndarray, cap_block: int) -> list[np.ndarray]:
    """Caption indices in blocks of ``cap_block`` captions of similar length, longest first."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    return [order[j:j + cap_block] for j in range(0, len(order), cap_block)]


def pair_blocks(n_img: int, img_block: int, cap_blocks: list[np.ndarray]) -> list[tuple[slice, np.ndarray]]:
    """Every (images, captions) block of the pair matrix: caption blocks outermost (longest first),
    image slices within each."""
    return [(slice(i, min(i + img_block, n_img)), idx) for idx in cap_blocks for i in range(0, n_img, img_block)]
