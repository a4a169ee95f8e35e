"""Exact fast scoring: the pair scores of ``model.IMRAM.similarity`` with far less arithmetic.

Almost all of IMRAM's cost is the MDU, (7)-(8) of ``imram_min.model``: two layers (2d -> d)
applied to [m_i; c_i] for every pair, step and query item. Exact identities remove most of it;
each is written once below, labelled (F1)..(F7), beside the lines that use it. Labels (1)..(12)
are the formulas of ``imram_min.model``'s docstring.

    (F1) context projection mixing. Split each MDU weight W = [W_q | W_c]. By (6) and
         sum_j a_ij = 1 (5):   W_c c_i + b = sum_j a_ij (W_c v_j + b)
         so every context item is projected once (``projections``), and per pair only the
         attention weights mix the projections.
    (F2) step-1 query part. At step 1 the memory is the query (m = q), so W_q m_i = W_q q_i is
         per query item, not per pair (``projections`` too).
    (F3) no update after the last step: m^K never enters a score (10).
    (F4) the step score (10) without c_i. With the STEP-1 raw scores s^1_ij = <q_i, v_j> (3)
         and the Gram matrix G_jl = <v_j, v_l> of the context items:
             <q_i, c_i^k> = sum_j a^k_ij <q_i, v_j> = sum_j a^k_ij s^1_ij
             |c_i^k|^2    = a^k_i G (a^k_i)^T
         so the attended context is never materialised. The step-1 raw scores <region, word>
         are the same numbers for both directions and are computed once.
    (F5) tanh(x) = 2 sigmoid(2x) - 1. With the update rows doubled ([2 W_o; W_g], exact in
         floating point) one sigmoid serves both (7) and (8); PyTorch's tanh on the CPU costs
         several sigmoids.
    (F6) the gated update (9) as one lerp:  g m + (1 - g) o = o + g (m - o).
    (F7) the l2norm after the last update folded into the raw scores it only enters (3):
             <m/(|m| + eps), v_j> = <m, v_j> / (|m| + eps)
    (F8), (F9) for training: the derivatives of the gated update's pointwise part (``Gate``) and
         of the memory's l2norm (``L2Norm``) written out, in a few passes over the per-pair
         (..., d) tensors where autograd's node per operation made about twice as many.

What is left per pair for K = 3 is one half-width (d -> 2d) product at step 2 plus the attention
itself: about 6x fewer FLOPs than the original at d = 1024.

The memory update of the loop is a function it receives (``update``): by default ``gated_update``,
the PyTorch form above; ``export.graphs.onnx_update`` is the same update written for ONNX Runtime.

Layout: the tensors of one direction are context-major, (n_c_items, n_q_items, n_query,
n_context) (e.g. Text-IMRAM: (n_img, n_cap, n_word, n_region)), so that per-context-item
tensors (projections, Gram) broadcast over the query items in batched products without copies.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .model import EPS, IMRAM, IMRAMConfig, MemoryDistillation, attention_weights, l2norm, masked_mean, \
    mean_pooled_similarity, word_mask


# --------------------------------------------------------------------------- per-item weights and projections
def mdu_weights(mdu: MemoryDistillation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MDU's two layers as one: (W_q (2d, d), W_c (2d, d), b (2d,)), rows [2 W_o; W_g], columns [m | c].

    The update rows are doubled (F5): sigmoid(W [m; c] + b) = [sigmoid(2 x_o) | g] with x_o the
    pre-activation of (7) and g the gate (8).
    """
    weight = torch.cat([2 * mdu.update.weight, mdu.gate.weight], 0)  # (2d, 2d)  (F5)
    bias = torch.cat([2 * mdu.update.bias, mdu.gate.bias], 0)  # (2d,)
    d = mdu.update.out_features
    return weight[:, :d], weight[:, d:], bias


def direction_weights(model: IMRAM) -> dict:
    """{"text": mdu_weights, "image": mdu_weights} for the directions of the model's mode; empty
    when no update is ever made (K = 1, or the mean baseline)."""
    if model.cfg.mode == "mean" or model.cfg.n_steps < 2:
        return {}
    return {direction: mdu_weights(mdu) for direction, mdu in model.mdus().items()}


CONTEXT_OF = {"region": "text", "word": "image"}  # the direction in which each side is the context


def projection_weights(weights: dict, side: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W (P, d), b (P,)) such that side "region"'s or "word"'s projections are x W^T + b; P = 2d
    per direction, directions in the order of ``weights``; None when ``weights`` is empty.

    Where this side is the context: W_c x + b (F1; the bias rides with the context, whose
    attention weights sum to 1); where it is the query: W_q x (F2). So regions give
    [text: W_c v + b | image: W_q v] and words [text: W_q w | image: W_c w + b].
    weights: ``direction_weights``.
    """
    if not weights:
        return None
    parts = [(w_c, b) if direction == CONTEXT_OF[side] else (w_q, torch.zeros_like(b))
             for direction, (w_q, w_c, b) in weights.items()]
    return torch.cat([w for w, _ in parts], 0), torch.cat([b for _, b in parts], 0)


def projections(model: IMRAM, embs: torch.Tensor, side: str, weights: dict | None = None) -> torch.Tensor | None:
    """(F1), (F2): the per-item parts of the MDU pre-activations, once per item.

    side "region": region_embs (n_img, n_region, d); "word": word_embs (n_cap, n_word, d)
    -> (n, n_items, P) (see ``projection_weights``), None when no update is made.
    weights: ``direction_weights`` (made here when None).
    """
    stacked = projection_weights(direction_weights(model) if weights is None else weights, side)
    return None if stacked is None else embs @ stacked[0].T + stacked[1]


def split_directions(proj: torch.Tensor | None, weights: dict) -> dict:
    """(..., P) -> {direction: (..., 2d)}, views, in the order of ``weights``."""
    if proj is None:
        return {}
    width = proj.shape[-1] // len(weights)
    return {direction: proj[..., i * width:(i + 1) * width] for i, direction in enumerate(weights)}


# --------------------------------------------------------------------------- the step score (F4)
def attended_dot(attention: torch.Tensor, raw_scores: torch.Tensor) -> torch.Tensor:
    """(F4): <q_i, c_i^k> = sum_j a^k_ij <q_i, v_j>, from the STEP-1 raw scores.

    attention a^k (n_c_items, n_q_items, n_query, n_context); raw_scores s^1, same shape
    -> (n_c_items, n_q_items, n_query).
    """
    return (attention * raw_scores).sum(-1)


def attended_sq_norm(attention: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """(F4): |c_i^k|^2 = a^k_i G (a^k_i)^T, with the Gram matrix G_jl = <v_j, v_l>.

    attention (n_c_items, n_q_items, n_query, n_context); gram (n_c_items, n_context, n_context)
    -> (n_c_items, n_q_items, n_query).
    """
    n_c_items, n_q_items, n_query, n_context = attention.shape
    flat = attention.reshape(n_c_items, n_q_items * n_query, n_context)
    return ((flat @ gram) * flat).sum(-1).view(n_c_items, n_q_items, n_query)


# --------------------------------------------------------------------------- the memory update
_MINUS_ONE = torch.tensor(-1.0)


def gate(sig: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(7)-(9) from the sigmoids: sig (..., 2d) = [sigmoid(2 x_o) | g], memory (..., d) (broadcast)
    -> the new memory o + g (m - o), o = tanh(x_o)."""
    d = sig.shape[-1] // 2
    o = torch.add(_MINUS_ONE.to(sig), sig[..., :d], alpha=2)  # (F5), (7): o = tanh(x_o) = 2 sigmoid(2 x_o) - 1
    return torch.lerp(o, memory.to(o.dtype), sig[..., d:])  # (F6), (9): o + g (m - o) = g m + (1 - g) o


class Gate(torch.autograd.Function):
    """(F8) ``gate`` of sigmoid(pre) with its derivative written out, for training.

    With s = sigmoid(pre_o), o = 2 s - 1, g = sigmoid(pre_g), m' = o + g (m - o), and G = dL/dm':
        dL/dm     = G g
        dL/dpre_o = G (1 - g) 2 s (1 - s)
        dL/dpre_g = G (m - o) g (1 - g)
    Autograd would differentiate the slices of pre, the tanh identity and the lerp one node each
    (zero-filled slice gradients, copies into views); this writes the (..., 2d) gradient in place.
    pre (..., 2d) rows [2 x_o | x_g] (F5); memory (..., d) or broadcast to it (the query at step 1).
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        sig = torch.sigmoid(pre)  # [s | g]  (8)
        ctx.save_for_backward(sig, memory)
        return gate(sig, memory)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sig, memory = ctx.saved_tensors
        d = sig.shape[-1] // 2
        s, g = sig[..., :d], sig[..., d:]
        grad_pre = torch.empty_like(sig)
        grad_memory = grad * g  # G g
        torch.sub(grad, grad_memory, out=grad_pre[..., :d]).mul_(2)  # 2 G (1 - g)
        torch.mul(torch.add(memory.to(sig.dtype), s, alpha=-2).add_(1), grad, out=grad_pre[..., d:])  # G (m - o)
        grad_pre.mul_(sig).mul_(1 - sig)  # x sigmoid' = sig (1 - sig), both halves
        return grad_pre, grad_memory.sum_to_size(memory.shape).to(memory.dtype)


class L2Norm(torch.autograd.Function):
    """(F9) l2norm over the last axis, y = x / (|x| + eps), with its derivative written out, for training:
        dL/dx = G / (|x| + eps) - y <y, G> / |x|      (G = dL/dy; the second term is 0 where x = 0)
    (autograd's norm and division nodes make twice the passes over the (..., d) memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        y = x / (norm + EPS)
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, norm = ctx.saved_tensors
        along = (y * grad).sum(-1, keepdim=True).div_(norm.clamp(min=torch.finfo(norm.dtype).tiny))  # <y, G> / |x|
        return (grad / (norm + EPS)).sub_(y * along)


def normalize(memory: torch.Tensor) -> torch.Tensor:
    """``model.l2norm`` of the memory (9), through ``L2Norm`` (F9) when autograd records it."""
    return L2Norm.apply(memory) if torch.is_grad_enabled() and memory.requires_grad else l2norm(memory)


def gated_update(memory: torch.Tensor, attention: torch.Tensor, step: int, w_query: torch.Tensor,
                 query_proj: torch.Tensor, context_proj: torch.Tensor) -> torch.Tensor:
    """The MDU (7)-(9) without the l2norm, for all pairs: the PyTorch form of the fast loop's update.

    memory (n_c_items, n_q_items, n_query, d), or at step 0 the query (n_q_items, n_query, d)
    (or per pair, as memory); attention (n_c_items, n_q_items, n_query, n_context); w_query: W_q
    (2d, d) of ``mdu_weights``; query_proj = W_q q, shaped as the query with 2d last;
    context_proj (n_c_items, n_context, 2d) = W_c v + b. Returns the new memory (n_c_items,
    n_q_items, n_query, d).
    """
    n_c_items, n_q_items, n_query, n_context = attention.shape
    d, rows = context_proj.shape[-1] // 2, n_q_items * n_query
    flat = attention.reshape(n_c_items, rows, n_context)
    # pre = W_q m_i + W_c c_i + b, rows [2 x_o | x_g]: (n_c_items, rows, 2d)
    if step == 0:  # (F2): m = q, so W_q m_i is the per-item query_proj, broadcast over the context items
        pre = torch.baddbmm(query_proj.reshape(-1, rows, 2 * d), flat, context_proj)  # (F1): + sum_j a_ij (W_c v_j + b)
    else:
        pre = (memory.reshape(-1, d) @ w_query.T).view(n_c_items, rows, 2 * d)  # W_q m_i
        if pre.requires_grad or not pre.dtype == flat.dtype == context_proj.dtype:  # autograd, or autocast
            pre = torch.baddbmm(pre, flat, context_proj)  # (F1): + sum_j a_ij (W_c v_j + b)
        else:
            pre = pre.baddbmm_(flat, context_proj)  # the same, in place
    pre = pre.view(n_c_items, n_q_items, n_query, 2 * d)
    if torch.is_grad_enabled() and (pre.requires_grad or memory.requires_grad):
        return Gate.apply(pre, memory)  # (F8)
    return gate(pre.sigmoid_(), memory)  # [sigmoid(2 x_o) | g]  (8), in place
# --------------------------------------------------------------------------- iterative matching
def fast_recurrent_attention_memory(query: torch.Tensor, context: torch.Tensor, raw_scores: torch.Tensor,
                                    cfg: IMRAMConfig, query_mask: torch.Tensor | None = None,
                                    context_mask: torch.Tensor | None = None, mdu_parts: tuple | None = None,
                                    update=gated_update) -> torch.Tensor:
    """Step scores (10) of one direction for all pairs, exactly as ``model.recurrent_attention_memory``.

    query (n_q_items, n_query, d): the query items (captions' words for Text-IMRAM, images'
    regions for Image-IMRAM), or (n_c_items, n_q_items, n_query, d): a query of each pair's own
    (``zipped_scores``); context (n_c_items, n_context, d); raw_scores (n_c_items, n_q_items,
    n_query, n_context): the step-1 raw scores s^1_ij = <q_i, v_j> (3) of every pair.
    query_mask (n_q_items, n_query) (or per pair, as query) / context_mask (n_c_items, n_context):
    False on padding.
    mdu_parts: (w_query, query_proj, context_proj), passed to ``update`` (None when K = 1);
    update: the memory update, ``gated_update`` or a function of the same signature.
    Returns (K, n_c_items, n_q_items).
    """
    n_c_items, n_q_items, n_query, n_context = raw_scores.shape
    d = query.shape[-1]
    qmask = None if query_mask is None or query_mask.dim() == 3 else query_mask[None]  # (1, n_q_items, n_query)
    qmask = query_mask if qmask is None else qmask
    cmask = None if context_mask is None else context_mask[:, None]  # (n_c_items, 1, n_context)
    gram = context @ context.transpose(1, 2)  # (F4): G_jl = <v_j, v_l>, (n_c_items, n_context, n_context)
    query_norm = query.norm(dim=-1)  # |q_i|, (n_q_items, n_query) (or per pair)

    scores, memory, step_scores = raw_scores, query, []
    for k in range(cfg.n_steps):
        attention = attention_weights(scores, cfg, qmask, cmask)  # (4)-(5): (n_c_items, n_q_items, n_query, n_context)
        dot = attended_dot(attention, raw_scores)  # (F4): <q_i, c_i^k> from the step-1 raw scores
        sq_norm = attended_sq_norm(attention, gram)  # (F4): |c_i^k|^2 = a_i G a_i^T
        cos = dot / (query_norm * sq_norm.clamp(min=0).sqrt()).clamp(min=EPS)  # cos(q_i, c_i^k), as model.cosine
        step_scores.append(masked_mean(cos, qmask))  # (10)
        if k == cfg.n_steps - 1:
            break  # (F3): no update after the last step
        memory = update(memory, attention, k, *mdu_parts)  # (7)-(9) without the l2norm
        last_update = k == cfg.n_steps - 2
        if not cfg.no_IMRAM_norm and not last_update:
            memory = normalize(memory)  # (9)
        scores = (memory.reshape(n_c_items, n_q_items * n_query, d) @ context.transpose(1, 2)).view(raw_scores.shape)  # (3)
        if not cfg.no_IMRAM_norm and last_update:
            scores = scores / (torch.linalg.vector_norm(memory, dim=-1, keepdim=True) + EPS)  # (F7), (9)
    return torch.stack(step_scores)


def fast_step_scores(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                     region_proj: torch.Tensor | None = None, word_proj: torch.Tensor | None = None,
                     weights: dict | None = None, query_weights: dict | None = None,
                     update=gated_update) -> dict:
    """{"text": (K, n_img, n_cap), "image": (K, n_img, n_cap)}, equal to ``IMRAM.step_scores``.

    region_embs (n_img, n_region, d); word_embs (n_cap, n_word, d); lengths (n_cap,);
    region_proj (n_img, n_region, P) / word_proj (n_cap, n_word, P): the ``projections`` of
    exactly these items (made here when None); weights: ``direction_weights`` (made here when
    None); query_weights: {direction: the step-2 weights in the form ``update`` takes} (default:
    W_q of ``weights``); update: see ``fast_recurrent_attention_memory``.
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
    w_query = query_weights or {direction: w[0] for direction, w in weights.items()}
    mask = word_mask(lengths, n_word, word_embs.device)  # (n_cap, n_word)
    # (3), (F4): the step-1 raw scores <region r of image i, word t of caption c>, computed once for
    # both directions: (n_img, n_region, n_cap, n_word)
    region_word_scores = (region_embs.reshape(n_img * n_region, d) @ word_embs.reshape(n_cap * n_word, d).T) \
        .view(n_img, n_region, n_cap, n_word)
    out = {}
    for direction in model.mdus():
        if direction == "text":  # words attend regions: context items = images, query items = captions
            parts = (w_query["text"], word_parts["text"], region_parts["text"]) if weights else None
            out["text"] = fast_recurrent_attention_memory(
                word_embs, region_embs, region_word_scores.permute(0, 2, 3, 1), model.cfg,
                query_mask=mask, mdu_parts=parts, update=update)
        else:  # regions attend words: context items = captions, query items = images
            parts = (w_query["image"], region_parts["image"], word_parts["image"]) if weights else None
            out["image"] = fast_recurrent_attention_memory(
                region_embs, word_embs, region_word_scores.permute(2, 0, 1, 3), model.cfg,
                context_mask=mask, mdu_parts=parts, update=update).transpose(1, 2)
    return out


class FastMatcher(nn.Module):
    """(region_embs, word_embs, lengths[, region_proj, word_proj, weights]) -> pair scores (n_img, n_cap).

    The sum of ``fast_step_scores`` over steps and directions (11), equal to ``IMRAM.similarity``
    (mode "mean": the baseline). The MDU weights are derived from the model's parameters in each
    call unless given (gradients flow into them: it also serves training).
    """

    def __init__(self, model: IMRAM):
        super().__init__()
        self.model = model

    def forward(self, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                region_proj: torch.Tensor | None = None, word_proj: torch.Tensor | None = None,
                weights: dict | None = None) -> torch.Tensor:
        if self.model.cfg.mode == "mean":
            return mean_pooled_similarity(region_embs, word_embs, lengths)
        steps = fast_step_scores(self.model, region_embs, word_embs, lengths, region_proj, word_proj, weights)
        return sum(s.sum(0) for s in steps.values())


def zipped_scores(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor,
                  lengths: torch.Tensor) -> torch.Tensor:
    """F(image p, caption p) (11) for p = 0 .. P-1: the pairs of a list, not all pairs; equal to the
    diagonal of ``IMRAM.similarity(region_embs, word_embs, lengths)``.

    region_embs (P, n_region, d), word_embs (P, n_word, d), lengths (P,) -> (P,). The same loop as
    all pairs, each pair its own context item with a query of its own (training scores the few
    pairs its loss depends on this way: ``imram_min.distributed.support_loss``).
    """
    if model.cfg.mode == "mean":
        return mean_pooled_similarity(region_embs, word_embs, lengths).diagonal()
    weights = direction_weights(model)
    region_parts = split_directions(projections(model, region_embs, "region", weights), weights)  # (F1), (F2)
    word_parts = split_directions(projections(model, word_embs, "word", weights), weights)
    mask = word_mask(lengths, word_embs.shape[1], word_embs.device)  # (P, n_word)
    raw = region_embs @ word_embs.transpose(1, 2)  # (3): s^1 of each pair, (P, n_region, n_word)
    total = 0
    for direction in model.mdus():
        if direction == "text":  # words attend regions: (P, 1, n_word, n_region)
            parts = (weights["text"][0], word_parts["text"][:, None], region_parts["text"]) if weights else None
            steps = fast_recurrent_attention_memory(word_embs[:, None], region_embs, raw.transpose(1, 2)[:, None],
                                                    model.cfg, query_mask=mask[:, None], mdu_parts=parts)
        else:  # regions attend words: (P, 1, n_region, n_word)
            parts = (weights["image"][0], region_parts["image"][:, None], word_parts["image"]) if weights else None
            steps = fast_recurrent_attention_memory(region_embs[:, None], word_embs, raw[:, None], model.cfg,
                                                    context_mask=mask, mdu_parts=parts)
        total = total + steps.sum(0)[:, 0]  # (11): sum over steps and directions
    return total
