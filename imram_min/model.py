"""IMRAM: Iterative Matching with Recurrent Attention Memory.

Chen, Ding, Liu, Lin, Liu and Han, CVPR 2020. The whole method in one file, top to bottom:

1. ``IMRAMConfig``: the hyper-parameters, with the defaults of the original code.
2. ``ImageEncoder``, ``TextEncoder``: the feature representation (paper Sec. 3.1).
3. ``attention_weights`` / ``attend``: the cross-modal attention unit, CAU (Sec. 3.2).
4. ``MemoryDistillation``: the memory distillation unit, MDU (Sec. 3.2).
5. ``recurrent_attention_memory``: K steps of CAU + MDU, the iterative matching (Sec. 3.3); one
   routine for both directions: Text-IMRAM ("text": words attend regions) and Image-IMRAM
   ("image": regions attend words).
6. ``IMRAM``: encoders + the two MDUs + the pair score, for all image x caption pairs at once.
7. The loss, (12) below (Sec. 3.4): ``imram_min.loss``, read next (``contrastive_loss``, and the
   form training runs, which scores only the pairs the loss depends on).

Symbols, used the same way in notebook 02, ``imram_min.loss``, ``imram_min.fast`` and
``imram_min.reference`` (right: the name in the code):

    I, T             an image, a caption
    f_j              precomputed feature of region j                    region_feats (n_img, n_region, img_dim)
    v_j              region embedding, j = 1..n_region, in R^d          region_embs (n_img, n_region, d)
    e_i              input vector of word i (a learned embedding)       word_inputs = txt_enc.embed(tokens)
    w_i              word embedding, i = 1..n_word, in R^d              word_embs (n_cap, n_word, d)
    d                the joint embedding size                           cfg.embed_size
    x_i, i = 1..m    the query vectors of one direction                 query (..., n_query, d)
    y_j, j = 1..n    the context vectors of that direction              context (..., n_context, d)
                     Text-IMRAM ("text"): x = the words w, y = the regions v
                     Image-IMRAM ("image"): x = the regions v, y = the words w
    k = 1..K         matching step; K steps                             cfg.n_steps
    x_i^(k)          the memory: x_i after k - 1 updates; x_i^(1) = x_i memory
    s_ij, s'_ij      raw score of x_i^(k) and y_j; normalised over i    raw_scores
    alpha_ij         attention weight of y_j for x_i^(k)                attention (..., n_query, n_context)
    lambda           inverse temperature of the attention softmax       cfg.lambda_softmax
    c_i^(k)          the context attended by x_i^(k)                    attended (..., n_query, d)
    o_i, g_i         the MDU's candidate and gate; W_o, b_o, W_g, b_g   MemoryDistillation.update, .gate
    W_x, W_c         the columns of the MDU's weights that multiply     fast.mdu_weights
                     x_i^(k) and c_i^(k) ([x_i^(k); c_i^(k)] is 2d wide)
    G_jl             Gram matrix of the context vectors, <y_j, y_l>     gram (in ``imram_min.fast``)
    F_k(I, T)        step score; F(I, T) the pair score                 step_scores; similarity (n_img, n_cap)
    Delta            the margin of the loss                             cfg.margin
    T^, I^           the hardest negative caption of I, image of T
    B; F(i, j)       in the loss only (``imram_min.loss``): a batch of B matching pairs, image i with
                     caption i; F(i, j) = F(image i, caption j), so there i, j index images and
                     captions, not query and context vectors

The labels (1)..(12) are this file's, not the paper's equation numbers; ``imram_min.fast``
refers to them.

    (1)  v_j = l2norm(W_v f_j + b_v)                     region features -> embeddings       Sec. 3.1
    (2)  w_i = l2norm((GRU_fwd(e)_i + GRU_bwd(e)_i) / 2) word vectors -> embeddings          Sec. 3.1
    CAU, at step k:                                                                          Sec. 3.2
    (3)  s_ij = <x_i^(k), y_j>                           raw scores
    (4)  s'_ij = [s_ij]_+ / sqrt(sum_i [s_ij]_+^2)       clipped l2 normalisation over the QUERY axis i
    (5)  alpha_ij = softmax_j(lambda s'_ij)              attention over the context axis j
    (6)  c_i^(k) = sum_j alpha_ij y_j                    what the memory attended
    MDU:                                                                                     Sec. 3.2
    (7)  o_i = tanh(W_o [x_i^(k); c_i^(k)] + b_o)        the candidate
    (8)  g_i = sigmoid(W_g [x_i^(k); c_i^(k)] + b_g)     the gate
    (9)  x_i^(k+1) = l2norm(g_i * x_i^(k) + (1 - g_i) * o_i)   the memory update
    Iterative matching:                                                                      Sec. 3.3
    (10) F_k(I, T) = (1/m) sum_i cos(x_i, c_i^(k))       the ORIGINAL query against what the
                                                         memory attended at step k
    (11) F(I, T) = sum_{k=1..K} F_k(I, T)                Text- or Image-IMRAM;
                                                         Full IMRAM: F_text + F_image
    Loss:                                                                                    Sec. 3.4
    (12) L = sum_{(I,T)} [Delta - F(I,T) + F(I,T^)]_+ + [Delta - F(I,T) + F(I^,T)]_+
         over the matching pairs of a batch, T^ and I^ the hardest negatives in the batch
         (or the sum over all negatives): ``imram_min.loss``

Shapes: ``n_img`` images with ``n_region`` regions, ``n_cap`` captions padded to ``n_word``
words, embedding size ``d``. Pair scores are always laid out ``(n_img, n_cap)``.

This file is the readable reference. ``imram_min.fast`` computes exactly the same scores with
less arithmetic, and the tests hold the two together, and both to the paper's per-caption loop
(``imram_min.reference``, float64).
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


# --------------------------------------------------------------------------- feature representation (Sec. 3.1)
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
        region_embs = F.linear(region_feats, self.weight(), self.fc.bias)  # W_v f_j + b_v
        return region_embs if self.no_imgnorm else l2norm(region_embs)  # (1)


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
        word_inputs = self.embed(tokens)  # e_i: (n_cap, n_word, word_dim)
        packed = pack_padded_sequence(word_inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        if self.bi_gru:
            out = (out[..., : self.embed_size] + out[..., self.embed_size:]) / 2  # (GRU_fwd + GRU_bwd) / 2
        return out if self.no_txtnorm else l2norm(out)  # (2)


def word_mask(lengths: torch.Tensor, n_word: int, device: torch.device | None = None) -> torch.Tensor:
    """(n_cap, n_word) bool, True at the valid words of each caption: position < length.

    lengths (n_cap,) int. THE one definition of the mask (model, fast, export, tiling and the
    mean baseline use it). Traceable: ``n_word`` may be a traced size.
    """
    device = lengths.device if device is None else device
    return torch.arange(n_word, device=device)[None, :] < lengths.to(device)[:, None]


# --------------------------------------------------------------------------- cross-modal attention unit (Sec. 3.2)
def attention_weights(raw_scores: torch.Tensor, cfg: IMRAMConfig, query_mask: torch.Tensor | None = None,
                      context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """alpha_ij of (4)-(5) from the raw scores s_ij = <x_i^(k), y_j> of (3).

    raw_scores (..., n_query, n_context); query_mask (..., n_query) / context_mask
    (..., n_context): bool, False on padding. Returns alpha (..., n_query, n_context).
    ``cfg.raw_feature_norm`` picks the normalisation over the query axis; ``clipped_l2norm`` is
    the paper's (4), with LeakyReLU(0.1) as [.]_+ like the original code. Padded query vectors take
    no part in it; padded context vectors get no attention.
    """
    s, how = raw_scores, cfg.raw_feature_norm
    if query_mask is not None:
        s = s.masked_fill(~query_mask[..., :, None], 0.0)
    if context_mask is not None:
        # A padded context vector's column is all zeros; its norm over the query axis would have an
        # infinite gradient (0/0 = NaN in training). Any non-zero filler will do: (5) drops it.
        s = s.masked_fill(~context_mask[..., None, :], 1.0)
    if how.startswith("clipped"):
        s = F.leaky_relu(s, 0.1)  # [s_ij]_+
    if how in ("l2norm", "clipped_l2norm"):
        s = l2norm(s, dim=-2)  # (4): s'_ij = s_ij / sqrt(sum_i s_ij^2), over the query axis i
    elif how in ("l1norm", "clipped_l1norm"):
        s = l1norm(s, dim=-2)  # s'_ij = s_ij / sum_i |s_ij|
    elif how == "softmax":
        if query_mask is not None:
            s = s.masked_fill(~query_mask[..., :, None], float("-inf"))
        s = s.softmax(-2)  # softmax_i(s_ij)
    # "clipped" and "no_norm" stop here
    logits = cfg.lambda_softmax * s  # lambda s'_ij
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask[..., None, :], float("-inf"))
    return logits.softmax(-1)  # (5): alpha_ij = softmax_j(lambda s'_ij)


def attend(memory: torch.Tensor, context: torch.Tensor, cfg: IMRAMConfig,
           query_mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
    """The CAU: each memory vector x_i^(k) gathers the context vectors y_j it matches, (3)-(6).

    memory (..., n_query, d); context (..., n_context, d) (leading dims broadcast).
    Returns (attended c^(k) (..., n_query, d), attention alpha (..., n_query, n_context)).
    """
    raw_scores = memory @ context.transpose(-1, -2)  # (3): s_ij = <x_i^(k), y_j>
    attention = attention_weights(raw_scores, cfg, query_mask, context_mask)  # (4)-(5)
    return attention @ context, attention  # (6): c_i^(k) = sum_j alpha_ij y_j


# --------------------------------------------------------------------------- memory distillation unit (Sec. 3.2)
class MemoryDistillation(nn.Module):
    """The MDU, (7)-(9): refines the memory x^(k) with what it attended, c^(k).

    Parameters ``update`` (W_o, b_o; the original's ``linear_t2i`` / ``linear_i2t``) and ``gate``
    (W_g, b_g; the original's ``gate_t2i`` / ``gate_i2t``), each a Linear (2d -> d).
    """

    def __init__(self, embed_size: int):
        super().__init__()
        self.update = nn.Linear(2 * embed_size, embed_size)
        self.gate = nn.Linear(2 * embed_size, embed_size)

    def forward(self, memory: torch.Tensor, attended: torch.Tensor, return_gate: bool = False,
                normalize: bool = True):
        """memory x^(k) (..., n_query, d) (broadcast to attended's shape), attended c^(k) (..., n_query, d)
        -> new memory x^(k+1) (..., n_query, d) [, gate g (..., n_query, d)]. normalize False: (9)
        without its l2norm (``cfg.no_IMRAM_norm``)."""
        memory = memory.expand_as(attended)
        xc = torch.cat([memory, attended], -1)  # [x_i^(k); c_i^(k)]
        o = torch.tanh(self.update(xc))  # (7): o_i = tanh(W_o [x_i^(k); c_i^(k)] + b_o)
        g = torch.sigmoid(self.gate(xc))  # (8): g_i = sigmoid(W_g [x_i^(k); c_i^(k)] + b_g)
        new_memory = g * memory + (1 - g) * o  # (9): g_i * x_i^(k) + (1 - g_i) * o_i
        if normalize:
            new_memory = l2norm(new_memory)  # (9): then the l2norm
        return (new_memory, g) if return_gate else new_memory


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last axis, counting only the entries where mask is True. x, mask: (..., n)."""
    if mask is None:
        return x.mean(-1)
    return torch.where(mask, x, torch.zeros_like(x)).sum(-1) / mask.sum(-1).to(x.dtype)


# --------------------------------------------------------------------------- iterative matching (Sec. 3.3)
def recurrent_attention_memory(query: torch.Tensor, context: torch.Tensor, mdu: MemoryDistillation,
                               cfg: IMRAMConfig, query_mask: torch.Tensor | None = None,
                               context_mask: torch.Tensor | None = None, trace: list | None = None) -> torch.Tensor:
    """Step scores F_1..F_K of (10), K = ``cfg.n_steps``: one routine for both directions.

    query (..., n_query, d), context (..., n_context, d), broadcast against each other (e.g.
    (1, n_cap, n_word, d) against (n_img, 1, n_region, d) scores all pairs); mdu: this
    direction's MemoryDistillation; query_mask (..., n_query) / context_mask (..., n_context).
    Returns (K, ...), e.g. (K, n_img, n_cap). ``trace``, if a list, receives per step a dict
    {"attention": alpha (..., n_query, n_context), "gate": g (..., n_query, d) or None at the last step}.
    """
    memory = query  # x^(1) = x at step 1
    step_scores = []
    for k in range(1, cfg.n_steps + 1):  # step k: the memory is x^(k)
        attended, attention = attend(memory, context, cfg, query_mask, context_mask)  # (3)-(6): c^(k), alpha
        step_scores.append(masked_mean(cosine(query, attended), query_mask))  # (10): the ORIGINAL query x_i
        if k == cfg.n_steps:
            if trace is not None:
                trace.append({"attention": attention, "gate": None})
            break  # the original also updates after the last step, but never uses the result
        memory, gate = mdu(memory, attended, return_gate=True, normalize=not cfg.no_IMRAM_norm)  # (7)-(9): x^(k+1)
        if trace is not None:
            trace.append({"attention": attention, "gate": gate})
    return torch.stack(step_scores)


# --------------------------------------------------------------------------- the model
class IMRAM(nn.Module):
    """Encoders + the two MDUs: ``forward(region_feats, tokens, lengths)`` -> pair scores (n_img, n_cap).

    ``text_mdu``: Text-IMRAM's MDU (words attend regions), present in modes "full" and "text";
    ``image_mdu``: Image-IMRAM's (regions attend words), in "full" and "image".
    """

    def __init__(self, cfg: IMRAMConfig):
        super().__init__()
        self.cfg = cfg
        self.img_enc = ImageEncoder(cfg.img_dim, cfg.embed_size, cfg.img_encoder, cfg.no_imgnorm)
        self.txt_enc = TextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_size, cfg.num_layers,
                                   cfg.bi_gru, cfg.no_txtnorm)
        self.text_mdu = MemoryDistillation(cfg.embed_size) if cfg.mode in ("full", "text") else None
        self.image_mdu = MemoryDistillation(cfg.embed_size) if cfg.mode in ("full", "image") else None

    def mdus(self) -> dict:
        """{"text": text_mdu, "image": image_mdu}, the directions of the model's mode (empty for "mean")."""
        return {name: mdu for name, mdu in (("text", self.text_mdu), ("image", self.image_mdu)) if mdu is not None}

    def encode_images(self, region_feats: torch.Tensor) -> torch.Tensor:
        """(1): (n_img, n_region, img_dim) -> region_embs (n_img, n_region, d)."""
        return self.img_enc(region_feats)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(2): (n_cap, n_word) int64 + lengths (n_cap,) -> word_embs (n_cap, n_word, d), zeros past each length."""
        return self.txt_enc(tokens, lengths)

    def step_scores(self, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                    trace: dict | None = None) -> dict:
        """F_k of (10) for all pairs at once: {"text": (K, n_img, n_cap), "image": (K, n_img, n_cap)}
        (the directions of the model's mode).

        region_embs (n_img, n_region, d); word_embs (n_cap, n_word, d); lengths (n_cap,).
        ``trace``, if a dict, receives {direction: the per-step list of ``recurrent_attention_memory``}.
        """
        mask = word_mask(lengths, word_embs.shape[1], word_embs.device)[None]  # (1, n_cap, n_word)
        regions = region_embs[:, None]  # (n_img, 1, n_region, d)
        words = word_embs[None]  # (1, n_cap, n_word, d)
        out = {}
        for direction, mdu in self.mdus().items():
            steps = [] if trace is not None else None
            if direction == "text":  # Text-IMRAM: words attend regions
                out["text"] = recurrent_attention_memory(words, regions, mdu, self.cfg, query_mask=mask, trace=steps)
            else:  # Image-IMRAM: regions attend words
                out["image"] = recurrent_attention_memory(regions, words, mdu, self.cfg, context_mask=mask,
                                                          trace=steps)
            if trace is not None:
                trace[direction] = steps
        return out

    def similarity(self, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pair scores F(I, T) of (11), all pairs at once: (n_img, n_cap).

        region_embs (n_img, n_region, d); word_embs (n_cap, n_word, d); lengths (n_cap,). The
        sum of the step scores over steps and directions (mode "mean": the baseline). Memory grows
        with n_img x n_cap x max(n_region, n_word) x d: for many pairs, ``imram_min.engineering.tiling``
        scores blocks. Traceable for ONNX.
        """
        if self.cfg.mode == "mean":
            return mean_pooled_similarity(region_embs, word_embs, lengths)
        return sum(steps.sum(0) for steps in self.step_scores(region_embs, word_embs, lengths).values())

    def forward(self, region_feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """region_feats (n_img, n_region, img_dim), tokens (n_cap, n_word), lengths (n_cap,) -> (n_img, n_cap)."""
        return self.similarity(self.encode_images(region_feats), self.encode_captions(tokens, lengths), lengths)


def mean_pooled_similarity(region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The VSE-style baseline (mode "mean", not IMRAM): cos(mean_j v_j, mean_i w_i) -> (n_img, n_cap).

    region_embs (n_img, n_region, d); word_embs (n_cap, n_word, d); lengths (n_cap,).
    """
    mask = word_mask(lengths, word_embs.shape[1], word_embs.device)  # (n_cap, n_word)
    image = l2norm(region_embs.mean(1))  # (n_img, d)
    caption = l2norm((word_embs * mask[..., None]).sum(1) / lengths.to(word_embs)[:, None])  # (n_cap, d)
    return image @ caption.T
