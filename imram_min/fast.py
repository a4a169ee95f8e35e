"""Exact fast scoring: the same similarities as ``model.IMRAM.similarity`` with far less arithmetic.

Almost all of IMRAM's cost is the memory distillation unit applied to [q; c] for every pair,
step and query item (2 layers of (2d -> d)). Four exact restructurings remove most of it:

1. Split each MDU weight W = [W_q | W_c]. The attended context c_i = sum_j a_ij v_j is a convex
   combination of fixed context items, so W_c c_i + b = sum_j a_ij (W_c v_j + b) (the weights sum
   to 1): project every context item once (``projections``), then mix the projections with the
   attention weights.
2. At step 1 the query is the caption (or image) alone: W_q q once per item, not per pair.
3. No update after the last step: it is never used.
4. The step score cos(q_i, c_i^k) needs only <q_i, c_i^k> = sum_j a_ij <q_i, v_j> (the step-1
   raw scores, already computed) and |c_i^k|^2 = a_i G a_i^T with G the Gram matrix of the
   context items: the attended context is never materialised.

What is left per pair for K = 3 is one half-width (d -> 2d) update at step 2 plus the attention
itself: about 6x fewer FLOPs than the original at d = 1024. The raw scores <region, word> of
step 1 are the same numbers for both directions and are computed once.

Per-item work (the projections, the MDU weights) is done once per call of ``similarity``, not
once per block of pairs. The per-pair passes are few: the projections' mix and the query part
are summed inside one batched GEMM (baddbmm), one sigmoid serves both MDU units (the update
rows are doubled and tanh(x) = 2 sigmoid(2x) - 1), the gated update is one lerp, and the last
update is never normalised (its raw scores are divided by its norm instead).

On a CPU, ``similarity`` scores blocks side by side, one per core, each with single-threaded
kernels (``block_workers``, ``in_worker_threads``): the blocks are independent, and splitting
each of the many small per-pair kernels across the cores left cores idle at every barrier.

The exported matcher takes the projections as inputs, made once per item by two small graphs
(export.onnx_export.ProjectionGraph). Under ONNX export the update is written for ONNX Runtime:
update and gate halves as separate products (ONNX Runtime copies every slice of a per-pair
tensor), a Tanh, and o + g (q - o).

All tensors of one direction are laid out context-major: (n_ctx_items, n_query_items, n_query,
n_context), so that per-context-item tensors (projections, Gram) broadcast over the batch of
query items in batched matrix products without copies.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .model import EPS, IMRAM, IMRAMConfig, MemoryDistillation, attention_weights, l2norm, masked_mean, \
    mean_pooled_similarity


def memory_weights(memory: MemoryDistillation):
    """The MDU's two layers as one: W_q (2d, d), W_c (2d, d), b (2d,), rows [2 W_o; W_g], cols [q | c].

    The update rows are doubled (exact in floating point) so that one sigmoid gives both units:
    sigmoid(pre) = [sigmoid(2 x_o) | g], and tanh(x_o) = 2 sigmoid(2 x_o) - 1 (PyTorch's tanh on
    the CPU costs several sigmoids).
    """
    weight = torch.cat([2 * memory.update.weight, memory.gate.weight], 0)  # (2d, 2d)
    bias = torch.cat([2 * memory.update.bias, memory.gate.bias], 0)
    d = memory.update.out_features
    return weight[:, :d], weight[:, d:], bias


def direction_weights(model: IMRAM) -> dict:
    """{"t2i": memory_weights, "i2t": memory_weights} for the directions of the model's mode; empty
    when no update is ever made (K = 1, or the mean baseline)."""
    if model.cfg.mode == "mean" or model.cfg.n_steps < 2:
        return {}
    return {name: memory_weights(memory) for name, memory in (("t2i", model.t2i), ("i2t", model.i2t))
            if memory is not None}


CONTEXT_OF = {"region": "t2i", "word": "i2t"}  # the direction in which each side is the context


def projection_weights(weights: dict, side: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W (P, d), b (P,)) with side "region" or "word"'s projections = x W^T + b, P = 2d per
    direction, directions in the order of ``weights`` (t2i, i2t). In the direction where this side
    is the context: W_c x + b (the bias rides with the context: the attention weights over it sum
    to 1); where it is the query: W_q x. So regions give [t2i: W_c v + b | i2t: W_q v] and words
    [t2i: W_q w | i2t: W_c w + b]. weights: ``direction_weights``; None when it is empty."""
    if not weights:
        return None
    parts = [(w_c, b) if name == CONTEXT_OF[side] else (w_q, torch.zeros_like(b))
             for name, (w_q, w_c, b) in weights.items()]
    return torch.cat([w for w, _ in parts], 0), torch.cat([b for _, b in parts], 0)


def projections(model: IMRAM, embs: torch.Tensor, side: str, weights: dict | None = None):
    """Per-item parts of the MDU pre-activations (restructurings 1 and 2), once per item:
    side "region": region_embs (n_img, n_region, d), "word": word_embs (n_cap, n_word, d) ->
    (n, n_items, P), see ``projection_weights``. None when no update is made.
    weights: ``direction_weights`` (made here when None)."""
    stacked = projection_weights(direction_weights(model) if weights is None else weights, side)
    return None if stacked is None else embs @ stacked[0].T + stacked[1]


def split_directions(proj: torch.Tensor | None, weights: dict) -> dict:
    """(..., 2d per direction) -> {direction: (..., 2d)}, views in the order of ``weights``."""
    if proj is None:
        return {}
    width = proj.shape[-1] // len(weights)
    return {name: proj[..., i * width:(i + 1) * width] for i, name in enumerate(weights)}


def fast_recurrent_attention_memory(query: torch.Tensor, context: torch.Tensor, raw: torch.Tensor,
                                    w_query: torch.Tensor | None, cfg: IMRAMConfig,
                                    query_mask: torch.Tensor | None = None,
                                    context_mask: torch.Tensor | None = None,
                                    query_proj: torch.Tensor | None = None,
                                    context_proj: torch.Tensor | None = None) -> torch.Tensor:
    """Step scores of one direction for all pairs, exactly as ``model.recurrent_attention_memory``.

    query: (n_q_items, n_query, d) the query items of each query-side element (captions' words
    for Text-IMRAM, images' regions for Image-IMRAM); context: (n_c_items, n_context, d).
    raw: (n_c_items, n_q_items, n_query, n_context) = <q_i, v_j> for every pair.
    w_query: this direction's W_q (2d, d) (``memory_weights``), used from step 2 on (under ONNX
    export it may be its ``onnx_query_weights`` pair).
    query_mask (n_q_items, n_query) / context_mask (n_c_items, n_context): False on padding.
    query_proj (n_q_items, n_query, 2d) = W_q q and context_proj (n_c_items, n_context, 2d) =
    W_c v + b: this direction's slices of the ``projections`` of each side
    (unused, may be None, when K = 1). Returns (K, n_c_items, n_q_items).
    """
    n_c_items, n_q_items, n_query, n_context = raw.shape
    d = query.shape[-1]
    qmask = None if query_mask is None else query_mask[None]  # (1, n_q_items, n_query)
    cmask = None if context_mask is None else context_mask[:, None]  # (n_c_items, 1, n_context)
    gram = context @ context.transpose(1, 2)  # (n_c_items, n_context, n_context)
    query_norm = query.norm(dim=-1)  # (n_q_items, n_query)
    onnx = torch.onnx.is_in_onnx_export()
    if onnx and cfg.n_steps > 1:  # per-item halves, undoubled: see _onnx_update
        halves = _onnx_halves(w_query, query_proj, context_proj, d)

    sims, q, scores = raw, query, []
    for k in range(cfg.n_steps):
        attn = attention_weights(sims, cfg, qmask, cmask)  # (n_c_items, n_q_items, n_query, n_context)
        flat = attn.reshape(n_c_items, n_q_items * n_query, n_context)
        attended_sq_norm = ((flat @ gram) * flat).sum(-1).view(n_c_items, n_q_items, n_query)
        dot = (attn * raw).sum(-1)  # <original q_i, attended c_i>
        cos = dot / (query_norm * attended_sq_norm.clamp(min=0).sqrt()).clamp(min=EPS)
        scores.append(masked_mean(cos, qmask))
        if k == cfg.n_steps - 1:
            break
        if onnx:
            q = _onnx_update(q, flat, k, halves, raw.shape, d)
        else:
            # pre = W_q q + sum_j a_ij (W_c v_j + b): (n_c_items, n_q_items * n_query, 2d)
            if k == 0:  # the query part is per item (restructuring 2)
                pre = torch.baddbmm(query_proj.reshape(1, n_q_items * n_query, 2 * d), flat, context_proj)
            else:
                pre = (q.reshape(-1, d) @ w_query.T).view(n_c_items, n_q_items * n_query, 2 * d)
                pre = pre.baddbmm_(flat, context_proj)
            sig = pre.sigmoid_().view(n_c_items, n_q_items, n_query, 2 * d)
            update = torch.add(_MINUS_ONE.to(sig), sig[..., :d], alpha=2)  # o = tanh(x_o) = 2 sigmoid(2 x_o) - 1
            q = torch.lerp(update, q, sig[..., d:])  # o + g (q - o) = g * q + (1 - g) * o, in one pass
        # after the last update q only enters the raw scores <q_i, v_j>: scale those instead of q,
        # <q/(|q|+eps), v> = <q, v>/(|q|+eps)
        last_update = k == cfg.n_steps - 2
        if not cfg.no_IMRAM_norm and not last_update:
            q = l2norm(q)
        sims = (q.reshape(n_c_items, n_q_items * n_query, d) @ context.transpose(1, 2)).view(raw.shape)
        if not cfg.no_IMRAM_norm and last_update:
            sims = sims / (torch.linalg.vector_norm(q, dim=-1, keepdim=True) + EPS)
    return torch.stack(scores)


_MINUS_ONE = torch.tensor(-1.0)


def onnx_query_weights(w_query: torch.Tensor) -> tuple:
    """W_q (2d, d) of ``memory_weights`` -> (W_o^T, W_g^T), contiguous (d, d) each, the update
    unit's doubling undone (exact): the step-2 weights as the ONNX graph multiplies by them."""
    d = w_query.shape[1]
    return (w_query[:d] * 0.5).T.contiguous(), w_query[d:].T.contiguous()


def _onnx_halves(w_query, query_proj, context_proj, d):
    """For the ONNX graph: [(W_o^T, W_q q, W_c v + b) of the update unit, (the same) of the gate].

    ONNX Runtime copies every slice, so the halves are cut from the per-item tensors (cheap), never
    from per-pair ones, and the update unit's doubling is undone (exact) so that it is a Tanh.
    w_query: (2d, d), or its ``onnx_query_weights`` made beforehand (constants in the graph).
    """
    w_parts = w_query if isinstance(w_query, tuple) else onnx_query_weights(w_query)
    return [(w_parts[0], query_proj[..., :d] * 0.5, context_proj[..., :d] * 0.5),
            (w_parts[1], query_proj[..., d:], context_proj[..., d:])]


def _onnx_update(q, flat, k, halves, shape, d):
    """The memory update as the ONNX graph computes it: tanh / sigmoid on separate halves, o + g (q - o)."""
    n_c_items, n_q_items, n_query, _ = shape
    pre = []
    for w_half, query_half, context_half in halves:  # w_half: (d, d), already transposed
        query_part = query_half.reshape(1, n_q_items * n_query, d) if k == 0 else \
            (q.reshape(-1, d) @ w_half).view(n_c_items, n_q_items * n_query, d)
        pre.append((flat @ context_half + query_part).view(n_c_items, n_q_items, n_query, d))
    update, gate = torch.tanh(pre[0]), torch.sigmoid(pre[1])
    return update + gate * (q - update)


def fast_step_scores(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                     region_proj: torch.Tensor | None = None, word_proj: torch.Tensor | None = None,
                     weights: dict | None = None, query_weights: dict | None = None) -> dict:
    """{"t2i": (K, n_img, n_cap), "i2t": (K, n_img, n_cap)}, equal to ``IMRAM.step_scores``.

    region_embs (n_img, n_region, d); word_embs (n_cap, n_word, d); lengths (n_cap,);
    region_proj / word_proj: the ``projections`` of exactly these items
    (made here when None); weights: ``direction_weights`` (made here when None); query_weights:
    {direction: ``onnx_query_weights``} to use for the step-2 products instead (ONNX export only).
    Traceable: no Python-side use of tensor values, so it exports to ONNX with dynamic sizes.
    """
    n_img, n_region, d = region_embs.shape
    n_cap, n_word, _ = word_embs.shape
    weights = direction_weights(model) if weights is None else weights
    if weights and region_proj is None:
        region_proj = projections(model, region_embs, "region", weights)
    if weights and word_proj is None:
        word_proj = projections(model, word_embs, "word", weights)
    region_parts, word_parts = split_directions(region_proj, weights), split_directions(word_proj, weights)
    word_mask = torch.arange(n_word, device=word_embs.device)[None, :] < lengths.to(word_embs.device)[:, None]
    # <region r of image i, word w of caption c>, shared by both directions: (n_img, n_region, n_cap, n_word)
    raw = (region_embs.reshape(n_img * n_region, d) @ word_embs.reshape(n_cap * n_word, d).T) \
        .view(n_img, n_region, n_cap, n_word)
    w_query = query_weights or {name: w[0] for name, w in weights.items()}
    out = {}
    if model.t2i is not None:  # words attend regions: context = images, query = captions
        out["t2i"] = fast_recurrent_attention_memory(
            word_embs, region_embs, raw.permute(0, 2, 3, 1), w_query.get("t2i"), model.cfg,
            query_mask=word_mask, query_proj=word_parts.get("t2i"), context_proj=region_parts.get("t2i"))
    if model.i2t is not None:  # regions attend words: context = captions, query = images
        out["i2t"] = fast_recurrent_attention_memory(
            region_embs, word_embs, raw.permute(2, 0, 1, 3), w_query.get("i2t"), model.cfg,
            context_mask=word_mask, query_proj=region_parts.get("i2t"), context_proj=word_parts.get("i2t")
        ).transpose(1, 2)
    return out


class FastMatcher(nn.Module):
    """(region_embs, word_embs, lengths[, region_proj, word_proj]) -> similarities (n_img, n_cap).

    By default the MDU weights are derived from the model's parameters in every call (gradients
    flow into them: it also serves training). ``constant_weights=True`` (export) derives them once,
    detached, so that the ONNX graph holds its step-2 weights as constants (``onnx_query_weights``)
    that ONNX Runtime pre-packs for its matrix products.
    """

    def __init__(self, model: IMRAM, constant_weights: bool = False):
        super().__init__()
        self.model = model
        self.weights = self.onnx_weights = None
        if constant_weights:
            with torch.no_grad():
                self.weights = direction_weights(model)
                self.onnx_weights = {name: onnx_query_weights(w[0]) for name, w in self.weights.items()}

    def forward(self, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                region_proj: torch.Tensor | None = None, word_proj: torch.Tensor | None = None,
                weights: dict | None = None) -> torch.Tensor:
        if self.model.cfg.mode == "mean":
            return mean_pooled_similarity(region_embs, word_embs, lengths)
        query_weights = self.onnx_weights if torch.onnx.is_in_onnx_export() else None
        steps = fast_step_scores(self.model, region_embs, word_embs, lengths, region_proj, word_proj,
                                 self.weights if weights is None else weights, query_weights)
        return sum(s.sum(0) for s in steps.values())
