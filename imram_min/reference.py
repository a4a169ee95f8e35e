"""The paper's per-caption loop: IMRAM written from the equations and the original code's behaviour.

The shortest complete statement of IMRAM in this repository, and the one copy of the original
way of scoring: read it beside ``imram_min.model`` (same symbols: its docstring's table). The
tests hold ``imram_min.model`` and ``imram_min.fast`` against it (in float64); the benchmarks
time it as the speed baseline (in the inputs' float32, on the CPU or CUDA). It shares no code
with the rest of the package: it only *reads* parameters from an ``IMRAM`` module and its
``cfg`` attributes. As the original evaluation: one caption at a time, sliced to its length (so
there is no padding and no mask anywhere), against every image of the shard; the memory update
runs after the last step too (its result unused: ``imram_min.fast.flops_per_pair`` counts it as
the "original" form).

Semantics (Chen et al., CVPR 2020, and the published code):

* l2norm(x) = x / (||x||_2 + 1e-8); l1norm(x) = x / (||x||_1 + 1e-8);
  cosine(a, b) = <a, b> / max(||a|| ||b||, 1e-8).
* attend(memory x^(k) (n_q, d), context y (n_c, d)): raw = y @ x^T (n_c, n_q), normalised
  over the query axis by ``raw_feature_norm``, transposed to (n_q, n_c), softmax over the
  context axis of lambda_softmax * that: alpha; attended c = alpha @ y.
* memory distillation: o = tanh(W_o [x; c] + b_o), g = sigmoid(W_g [x; c] + b_g),
  x^(k+1) = g * x^(k) + (1 - g) * o, then its l2norm unless ``no_IMRAM_norm``.
* Text-IMRAM: words attend regions; Image-IMRAM: regions attend words. Step score
  F_k = mean over the query vectors of cosine(original query vector x_i, attended at step k).
  Pair score F = sum over steps (and over both directions for mode "full").
"""
from __future__ import annotations

import torch
import torch.nn as nn

EPS = 1e-8
DT = torch.float64


# --------------------------------------------------------------------------- elementary functions
def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / (torch.sqrt((x * x).sum(dim, keepdim=True)) + EPS)


def l1norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / (x.abs().sum(dim, keepdim=True) + EPS)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two (n, d) matrices -> (n,)."""
    dot = (a * b).sum(-1)
    na = torch.sqrt((a * a).sum(-1))
    nb = torch.sqrt((b * b).sum(-1))
    return dot / torch.clamp(na * nb, min=EPS)


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(x, dim)


def leaky_relu(x: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    return torch.nn.functional.leaky_relu(x, slope)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


# --------------------------------------------------------------------------- cross-modal attention
def normalise_raw(raw: torch.Tensor, how: str) -> torch.Tensor:
    """raw (..., n_c, n_q), normalised over the query axis (the last)."""
    if how == "softmax":
        return softmax(raw, dim=-1)
    if how == "l2norm":
        return l2norm(raw, dim=-1)
    if how == "clipped_l2norm":
        return l2norm(leaky_relu(raw), dim=-1)
    if how == "l1norm":
        return l1norm(raw, dim=-1)
    if how == "clipped_l1norm":
        return l1norm(leaky_relu(raw), dim=-1)
    if how == "clipped":
        return leaky_relu(raw)
    if how == "no_norm":
        return raw
    raise ValueError(f"unknown raw_feature_norm {how!r}")


def attend(memory: torch.Tensor, context: torch.Tensor, how: str, lambda_softmax: float) -> torch.Tensor:
    """The CAU: memory x^(k) (..., n_q, d), context y (..., n_c, d) -> attended c^(k) (..., n_q, d), pair by pair."""
    raw = context @ memory.transpose(-1, -2)  # s_ij, transposed: (..., n_c, n_q)
    norm = normalise_raw(raw, how).transpose(-1, -2)  # s'_ij: (..., n_q, n_c)
    alpha = softmax(lambda_softmax * norm, dim=-1)
    return alpha @ context


# --------------------------------------------------------------------------- weights read off a module
class Weights:
    """Every parameter of an IMRAM module, plus the config values used.

    dtype: copies of the parameters in that dtype, constants for autograd (the tests: float64);
    None: the module's own parameters, so that a loss backpropagates into them (the training
    benchmark's original step).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = DT):
        cfg = model.cfg
        self.cfg, self.dtype = cfg, dtype
        self.mode = cfg.mode
        self.n_steps = cfg.n_steps
        self.raw_feature_norm = cfg.raw_feature_norm
        self.lambda_softmax = float(cfg.lambda_softmax)
        self.no_IMRAM_norm = cfg.no_IMRAM_norm
        self.no_imgnorm = cfg.no_imgnorm
        self.no_txtnorm = cfg.no_txtnorm
        self.bi_gru = cfg.bi_gru
        self.embed_size = cfg.embed_size

        self._gru = None
        self.params = params = {name: p if dtype is None else p.detach().to(dtype).clone()
                                for name, p in model.named_parameters()}
        self.mdu = {}
        for direction in ("text", "image"):  # {"text": Text-IMRAM's MDU, "image": Image-IMRAM's}
            prefix = f"{direction}_mdu"
            if f"{prefix}.update.weight" in params:
                self.mdu[direction] = (params[f"{prefix}.update.weight"], params[f"{prefix}.update.bias"],
                                       params[f"{prefix}.gate.weight"], params[f"{prefix}.gate.bias"])

    def image_encoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (d, img_dim), b (d,)) of the image encoder."""
        params = self.params
        if self.cfg.img_encoder == "basic":
            return params["img_enc.fc.weight"], params["img_enc.fc.bias"]
        v, g = params["img_enc.fc.weight_v"], params["img_enc.fc.weight_g"]  # weight_norm(dim=None): W = g v / ||v||_F
        return g * v / torch.sqrt((v * v).sum()), params["img_enc.fc.bias"]

    def gru(self) -> nn.GRU:
        """A fresh nn.GRU of the module's shape carrying its GRU weights (float64), made once."""
        if self._gru is None:
            cfg = self.cfg
            self._gru = nn.GRU(cfg.word_dim, cfg.embed_size, cfg.num_layers, batch_first=True,
                               bidirectional=cfg.bi_gru).to(DT)
            self._gru.load_state_dict({k[len("txt_enc.rnn."):]: v.to(DT) for k, v in self.params.items()
                                       if k.startswith("txt_enc.rnn.")})
        return self._gru


def memory_distillation(x: torch.Tensor, c: torch.Tensor, mdu, no_IMRAM_norm: bool) -> torch.Tensor:
    """The MDU: memory x^(k) (..., n_q, d), attended context c^(k) (..., n_q, d) -> the new memory
    x^(k+1) (..., n_q, d)."""
    W_o, b_o, W_g, b_g = mdu
    xc = torch.cat([x, c], dim=-1)
    o = torch.tanh(xc @ W_o.T + b_o)
    g = sigmoid(xc @ W_g.T + b_g)
    new_memory = g * x + (1 - g) * o
    return new_memory if no_IMRAM_norm else l2norm(new_memory)


# --------------------------------------------------------------------------- encoders
def encode_image(w: Weights, feats: torch.Tensor) -> torch.Tensor:
    """One image: (n_region, img_dim) -> (n_region, d)."""
    W, b = w.image_encoder()
    emb = feats.to(DT) @ W.to(DT).T + b.to(DT)
    return emb if w.no_imgnorm else l2norm(emb)


def encode_caption(w: Weights, tokens: torch.Tensor) -> torch.Tensor:
    """One caption, its valid tokens only: (n_word,) -> (n_word, d). GRU on a batch of one."""
    x = w.params["txt_enc.embed.weight"].to(DT)[tokens][None]  # (1, n_word, word_dim)
    with torch.no_grad():
        out, _ = w.gru()(x)
    out = out[0]
    if w.bi_gru:
        d = w.embed_size
        out = (out[:, :d] + out[:, d:]) / 2
    return out if w.no_txtnorm else l2norm(out)


# --------------------------------------------------------------------------- one direction, pairs side by side
def imram_steps(w: Weights, query: torch.Tensor, context: torch.Tensor, mdu) -> list[torch.Tensor]:
    """Recurrent attention memory of one direction.

    query x (..., n_q, d), context y (..., n_c, d): pairs side by side on the leading axes.
    Returns [F_1..F_K], each (...): F_k = mean over the query vectors of cos(x_i, c_i^(k)).
    """
    memory = query  # x^(1) = x
    scores = []
    for _ in range(w.n_steps):
        attended = attend(memory, context, w.raw_feature_norm, w.lambda_softmax)
        scores.append(cosine(query, attended).mean(-1))  # the original query x_i
        memory = memory_distillation(memory, attended, mdu, w.no_IMRAM_norm)  # as the original: every step
    return scores


def pair_step_scores(w: Weights, regions: torch.Tensor, words: torch.Tensor) -> dict:
    """One image (n_region, d) and one caption (n_word, d), no padding -> {direction: [F_k] (0-d each)}."""
    regions, words = regions.to(w.dtype or regions.dtype), words.to(w.dtype or words.dtype)
    out = {}
    if w.mode in ("full", "text"):  # Text-IMRAM: words attend regions
        out["text"] = imram_steps(w, words, regions, w.mdu["text"])
    if w.mode in ("full", "image"):  # Image-IMRAM: regions attend words
        out["image"] = imram_steps(w, regions, words, w.mdu["image"])
    return out


def caption_scores(w: Weights, region_embs: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """One caption (n_word, d), no padding, against every image (n_img, n_region, d) -> (n_img,)."""
    dtype = w.dtype or region_embs.dtype
    region_embs, words = region_embs.to(dtype), words.to(dtype)
    if w.mode == "mean":
        return cosine(region_embs.mean(1), words.mean(0, keepdim=True))
    words = words[None].expand(region_embs.shape[0], -1, -1)  # (n_img, n_word, d): the caption per image
    score = 0
    if w.mode in ("full", "text"):  # Text-IMRAM: words attend regions
        score = score + sum(imram_steps(w, words, region_embs, w.mdu["text"]))
    if w.mode in ("full", "image"):  # Image-IMRAM: regions attend words
        score = score + sum(imram_steps(w, region_embs, words, w.mdu["image"]))
    return score


# --------------------------------------------------------------------------- all pairs
def per_caption_similarity(model: nn.Module, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """The original evaluation: a Python loop over captions, each against every image at once.

    region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d) padded, lengths (n_cap,) ->
    (n_img, n_cap). dtype None: the inputs' dtype, and the module's own parameters (so that a
    loss backpropagates into them); float64: the tests' yardstick.
    """
    w = Weights(model, dtype)
    columns = [caption_scores(w, region_embs, word_embs[j, : int(lengths[j])]) for j in range(word_embs.shape[0])]
    return torch.stack(columns, 1)


def float64_similarity(model: nn.Module, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths) -> torch.Tensor:
    """``per_caption_similarity`` in float64: (n_img, n_cap), differentiable in the embeddings."""
    return per_caption_similarity(model, region_embs, word_embs, lengths, dtype=DT)


def encode_images(model: nn.Module, region_feats: torch.Tensor) -> list[torch.Tensor]:
    w = Weights(model)
    return [encode_image(w, region_feats[i]) for i in range(region_feats.shape[0])]


def encode_captions(model: nn.Module, tokens: torch.Tensor, lengths) -> list[torch.Tensor]:
    """A list of (length_j, d) float64 tensors, each caption encoded alone."""
    w = Weights(model)
    return [encode_caption(w, tokens[j, : int(lengths[j])]) for j in range(tokens.shape[0])]


def forward(model: nn.Module, region_feats: torch.Tensor, tokens: torch.Tensor, lengths) -> torch.Tensor:
    """Raw inputs -> similarities (n_img, n_cap), float64, every image and caption encoded alone."""
    w = Weights(model)
    images = torch.stack([encode_image(w, region_feats[i]) for i in range(region_feats.shape[0])])
    captions = [encode_caption(w, tokens[j, : int(lengths[j])]) for j in range(tokens.shape[0])]
    with torch.no_grad():
        return torch.stack([caption_scores(w, images, words) for words in captions], 1)


# --------------------------------------------------------------------------- loss
def contrastive_loss(pair_scores, margin: float = 0.2, max_violation: bool = True) -> float:
    """(12), hinge triplet loss with margin Delta = ``margin``; pair_scores[i][j] = F(image i, caption j),
    positives on the diagonal.

    For each image i: its caption i against every other caption j (caption retrieval).
    For each caption j: its image j against every other image i (image retrieval).
    """
    F = [[float(score) for score in row] for row in pair_scores]
    n = len(F)
    total = 0.0
    for i in range(n):  # caption retrieval, per image: [Delta - F(i, i) + F(i, j)]_+
        costs = [max(0.0, margin + F[i][j] - F[i][i]) for j in range(n) if j != i]
        total += (max(costs) if max_violation else sum(costs)) if costs else 0.0
    for j in range(n):  # image retrieval, per caption: [Delta - F(j, j) + F(i, j)]_+
        costs = [max(0.0, margin + F[i][j] - F[j][j]) for i in range(n) if i != j]
        total += (max(costs) if max_violation else sum(costs)) if costs else 0.0
    return total
