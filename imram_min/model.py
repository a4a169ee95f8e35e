"""IMRAM: Iterative Matching with Recurrent Attention Memory.

Chen, Ding, Liu, Lin, Liu and Han, CVPR 2020. The whole method in one file, top to bottom:

1. ``IMRAMConfig``: the hyper-parameters, with the defaults of the original code.
2. ``ImageEncoder``: precomputed region features -> region embeddings.
3. ``TextEncoder``: token ids -> word embeddings (bi-GRU, the two directions averaged).
4. ``attention_weights`` / ``attend``: the cross-modal attention unit (CAU).
5. ``MemoryDistillation``: the memory distillation unit (MDU).
6. ``recurrent_attention_memory``: K steps of CAU + MDU, one routine for both directions.
   Text-IMRAM is words attending regions, Image-IMRAM is regions attending words.
7. ``IMRAM``: encoders + memories + the pair score, for all image x caption pairs at once.
8. ``contrastive_loss``: the hinge triplet ranking loss (hardest negatives or summed).

Notation (paper, Sec. 3): an image is a set of regions v_1..v_n, a caption a set of words
w_1..w_m, both embedded in R^d. In one direction the *query* items attend over the *context*
items: for Text-IMRAM the query is the words and the context the regions; for Image-IMRAM
the other way round.

Shapes: ``n_img`` images with ``n_region`` regions, ``n_cap`` captions padded to
``n_word`` words, embedding size ``d``. Scores are always laid out ``(n_img, n_cap)``.

This file is the readable reference. ``imram_min.fast`` computes exactly the same scores
with less arithmetic, and the tests hold the two together.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

EPS = 1e-8  # the original adds it to every norm (l2norm, l1norm) and clamps cosines with it
RAW_FEATURE_NORMS = ("clipped_l2norm", "l2norm", "clipped_l1norm", "l1norm", "clipped", "no_norm", "softmax")
MODES = ("full", "text", "image", "mean")  # "mean" is the VSE-style baseline, not IMRAM


@dataclass
class IMRAMConfig:
    """Hyper-parameters. Defaults are those of the original code (Flickr30K / COCO runs)."""

    vocab_size: int = 10000
    img_dim: int = 2048  # size of a precomputed region feature
    word_dim: int = 300  # size of a word embedding fed to the GRU
    embed_size: int = 1024  # d, the joint embedding size
    num_layers: int = 1  # GRU layers
    bi_gru: bool = True  # bidirectional GRU, the two directions averaged
    img_encoder: str = "basic"  # "basic" (Linear) or "weight_norm" (weight-normalised Linear)
    no_imgnorm: bool = False  # skip the l2norm of region embeddings
    no_txtnorm: bool = False  # skip the l2norm of word embeddings
    raw_feature_norm: str = "clipped_l2norm"  # normalisation of raw attention over the query axis
    lambda_softmax: float = 9.0  # inverse temperature of the attention softmax
    mode: str = "full"  # "full" = Text-IMRAM + Image-IMRAM, "text", "image"; "mean" = baseline
    n_steps: int = 3  # K, matching steps
    no_IMRAM_norm: bool = False  # skip the l2norm of the memory after each update
    margin: float = 0.2  # of the ranking loss
    max_violation: bool = True  # hardest negatives (VSE++) instead of the sum over negatives

    def __post_init__(self):
        if self.raw_feature_norm not in RAW_FEATURE_NORMS:
            raise ValueError(f"raw_feature_norm must be one of {RAW_FEATURE_NORMS}, got {self.raw_feature_norm!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.img_encoder not in ("basic", "weight_norm"):
            raise ValueError(f"img_encoder must be 'basic' or 'weight_norm', got {self.img_encoder!r}")
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {self.n_steps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IMRAMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown IMRAMConfig fields: {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------- norms
def l2norm(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """x / (||x||_2 + eps), as the original (an all-zero row stays zero)."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def l1norm(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """x / (||x||_1 + eps)."""
    return x / (x.abs().sum(dim, keepdim=True) + eps)


def cosine(x1: torch.Tensor, x2: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """<x1, x2> / max(||x1|| ||x2||, eps), as the original's cosine_similarity."""
    return (x1 * x2).sum(dim) / (x1.norm(dim=dim) * x2.norm(dim=dim)).clamp(min=eps)


# --------------------------------------------------------------------------- encoders
class ImageEncoder(nn.Module):
    """Region features (n_img, n_region, img_dim) -> region embeddings (n_img, n_region, d).

    One linear layer, then l2norm per region (unless ``no_imgnorm``). With ``weight_norm``
    the weight is g * v / ||v||_F with a scalar g (weight_norm(..., dim=None) in the original;
    parameters ``fc.weight_g``, ``fc.weight_v``).
    """

    def __init__(self, img_dim: int, embed_size: int, kind: str = "basic", no_imgnorm: bool = False):
        super().__init__()
        self.kind, self.no_imgnorm = kind, no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        if kind == "basic":  # Xavier uniform, zero bias (the original's init_weights)
            r = (6.0 / (img_dim + embed_size)) ** 0.5
            nn.init.uniform_(self.fc.weight, -r, r)
            nn.init.zeros_(self.fc.bias)
        else:
            v = self.fc.weight.detach().clone()
            del self.fc.weight
            self.fc.weight_v = nn.Parameter(v)
            self.fc.weight_g = nn.Parameter(v.norm())

    def weight(self) -> torch.Tensor:
        if self.kind == "basic":
            return self.fc.weight
        return self.fc.weight_g * self.fc.weight_v / self.fc.weight_v.norm()

    def forward(self, region_feats: torch.Tensor) -> torch.Tensor:
        region_embs = F.linear(region_feats, self.weight(), self.fc.bias)
        return region_embs if self.no_imgnorm else l2norm(region_embs)


class TextEncoder(nn.Module):
    """Token ids (n_cap, n_word) + lengths (n_cap,) -> word embeddings (n_cap, n_word, d).

    Word embedding, GRU over the valid words only (packed, so padding enters neither
    direction and the backward direction starts at each caption's own last word), the two
    directions averaged, l2norm per word. Padded positions come out as exact zeros.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 bi_gru: bool = True, no_txtnorm: bool = False):
        super().__init__()
        self.bi_gru, self.no_txtnorm, self.embed_size = bi_gru, no_txtnorm, embed_size
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        if self.bi_gru:
            out = (out[..., : self.embed_size] + out[..., self.embed_size:]) / 2
        return out if self.no_txtnorm else l2norm(out)


# --------------------------------------------------------------------------- cross-modal attention unit
def attention_weights(sims: torch.Tensor, cfg: IMRAMConfig, query_mask: torch.Tensor | None = None,
                      context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each query item over the context items, from raw scores s_ij = <q_i, c_j>.

    sims: (..., n_query, n_context). query_mask (..., n_query) / context_mask (..., n_context):
    bool, False on padding. Two normalisations, as the original:
      1. over the *query* axis by ``cfg.raw_feature_norm``; ``clipped_l2norm`` is the paper's
         s_ij <- [s_ij]_+ / sqrt(sum_i [s_ij]_+^2), with LeakyReLU(0.1) as [.]_+ like the code.
         Padded query items take no part in it.
      2. a_ij = softmax_j(lambda * s_ij) over the *context* axis, padded context items excluded.
    Returns a: (..., n_query, n_context).
    """
    how = cfg.raw_feature_norm
    if query_mask is not None:
        sims = sims.masked_fill(~query_mask[..., :, None], 0.0)
    if context_mask is not None:
        # A padded context item's column is all zeros; its norm over the query axis would have an
        # infinite gradient (0/0 = NaN in training). Any non-zero filler will do: step 2 drops it.
        sims = sims.masked_fill(~context_mask[..., None, :], 1.0)
    if how.startswith("clipped"):
        sims = F.leaky_relu(sims, 0.1)
    if how in ("l2norm", "clipped_l2norm"):
        sims = l2norm(sims, dim=-2)
    elif how in ("l1norm", "clipped_l1norm"):
        sims = l1norm(sims, dim=-2)
    elif how == "softmax":
        if query_mask is not None:
            sims = sims.masked_fill(~query_mask[..., :, None], float("-inf"))
        sims = sims.softmax(-2)
    # "clipped" and "no_norm" stop here
    logits = cfg.lambda_softmax * sims
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask[..., None, :], float("-inf"))
    return logits.softmax(-1)


def attend(query: torch.Tensor, context: torch.Tensor, cfg: IMRAMConfig,
           query_mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
    """Cross-modal attention unit: each query item gathers the context items it matches.

    query: (..., n_query, d); context: (..., n_context, d) (leading dims broadcast).
    Returns attended (..., n_query, d), c_i = sum_j a_ij c_j, and the weights a (..., n_query, n_context).
    """
    weights = attention_weights(query @ context.transpose(-1, -2), cfg, query_mask, context_mask)
    return weights @ context, weights


# --------------------------------------------------------------------------- memory distillation unit
class MemoryDistillation(nn.Module):
    """Refines the query with what it attended (paper Sec. 3.2):

        o  = tanh(W_o [q; c] + b_o)        (``update``; original ``linear_t2i`` / ``linear_i2t``)
        g  = sigmoid(W_g [q; c] + b_g)     (``gate``;   original ``gate_t2i`` / ``gate_i2t``)
        q' = g * q + (1 - g) * o
    """

    def __init__(self, embed_size: int):
        super().__init__()
        self.update = nn.Linear(2 * embed_size, embed_size)
        self.gate = nn.Linear(2 * embed_size, embed_size)

    def forward(self, query: torch.Tensor, attended: torch.Tensor, return_gate: bool = False):
        query = query.expand_as(attended)
        qc = torch.cat([query, attended], -1)
        o = torch.tanh(self.update(qc))
        g = torch.sigmoid(self.gate(qc))
        new_query = g * query + (1 - g) * o
        return (new_query, g) if return_gate else new_query


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last axis, counting only mask==True items. x, mask: (..., n)."""
    if mask is None:
        return x.mean(-1)
    return torch.where(mask, x, torch.zeros_like(x)).sum(-1) / mask.sum(-1).to(x.dtype)


def recurrent_attention_memory(query: torch.Tensor, context: torch.Tensor, memory: MemoryDistillation,
                               cfg: IMRAMConfig, query_mask: torch.Tensor | None = None,
                               context_mask: torch.Tensor | None = None, trace: list | None = None) -> torch.Tensor:
    """K steps of attention and memory refinement; one routine for both directions.

    query: (..., n_query, d), context: (..., n_context, d), broadcast against each other
    (e.g. (1, n_cap, n_word, d) against (n_img, 1, n_region, d) scores all pairs).
    Returns step scores (n_steps, ...): F_k = mean_i cos(q_i, c_i^k), the cosine between the
    *original* query item and what it attended at step k, averaged over the valid query items.
    ``trace``, if a list, receives per step a dict with the attention weights and gate values.
    """
    q = query
    step_scores = []
    for k in range(cfg.n_steps):
        attended, weights = attend(q, context, cfg, query_mask, context_mask)
        step_scores.append(masked_mean(cosine(query, attended), query_mask))
        if k == cfg.n_steps - 1:
            if trace is not None:
                trace.append({"attention": weights, "gate": None})
            break  # the original also updates after the last step, but never uses the result
        q, gate = memory(q, attended, return_gate=True)
        if not cfg.no_IMRAM_norm:
            q = l2norm(q)
        if trace is not None:
            trace.append({"attention": weights, "gate": gate})
    return torch.stack(step_scores)


# --------------------------------------------------------------------------- the model
class IMRAM(nn.Module):
    """Encoders + the two recurrent attention memories.

    ``forward(region_feats, tokens, lengths)`` -> similarities (n_img, n_cap). Pair score
    F(I, T) = sum_k F_k(I, T) over the K steps, and over both directions for ``full``.
    """

    def __init__(self, cfg: IMRAMConfig):
        super().__init__()
        self.cfg = cfg
        self.img_enc = ImageEncoder(cfg.img_dim, cfg.embed_size, cfg.img_encoder, cfg.no_imgnorm)
        self.txt_enc = TextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_size, cfg.num_layers,
                                   cfg.bi_gru, cfg.no_txtnorm)
        # Text-IMRAM: words attend regions; Image-IMRAM: regions attend words.
        self.t2i = MemoryDistillation(cfg.embed_size) if cfg.mode in ("full", "text") else None
        self.i2t = MemoryDistillation(cfg.embed_size) if cfg.mode in ("full", "image") else None

    def encode_images(self, region_feats: torch.Tensor) -> torch.Tensor:
        """(n_img, n_region, img_dim) -> (n_img, n_region, d)."""
        return self.img_enc(region_feats)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(n_cap, n_word) int64 + (n_cap,) -> (n_cap, n_word, d), zeros past each length."""
        return self.txt_enc(tokens, lengths)

    def step_scores(self, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                    trace: dict | None = None) -> dict:
        """All pairs at once: {"t2i": (K, n_img, n_cap), "i2t": (K, n_img, n_cap)} (present directions).

        region_embs (n_img, n_region, d); word_embs (n_cap, n_word, d); lengths (n_cap,).
        """
        word_mask = torch.arange(word_embs.shape[1], device=word_embs.device) < lengths.to(word_embs.device)[:, None]
        regions = region_embs[:, None]  # (n_img, 1, n_region, d)
        words = word_embs[None]  # (1, n_cap, n_word, d)
        out = {}
        if self.t2i is not None:  # words attend regions
            t = [] if trace is not None else None
            out["t2i"] = recurrent_attention_memory(words, regions, self.t2i, self.cfg,
                                                    query_mask=word_mask[None], context_mask=None, trace=t)
            if trace is not None:
                trace["t2i"] = t
        if self.i2t is not None:  # regions attend words
            t = [] if trace is not None else None
            out["i2t"] = recurrent_attention_memory(regions, words, self.i2t, self.cfg,
                                                    query_mask=None, context_mask=word_mask[None], trace=t)
            if trace is not None:
                trace["i2t"] = t
        return out

    def block_similarity(self, region_embs: torch.Tensor, word_embs: torch.Tensor,
                         lengths: torch.Tensor) -> torch.Tensor:
        """Similarities (n_img, n_cap) of one block, all pairs at once: the sum over directions and
        steps of the step scores (or the mean-pooled baseline's cosine). Traceable for ONNX."""
        if self.cfg.mode == "mean":
            return mean_pooled_similarity(region_embs, word_embs, lengths)
        return sum(s.sum(0) for s in self.step_scores(region_embs, word_embs, lengths).values())

    def similarity(self, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                   max_pairs: int = 4096) -> torch.Tensor:
        """Similarities (n_img, n_cap) of embedded images and captions.

        Scores blocks of at most ``max_pairs`` image x caption pairs at a time so that the
        per-pair memory (block x n_region x d) stays bounded whatever the shard size.
        """
        if self.cfg.mode == "mean":
            return mean_pooled_similarity(region_embs, word_embs, lengths)
        n_img, n_cap = region_embs.shape[0], word_embs.shape[0]
        cap_block = max(1, min(n_cap, max_pairs))
        img_block = max(1, min(n_img, max_pairs // cap_block))
        rows = []
        for i in range(0, n_img, img_block):
            cols = []
            for j in range(0, n_cap, cap_block):
                n_word = int(lengths[j:j + cap_block].max())  # trim padding shared by the block
                cols.append(self.block_similarity(region_embs[i:i + img_block], word_embs[j:j + cap_block, :n_word],
                                                  lengths[j:j + cap_block]))
            rows.append(torch.cat(cols, 1))
        return torch.cat(rows, 0)

    def forward(self, region_feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.similarity(self.encode_images(region_feats), self.encode_captions(tokens, lengths), lengths)


def mean_pooled_similarity(region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The VSE-style baseline: cosine of the mean region embedding and the mean word embedding."""
    word_mask = torch.arange(word_embs.shape[1], device=word_embs.device) < lengths.to(word_embs.device)[:, None]
    image = l2norm(region_embs.mean(1))
    caption = l2norm((word_embs * word_mask[..., None]).sum(1) / lengths.to(word_embs)[:, None])
    return image @ caption.T


# --------------------------------------------------------------------------- loss
def contrastive_loss(sims: torch.Tensor, margin: float = 0.2, max_violation: bool = True) -> torch.Tensor:
    """Hinge triplet ranking loss on a batch of matching pairs (the diagonal of ``sims``).

    sims: (n, n), sims[i, j] = F(image i, caption j). Caption retrieval (per image, over
    captions) and image retrieval (per caption, over images); with ``max_violation`` only
    the hardest negative counts (VSE++), else all negatives are summed.
    """
    positive = sims.diag()
    cost_cap = (margin + sims - positive[:, None]).clamp(min=0)  # image i vs wrong captions
    cost_img = (margin + sims - positive[None, :]).clamp(min=0)  # caption j vs wrong images
    eye = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    cost_cap = cost_cap.masked_fill(eye, 0)
    cost_img = cost_img.masked_fill(eye, 0)
    if max_violation:
        return cost_cap.max(1).values.sum() + cost_img.max(0).values.sum()
    return cost_cap.sum() + cost_img.sum()
