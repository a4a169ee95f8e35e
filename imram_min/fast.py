"""Exact fast scoring: the pair scores of ``model.IMRAM.similarity`` with far less arithmetic.

The forward algebra only (the hand-written derivatives for training, (F8) and (F9), are in
``imram_min.fast_backward``). Symbols are those of the table in ``imram_min.model``'s docstring;
labels (1)..(12) are its formulas. Almost all of IMRAM's cost is the MDU, (7)-(8): two layers
(2d -> d) applied to [x_i^(k); c_i^(k)] for every pair, step and query vector. Exact identities
remove most of it; each is written once below, labelled (F1)..(F7), beside the lines that use it.
Split each MDU weight by the columns that multiply the memory x_i^(k) and the attended context
c_i^(k): W = [W_x | W_c] (code: ``w_memory`` = W_x; W_c, with the bias, inside ``context_proj``).

    (F1) context projection mixing. By (6) and sum_j alpha_ij = 1 (5):
             W_c c_i + b = sum_j alpha_ij (W_c y_j + b)
         so every context vector is projected once (``projections``), and per pair only the
         attention weights mix the projections.
    (F2) step-1 query part. At step 1 the memory is the query (x^(1) = x), so W_x x_i^(1) = W_x x_i is
         per query vector, not per pair (``projections`` too).
    (F3) no update after the last step: x^(K+1) never enters a score (10).
    (F4) the step score (10) without c_i. With the STEP-1 raw scores s^(1)_ij = <x_i, y_j> (3)
         and the Gram matrix G_jl = <y_j, y_l> of the context vectors:
             <x_i, c_i^(k)> = sum_j alpha^(k)_ij <x_i, y_j> = sum_j alpha^(k)_ij s^(1)_ij
             |c_i^(k)|^2    = alpha^(k)_i G (alpha^(k)_i)^T
         so the attended context is never materialised. The step-1 raw scores <region, word>
         are the same numbers for both directions and are computed once.
    (F5) tanh(z) = 2 sigmoid(2z) - 1. With the update rows doubled ([2 W_o; W_g], exact in
         floating point) one sigmoid serves both (7) and (8); PyTorch's tanh on the CPU costs
         several sigmoids.
    (F6) the gated update (9) as one lerp:  g x + (1 - g) o = o + g (x - o).
    (F7) the l2norm after the last update folded into the raw scores it only enters (3):
             <x/(|x| + eps), y_j> = <x, y_j> / (|x| + eps)
    (F8), (F9): the derivatives, ``imram_min.fast_backward``; (F10), the loss that scores only the
         pairs it depends on: ``imram_min.loss.support_loss``.

The FLOP count (``flops_per_pair``). Counted: every matrix product, 2 FLOPs per multiply-add
(what ``torch.utils.flop_counter.FlopCounterMode`` counts; the tests hold the formulas to it).
Per pair of an image of n_region regions and a caption of n_word words, per direction with m query
and n context vectors (Text-IMRAM: m = n_word, n = n_region; Image-IMRAM: m = n_region, n = n_word),
K steps, size d:

    original (the published code, ``imram_min.reference``):  K (4 m n d + 8 m d^2)
        raw scores (3) 2 m n d and attended context (6) 2 m n d at each step, and the MDU's two
        layers 2 x 2 m (2d) d after EVERY step, the last one too (its result is unused)
    plain (``imram_min.model``):  K 4 m n d + (K - 1) 8 m d^2      (no update after the last step)
    fast (this file):  2 n_region n_word d  (step-1 raw scores, once for both directions, F4)
        + per direction  K 2 m n^2           alpha G, the attended norms (F4)
                       + (K - 1) 2 m n d     raw scores of steps 2..K (3)
                       + (K - 1) 4 m n d     alpha (W_c y + b) (F1)
                       + (K - 2)^+ 4 m d^2   W_x x^(k) for the updates after the first (F2)
    plus, once per image and once per caption (an *item*) rather than per pair (``flops_per_item``), with
    n_proj = 2d per direction when K >= 2 (else 0):
        per image    2 n_region d n_proj  (projections, F1, F2)  + 2 n_region^2 d  (G of the regions, F4)
        per caption  2 n_word d n_proj    (projections, F1, F2)  + 2 n_word^2 d    (G of the words, F4)
        (a Gram term only for the direction whose context it is: Text-IMRAM's regions,
        Image-IMRAM's words).

Not counted: pointwise work and the per-pair dot products and norms outside matrix products
(cosines and l2norms, 2 m d each; the (F4) products and the norm of (4), 2 m n each): about 0.1%
of every form at d = 1024, 0.4% at d = 256.
A caption counts at its own length; a batched form pads captions to the longest of a block.
At n_region = 36, n_word uniform in 8..16, d = 1024, K = 3, Full IMRAM (the mean FLOPs per pair,
the once-per-image and once-per-caption work left out): original 1.219 GFLOP, plain 0.816, fast 0.213: fast does 5.72x
fewer FLOPs than the original code and 3.83x fewer than ``model.py`` (at d = 256: 5.01x and 3.40x).
By hand for n_word = 8, Text-IMRAM (m = 8, n = 36) + Image-IMRAM (m = 36, n = 8), d = 1024, K = 3:
original 3 (4 (8 x 36 + 36 x 8) d + 8 (8 + 36) d^2) = 1.114 GFLOP.

The memory update of the loop is a function it receives (``update``): by default ``gated_update``,
the PyTorch form above; ``export.graphs.onnx_update`` is the same update written for ONNX Runtime.

Layout: the tensors of one direction are context-major, (n_context_sets, n_query_sets, n_query,
n_context), a *context set* being the image or caption whose vectors are the context y_j and a
*query set* the caption or image whose vectors are the queries x_i (Text-IMRAM: (n_img, n_cap,
n_word, n_region)), so that per-context-set tensors (projections, Gram) broadcast over the query
sets in batched products without copies.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .fast_backward import GatedUpdate, L2Norm
from .model import EPS, IMRAM, IMRAMConfig, MemoryDistillation, attention_weights, l2norm, masked_mean, \
    mean_pooled_similarity, word_mask


# --------------------------------------------------------------------------- the MDU weights and the per-vector projections
def mdu_weights(mdu: MemoryDistillation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MDU's two layers as one: (W_x (2d, d), W_c (2d, d), b (2d,)), rows [2 W_o; W_g], columns
    [x^(k) | c^(k)].

    The update rows are doubled (F5): sigmoid(W [x^(k); c^(k)] + b) = [sigmoid(2 z_o) | g] with z_o the
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
    """(W (n_proj, d), b (n_proj,)) such that side "region"'s or "word"'s projections are v_j W^T + b
    or w_i W^T + b for its embeddings; n_proj = 2d per direction, directions in the order of
    ``weights``; None when ``weights`` is empty.

    Where this side is the context: W_c y + b (F1; the bias rides with the context, whose
    attention weights sum to 1); where it is the query: W_x x (F2). So regions give
    [text: W_c v + b | image: W_x v] and words [text: W_x w | image: W_c w + b].
    weights: ``direction_weights``.
    """
    if not weights:
        return None
    parts = [(w_c, b) if direction == CONTEXT_OF[side] else (w_x, torch.zeros_like(b))
             for direction, (w_x, w_c, b) in weights.items()]
    return torch.cat([weight for weight, _ in parts], 0), torch.cat([bias for _, bias in parts], 0)


def projections(model: IMRAM, embs: torch.Tensor, side: str, weights: dict | None = None) -> torch.Tensor | None:
    """(F1), (F2): the per-vector parts of the MDU pre-activations, once per region or word.

    side "region": region_embs (n_img, n_region, d); "word": word_embs (n_cap, n_word, d)
    -> (n_img, n_region, n_proj) or (n_cap, n_word, n_proj) (see ``projection_weights``), None
    when no update is made.
    weights: ``direction_weights`` (made here when None).
    """
    stacked = projection_weights(direction_weights(model) if weights is None else weights, side)
    return None if stacked is None else embs @ stacked[0].T + stacked[1]


def split_directions(proj: torch.Tensor | None, weights: dict) -> dict:
    """(..., n_proj) -> {direction: (..., 2d)}, views, in the order of ``weights``."""
    if proj is None:
        return {}
    width = proj.shape[-1] // len(weights)
    return {direction: proj[..., i * width:(i + 1) * width] for i, direction in enumerate(weights)}


# --------------------------------------------------------------------------- the step score (F4)
def attended_dot(attention: torch.Tensor, raw_scores: torch.Tensor) -> torch.Tensor:
    """(F4): <x_i, c_i^(k)> = sum_j alpha^(k)_ij <x_i, y_j>, from the STEP-1 raw scores.

    attention alpha^(k) (n_context_sets, n_query_sets, n_query, n_context); raw_scores s^(1), same
    shape -> (n_context_sets, n_query_sets, n_query).
    """
    return (attention * raw_scores).sum(-1)


def attended_sq_norm(attention: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """(F4): |c_i^(k)|^2 = alpha^(k)_i G (alpha^(k)_i)^T, with the Gram matrix G_jl = <y_j, y_l>.

    attention (n_context_sets, n_query_sets, n_query, n_context); gram (n_context_sets,
    n_context, n_context) -> (n_context_sets, n_query_sets, n_query).
    """
    n_context_sets, n_query_sets, n_query, n_context = attention.shape
    flat = attention.reshape(n_context_sets, n_query_sets * n_query, n_context)
    return ((flat @ gram) * flat).sum(-1).view(n_context_sets, n_query_sets, n_query)


# --------------------------------------------------------------------------- the memory update
_MINUS_ONE = torch.tensor(-1.0)


def new_memory(sig: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(7)-(9) before the l2norm, from the sigmoids: sig (..., 2d) = [sigmoid(2 z_o) | g], memory x^(k)
    (..., d) (broadcast) -> the new memory before its l2norm, u = o + g (x^(k) - o), o = tanh(z_o),
    (..., d)."""
    d = sig.shape[-1] // 2
    o = torch.add(_MINUS_ONE.to(sig), sig[..., :d], alpha=2)  # (F5), (7): o = tanh(z_o) = 2 sigmoid(2 z_o) - 1
    return torch.lerp(o, memory.to(o.dtype), sig[..., d:])  # (F6), (9): o + g (x - o) = g x + (1 - g) o


def normalize(memory: torch.Tensor) -> torch.Tensor:
    """``model.l2norm`` of the memory (9), through ``fast_backward.L2Norm`` (F9) when autograd records it."""
    return L2Norm.apply(memory) if torch.is_grad_enabled() and memory.requires_grad else l2norm(memory)


def gated_update(memory: torch.Tensor, attention: torch.Tensor, step: int, w_memory: torch.Tensor,
                 query_proj: torch.Tensor, context_proj: torch.Tensor) -> torch.Tensor:
    """The MDU (7)-(9) without the l2norm, for all pairs: the PyTorch form of the fast loop's update.

    step: k - 1, the loop's 0-based index of step k (0: step 1, where the memory is the query,
    x^(1) = x). memory x^(k) (n_context_sets, n_query_sets, n_query, d), or at step 1 the query x
    (n_query_sets, n_query, d) (or per pair, as memory); attention alpha^(k) (n_context_sets,
    n_query_sets, n_query, n_context); w_memory: W_x (2d, d) of ``mdu_weights``; query_proj = W_x x,
    shaped as the query with 2d last; context_proj (n_context_sets, n_context, 2d) = W_c y + b.
    Returns the new memory x^(k+1) before its l2norm (n_context_sets, n_query_sets, n_query, d).
    """
    n_context_sets, n_query_sets, n_query, n_context = attention.shape
    d, rows = context_proj.shape[-1] // 2, n_query_sets * n_query
    flat = attention.reshape(n_context_sets, rows, n_context)
    # pre = W_x x^(k)_i + W_c c^(k)_i + b, rows [2 z_o | z_g]: (n_context_sets, rows, 2d)
    if step == 0:  # step 1, (F2): x^(1) = x, so W_x x^(1)_i is the per-vector query_proj, for every context set
        pre = torch.baddbmm(query_proj.reshape(-1, rows, 2 * d), flat, context_proj)  # (F1): + alpha (W_c y + b)
    else:
        pre = (memory.reshape(-1, d) @ w_memory.T).view(n_context_sets, rows, 2 * d)  # W_x x^(k)_i
        if pre.requires_grad or not pre.dtype == flat.dtype == context_proj.dtype:  # autograd, or autocast
            pre = torch.baddbmm(pre, flat, context_proj)  # (F1): + sum_j alpha_ij (W_c y_j + b)
        else:
            pre = pre.baddbmm_(flat, context_proj)  # the same, in place
    pre = pre.view(n_context_sets, n_query_sets, n_query, 2 * d)
    if torch.is_grad_enabled() and (pre.requires_grad or memory.requires_grad):
        return GatedUpdate.apply(pre, memory)  # the same, with the derivatives (F8) of fast_backward
    return new_memory(pre.sigmoid_(), memory)  # [sigmoid(2 z_o) | g]  (F5), (8), in place


# --------------------------------------------------------------------------- iterative matching
def fast_recurrent_attention_memory(query: torch.Tensor, context: torch.Tensor, raw_scores: torch.Tensor,
                                    cfg: IMRAMConfig, query_mask: torch.Tensor | None = None,
                                    context_mask: torch.Tensor | None = None, mdu_parts: tuple | None = None,
                                    update=gated_update) -> torch.Tensor:
    """Step scores (10) of one direction for all pairs, exactly as ``model.recurrent_attention_memory``.

    query x (n_query_sets, n_query, d): the query vectors (captions' words for Text-IMRAM, images'
    regions for Image-IMRAM), or (n_context_sets, n_query_sets, n_query, d): a query of each pair's
    own (``zipped_scores``); context y (n_context_sets, n_context, d); raw_scores (n_context_sets,
    n_query_sets, n_query, n_context): the step-1 raw scores s^(1)_ij = <x_i, y_j> (3) of every pair.
    query_mask (n_query_sets, n_query) (or per pair, as query) / context_mask (n_context_sets,
    n_context): False on padding.
    mdu_parts: (w_memory, query_proj, context_proj), passed to ``update`` (None when K = 1);
    update: the memory update, ``gated_update`` or a function of the same signature.
    Returns (K, n_context_sets, n_query_sets).
    """
    n_context_sets, n_query_sets, n_query, n_context = raw_scores.shape
    d = query.shape[-1]
    qmask = None if query_mask is None or query_mask.dim() == 3 else query_mask[None]  # (1, n_query_sets, n_query)
    qmask = query_mask if qmask is None else qmask
    cmask = None if context_mask is None else context_mask[:, None]  # (n_context_sets, 1, n_context)
    gram = context @ context.transpose(1, 2)  # (F4): G_jl = <y_j, y_l>, (n_context_sets, n_context, n_context)
    query_norm = query.norm(dim=-1)  # |x_i|, (n_query_sets, n_query) (or per pair)

    raw_scores_k, memory, step_scores = raw_scores, query, []  # s^(1), x^(1) = x
    for k in range(1, cfg.n_steps + 1):  # step k: raw_scores_k is s^(k), memory is x^(k)
        attention = attention_weights(raw_scores_k, cfg, qmask, cmask)  # (4)-(5): alpha^(k), shaped as raw_scores
        dot = attended_dot(attention, raw_scores)  # (F4): <x_i, c_i^(k)> from the step-1 raw scores
        sq_norm = attended_sq_norm(attention, gram)  # (F4): |c_i^(k)|^2 = alpha_i G alpha_i^T
        cos = dot / (query_norm * sq_norm.clamp(min=0).sqrt()).clamp(min=EPS)  # cos(x_i, c_i^(k)), as model.cosine
        step_scores.append(masked_mean(cos, qmask))  # (10)
        if k == cfg.n_steps:
            break  # (F3): no update after the last step
        memory = update(memory, attention, k - 1, *mdu_parts)  # (7)-(9) without the l2norm: x^(k+1)
        last_update = k == cfg.n_steps - 1
        if not cfg.no_IMRAM_norm and not last_update:
            memory = normalize(memory)  # (9)
        raw_scores_k = (memory.reshape(n_context_sets, n_query_sets * n_query, d) @ context.transpose(1, 2)) \
            .view(raw_scores.shape)  # (3): s^(k+1)_ij = <x^(k+1)_i, y_j>
        if not cfg.no_IMRAM_norm and last_update:
            # (F7), (9): <x/(|x| + eps), y_j> = <x, y_j> / (|x| + eps), the l2norm of the last update
            raw_scores_k = raw_scores_k / (torch.linalg.vector_norm(memory, dim=-1, keepdim=True) + EPS)
    return torch.stack(step_scores)


def fast_step_scores(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                     region_proj: torch.Tensor | None = None, word_proj: torch.Tensor | None = None,
                     weights: dict | None = None, memory_weights: dict | None = None,
                     update=gated_update) -> dict:
    """{"text": (K, n_img, n_cap), "image": (K, n_img, n_cap)}, equal to ``IMRAM.step_scores``.

    region_embs (n_img, n_region, d); word_embs (n_cap, n_word, d); lengths (n_cap,);
    region_proj (n_img, n_region, n_proj) / word_proj (n_cap, n_word, n_proj): the ``projections``
    of exactly these regions and words (made here when None); weights: ``direction_weights`` (made
    here when None); memory_weights: {direction: W_x, the weights of the memory from step 2 on, in
    the form ``update`` takes} (default: W_x of ``weights``); update: see
    ``fast_recurrent_attention_memory``.
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
    w_memory = memory_weights or {direction: w[0] for direction, w in weights.items()}
    mask = word_mask(lengths, n_word, word_embs.device)  # (n_cap, n_word)
    # (3), (F4): the step-1 raw scores <v_j of an image, w_i of a caption>, computed once for both
    # directions: (n_img, n_region, n_cap, n_word)
    region_word_scores = (region_embs.reshape(n_img * n_region, d) @ word_embs.reshape(n_cap * n_word, d).T) \
        .view(n_img, n_region, n_cap, n_word)
    out = {}
    for direction in model.mdus():
        if direction == "text":  # words attend regions: context sets = images, query sets = captions
            parts = (w_memory["text"], word_parts["text"], region_parts["text"]) if weights else None
            out["text"] = fast_recurrent_attention_memory(
                word_embs, region_embs, region_word_scores.permute(0, 2, 3, 1), model.cfg,
                query_mask=mask, mdu_parts=parts, update=update)
        else:  # regions attend words: context sets = captions, query sets = images
            parts = (w_memory["image"], region_parts["image"], word_parts["image"]) if weights else None
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
    """F(image p, caption p) (11) for p = 0 .. n_pairs - 1: the pairs of a list, not all pairs; equal
    to the diagonal of ``IMRAM.similarity(region_embs, word_embs, lengths)``.

    region_embs (n_pairs, n_region, d), word_embs (n_pairs, n_word, d), lengths (n_pairs,) ->
    (n_pairs,). The same loop as all pairs, each pair its own context set with a query of its own
    (training scores the few pairs its loss depends on this way:
    ``imram_min.loss.support_loss``).
    """
    if model.cfg.mode == "mean":
        return mean_pooled_similarity(region_embs, word_embs, lengths).diagonal()
    weights = direction_weights(model)
    region_parts = split_directions(projections(model, region_embs, "region", weights), weights)  # (F1), (F2)
    word_parts = split_directions(projections(model, word_embs, "word", weights), weights)
    mask = word_mask(lengths, word_embs.shape[1], word_embs.device)  # (n_pairs, n_word)
    raw = region_embs @ word_embs.transpose(1, 2)  # (3): s^(1) of each pair, (n_pairs, n_region, n_word)
    total = 0
    for direction in model.mdus():
        if direction == "text":  # words attend regions: (n_pairs, 1, n_word, n_region)
            parts = (weights["text"][0], word_parts["text"][:, None], region_parts["text"]) if weights else None
            steps = fast_recurrent_attention_memory(word_embs[:, None], region_embs, raw.transpose(1, 2)[:, None],
                                                    model.cfg, query_mask=mask[:, None], mdu_parts=parts)
        else:  # regions attend words: (n_pairs, 1, n_region, n_word)
            parts = (weights["image"][0], region_parts["image"][:, None], word_parts["image"]) if weights else None
            steps = fast_recurrent_attention_memory(region_embs[:, None], word_embs, raw[:, None], model.cfg,
                                                    context_mask=mask, mdu_parts=parts)
        total = total + steps.sum(0)[:, 0]  # (11): sum over steps and directions
    return total


# --------------------------------------------------------------------------- the FLOP count
FLOP_FORMS = ("original", "plain", "fast")


def _directions(n_region: int, n_word: int, mode: str) -> list[tuple[int, int]]:
    """[(m query vectors, n context vectors)] of the mode's directions: Text-IMRAM, Image-IMRAM."""
    if mode not in ("full", "text", "image"):
        raise ValueError(f"FLOPs are counted for the IMRAM modes full, text, image, not {mode!r}")
    return ([(n_word, n_region)] if mode in ("full", "text") else []) + \
        ([(n_region, n_word)] if mode in ("full", "image") else [])


def flops_per_pair(form: str, n_region: int, n_word: int, d: int, n_steps: int, mode: str = "full") -> int:
    """FLOPs of the matrix products that score one pair, an image of n_region regions and a caption
    of n_word words, embedding size d, K = n_steps (the formulas: this file's docstring).

    form: "original" (the published code, ``imram_min.reference``: an update after every step),
    "plain" (``imram_min.model``) or "fast" (this file; its once-per-image and once-per-caption work is
    ``flops_per_item``).
    """
    K = n_steps
    if form not in FLOP_FORMS:
        raise ValueError(f"form must be one of {FLOP_FORMS}, got {form!r}")
    total = 2 * n_region * n_word * d if form == "fast" else 0  # (F4): step-1 raw scores, shared by both directions
    for m, n in _directions(n_region, n_word, mode):
        if form == "original":
            total += K * (2 * m * n * d + 2 * m * n * d) + K * 2 * (2 * m * (2 * d) * d)  # (3), (6); (7)-(8) K times
        elif form == "plain":
            total += K * (2 * m * n * d + 2 * m * n * d) + (K - 1) * 2 * (2 * m * (2 * d) * d)  # (F3): K - 1 updates
        else:
            total += (K * 2 * m * n * n  # (F4): alpha G
                      + (K - 1) * 2 * m * n * d  # (3) at steps 2..K
                      + (K - 1) * 2 * m * n * (2 * d)  # (F1): alpha (W_c y + b)
                      + max(K - 2, 0) * 2 * m * d * (2 * d))  # (F2): W_x x^(k) after the first update
    return total


def flops_per_item(form: str, n_region: int, n_word: int, d: int, n_steps: int,
                   mode: str = "full") -> tuple[int, int]:
    """(FLOPs per image, FLOPs per caption) of the matrix products made once per image or caption,
    whatever the number of pairs: for "fast" the projections (F1), (F2) (when K >= 2) and the Gram
    matrices of the context vectors (F4); 0 for "original" and "plain" (no such work)."""
    directions = _directions(n_region, n_word, mode)
    if form not in FLOP_FORMS:
        raise ValueError(f"form must be one of {FLOP_FORMS}, got {form!r}")
    if form != "fast":
        return 0, 0
    n_proj = 2 * d * len(directions) if n_steps >= 2 else 0  # (F1), (F2): 2d per direction
    per_image = 2 * n_region * d * n_proj \
        + (2 * n_region * n_region * d if mode in ("full", "text") else 0)  # (F4): G of the regions
    per_caption = 2 * n_word * d * n_proj \
        + (2 * n_word * n_word * d if mode in ("full", "image") else 0)  # (F4): G of the words
    return per_image, per_caption
