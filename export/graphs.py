"""The nn.Module graphs that ``export.onnx_export`` writes to ONNX, and the ONNX Runtime form of the fast matcher.

How each graph is made (all with the TorchScript exporter, ``torch.onnx.export(..., dynamo=False)``):

* The image encoder is the model's own ``ImageEncoder``.
* The text encoder is ``TextEncoderGraph``, an export-friendly equivalent of ``TextEncoder``
  built from its weights. The model packs the padded batch (pack_padded_sequence) so that the
  backward GRU direction starts at each caption's own last word. Here each direction is a plain
  unidirectional GRU: the forward one runs over the padded batch as is (a position only sees
  the words before it, so padding after the caption changes nothing), the backward one over
  each caption reversed *within its own length* (an index gather: position t reads word
  len-1-t, padding stays at the end), and its outputs are gathered back the same way.
  Positions past each length are set to exact zeros with a Where. No packed sequences, no
  sequence_lens, no Python-side use of the lengths: nothing of the example batch is baked in.
* The matcher is built by ``build_matcher``, THE one place that chooses the formulation:
  "plain" calls ``model.step_scores`` (the reference form), "fast" ``imram_min.fast.FastMatcher``
  with its weights as constants. The projection graphs (fast form only) are ``ProjectionGraph``s.
* The feature extractor is ``imram_min.data.features.GridFeatureExtractor``: EfficientNet-Lite0 with
  the packaged ImageNet weights, then the grid pooling as a MatMul with a constant matrix (equal to
  the adaptive average pooling of ``extract_features``, and exportable for any size and grid).
  Its input side is fixed (``size``); the batch is dynamic. Which size and grid: those recorded
  with the checkpoint's training data (``recorded_feature_settings``), else 128 px and 4 x 4.

The fast matcher's ONNX form (``OnnxFastMatcher``) is ``imram_min.fast``'s loop with two changes
that suit ONNX Runtime and change no score: its memory update is ``onnx_update`` (update and
gate halves as separate products, since ONNX Runtime copies every slice of a per-pair tensor;
a Tanh instead of (F5); o + g (x - o) instead of a lerp), and W_x, the weights of the memory from
step 2 on, are constants of the graph (``onnx_memory_weights``), which ONNX Runtime pre-packs for
its matrix products. Symbols: the table in ``imram_min.model``'s docstring; (F1)..(F7):
``imram_min.fast``'s.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from imram_min.fast import direction_weights, fast_step_scores, projection_weights
from imram_min.model import IMRAM, TextEncoder, l2norm, mean_pooled_similarity, word_mask

MATCHER_FORMS = ("plain", "fast")
DEFAULT_MATCHER = "fast"  # imram_min.fast: exact, 3.8x fewer FLOPs than model.py at d = 1024 (flops_per_pair)


class ImageEncoderGraph(nn.Module):
    """region_feats (n_img, n_region, img_dim) -> region_embs (n_img, n_region, d): the model's encoder."""

    def __init__(self, model: IMRAM):
        super().__init__()
        self.img_enc = model.img_enc

    def forward(self, region_feats: torch.Tensor) -> torch.Tensor:
        return self.img_enc(region_feats)


def _unidirectional_gru(rnn: nn.GRU, layer: int, reverse: bool) -> nn.GRU:
    """A one-layer, one-direction GRU holding a copy of one (layer, direction) of ``rnn``'s weights."""
    gru = nn.GRU(rnn.input_size if layer == 0 else rnn.hidden_size * (2 if rnn.bidirectional else 1),
                 rnn.hidden_size, num_layers=1, bias=rnn.bias, batch_first=True)
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if rnn.bias else [])
    with torch.no_grad():
        for name in names:
            getattr(gru, name + "_l0").copy_(getattr(rnn, name + suffix))
    return gru


class TextEncoderGraph(nn.Module):
    """tokens (n_cap, n_word) int64 + lengths (n_cap,) int64 -> word_embs (n_cap, n_word, d).

    Equal to ``TextEncoder`` (packed bi-GRU) for every length 1..n_word in the batch, with no
    packing: per layer a forward GRU over the padded batch and, if bidirectional, a backward
    GRU run forward over each caption reversed within its own length (``reverse_within_length``).
    Outputs are exact zeros past each length. Weights are copied from ``txt_enc``.
    """

    def __init__(self, txt_enc: TextEncoder):
        super().__init__()
        rnn = txt_enc.rnn
        if rnn.dropout and txt_enc.training:
            raise ValueError("export the text encoder in eval mode (GRU dropout)")
        self.bi_gru, self.no_txtnorm, self.embed_size = txt_enc.bi_gru, txt_enc.no_txtnorm, txt_enc.embed_size
        self.embed = txt_enc.embed
        self.forward_grus = nn.ModuleList(_unidirectional_gru(rnn, k, False) for k in range(rnn.num_layers))
        self.backward_grus = nn.ModuleList(_unidirectional_gru(rnn, k, True) for k in range(rnn.num_layers)) \
            if rnn.bidirectional else None

    @staticmethod
    def reverse_within_length(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (n_cap, n_word, c) -> x[b, index[b, t]]: with ``index`` from ``reversal_index`` each
        caption reversed within its length, padding left in place. Its own inverse."""
        return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = word_mask(lengths, tokens.shape[1], tokens.device)  # (n_cap, n_word)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]  # (1, n_word)
        lengths = lengths.to(tokens.device)[:, None]  # (n_cap, 1)
        index = torch.where(valid, lengths - 1 - positions, positions)  # len-1-t inside, t on padding
        hidden = self.embed(tokens)  # the word inputs e_i, (n_cap, n_word, word_dim); then each layer's output
        for layer, gru in enumerate(self.forward_grus):
            out, _ = gru(hidden)  # (n_cap, n_word, d)
            if self.backward_grus is not None:
                back, _ = self.backward_grus[layer](self.reverse_within_length(hidden, index))
                out = torch.cat([out, self.reverse_within_length(back, index)], -1)  # (n_cap, n_word, 2d)
            hidden = out
        if self.bi_gru:
            hidden = (hidden[..., : self.embed_size] + hidden[..., self.embed_size:]) / 2  # (GRU_fwd + GRU_bwd) / 2
        word_embs = hidden if self.no_txtnorm else l2norm(hidden)  # (2): w_i
        return torch.where(valid[..., None], word_embs, torch.zeros_like(word_embs))


class PlainMatcher(nn.Module):
    """(region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d), lengths (n_cap,)) -> pair scores
    F(I, T) (n_img, n_cap).

    ``model.similarity`` (the reference form) on the whole padded batch (padding is masked
    inside, so the result does not depend on it); "mean" mode: the baseline.
    """

    def __init__(self, model: IMRAM):
        super().__init__()
        self.model = model

    def forward(self, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.similarity(region_embs, word_embs, lengths)


class ProjectionGraph(nn.Module):
    """embs (n_img, n_region, d) or (n_cap, n_word, d) -> embs W^T + b, (n_img, n_region, n_proj) or
    (n_cap, n_word, n_proj): ``imram_min.fast.projections`` (F1), (F2), once per region or word, of one
    side ("region" or "word"), the weights made once, as graph constants; n_proj = ``projection_size``."""

    def __init__(self, model: IMRAM, side: str):
        super().__init__()
        with torch.no_grad():
            weight, bias = projection_weights(direction_weights(model), side)
        self.side, self.weight_t, self.bias = side, weight.T.contiguous(), bias.clone()

    def forward(self, embs: torch.Tensor) -> torch.Tensor:
        return embs @ self.weight_t + self.bias


def projection_size(model: IMRAM, form: str = DEFAULT_MATCHER) -> int:
    """n_proj, the width of the projection graphs' outputs (2d per direction, ``imram_min.fast.projections``;
    the manifest's and the index's ``projection_size``), 0 when there are none (the plain form, K = 1,
    the mean baseline)."""
    if form != "fast":
        return 0
    return 2 * model.cfg.embed_size * len(direction_weights(model))


# --------------------------------------------------------------------------- the fast matcher, ONNX Runtime form
def onnx_memory_weights(w_memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W_x (2d, d) of ``imram_min.fast.mdu_weights`` (the columns that multiply the memory x^(k),
    rows [2 W_o; W_g]) -> (its W_o part^T, its W_g part^T), (d, d) each, contiguous, the update rows'
    doubling (F5) undone (exact): the weights of the memory from step 2 on as ``onnx_update``
    multiplies by them."""
    d = w_memory.shape[1]
    return (w_memory[:d] * 0.5).T.contiguous(), w_memory[d:].T.contiguous()


def onnx_update(memory: torch.Tensor, attention: torch.Tensor, step: int, w_memory: tuple,
                query_proj: torch.Tensor, context_proj: torch.Tensor) -> torch.Tensor:
    """``imram_min.fast.gated_update`` as the ONNX graph computes it, same arguments and result,
    except w_memory: its ``onnx_memory_weights`` pair.

    ONNX Runtime copies every slice, so the update and gate halves are cut from the per-vector
    projections (per region or word: cheap), never from per-pair tensors; the doubling of the
    update rows is undone (exact) so that (7) is a Tanh; and (9) is o + g (x - o).
    """
    w_update, w_gate = w_memory  # (d, d) each, transposed: the W_o and W_g parts of W_x
    n_context_sets, n_query_sets, n_query, n_context = attention.shape
    d, rows = w_update.shape[0], n_query_sets * n_query
    flat = attention.reshape(n_context_sets, rows, n_context)
    pre = []
    for w_half, query_half, context_half in ((w_update, query_proj[..., :d] * 0.5 if step == 0 else None,
                                              context_proj[..., :d] * 0.5),
                                             (w_gate, query_proj[..., d:] if step == 0 else None, context_proj[..., d:])):
        # W_x x^(k)_i; at step 1 (step == 0) x^(1) = x and it is the per-vector query_proj (F2)
        memory_part = query_half.reshape(1, rows, d) if step == 0 else \
            (memory.reshape(-1, d) @ w_half).view(n_context_sets, rows, d)
        # + sum_j alpha_ij (W_c y_j + b) (F1)
        pre.append((flat @ context_half + memory_part).view(n_context_sets, n_query_sets, n_query, d))
    o, g = torch.tanh(pre[0]), torch.sigmoid(pre[1])  # (7), (8)
    return o + g * (memory - o)  # (9) before the l2norm: o + g (x - o) = g x + (1 - g) o


class OnnxFastMatcher(nn.Module):
    """(region_embs, word_embs, lengths[, region_proj, word_proj]) -> pair scores F(I, T) (n_img, n_cap):
    the fast matcher (``imram_min.fast.fast_step_scores``) with ``onnx_update`` and its weights as constants.

    region_embs (n_img, n_region, d); word_embs (n_cap, n_word, d); lengths (n_cap,);
    region_proj (n_img, n_region, n_proj) / word_proj (n_cap, n_word, n_proj): the ``ProjectionGraph``
    outputs (made here when None). The weights are derived once, detached.
    """

    def __init__(self, model: IMRAM):
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.weights = direction_weights(model)
            self.memory_weights = {direction: onnx_memory_weights(w[0]) for direction, w in self.weights.items()}

    def forward(self, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                region_proj: torch.Tensor | None = None, word_proj: torch.Tensor | None = None) -> torch.Tensor:
        if self.model.cfg.mode == "mean":
            return mean_pooled_similarity(region_embs, word_embs, lengths)
        steps = fast_step_scores(self.model, region_embs, word_embs, lengths, region_proj, word_proj,
                                 self.weights, self.memory_weights, update=onnx_update)
        return sum(s.sum(0) for s in steps.values())  # (11)


def build_matcher(model: IMRAM, form: str = DEFAULT_MATCHER) -> nn.Module:
    """THE one place that wraps the model's matcher for export: "plain" (model.py) or "fast" (fast.py)."""
    if form == "plain":
        return PlainMatcher(model)
    if form == "fast":
        return OnnxFastMatcher(model)
    raise ValueError(f"matcher form must be one of {MATCHER_FORMS}, got {form!r}")
