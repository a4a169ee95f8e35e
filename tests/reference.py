"""A plain-loop IMRAM, written from the paper's equations and the original code's behaviour.

This is the yardstick the tests hold ``imram_min.model`` (and ``imram_min.fast``) against. It
shares no code with the package: it only *reads* parameters from an ``IMRAM`` module and its
``cfg`` attributes. Everything is done the way the original evaluation loop does it: one
caption at a time, sliced to its length (so there is no padding and no mask anywhere), one
image at a time, in float64 whatever the dtype of the module or of the inputs.

Semantics (Chen et al., CVPR 2020, and the published code):

* l2norm(x) = x / (||x||_2 + 1e-8); l1norm(x) = x / (||x||_1 + 1e-8);
  cosine(a, b) = <a, b> / max(||a|| ||b||, 1e-8).
* attention(query (n_q, d), context (n_c, d)): raw = context @ query^T (n_c, n_q), normalised
  over the query axis by ``raw_feature_norm``, transposed to (n_q, n_c), softmax over the
  context axis of lambda_softmax * that; attended = weights @ context.
* memory distillation: o = tanh(W_o [q; c] + b_o), g = sigmoid(W_g [q; c] + b_g),
  q' = g * q + (1 - g) * o, then l2norm(q') unless ``no_IMRAM_norm``.
* Text-IMRAM: words attend regions; Image-IMRAM: regions attend words. Step score
  F_k = mean over the query items of cosine(original query item, attended at step k).
  Pair score = sum over steps (and over both directions for mode "full").
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
    e = torch.exp(x - x.max(dim, keepdim=True).values)
    return e / e.sum(dim, keepdim=True)


def leaky_relu(x: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    return torch.where(x >= 0, x, slope * x)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


# --------------------------------------------------------------------------- cross-modal attention
def normalise_raw(raw: torch.Tensor, how: str) -> torch.Tensor:
    """raw (n_c, n_q), normalised over the query axis (axis 1)."""
    if how == "softmax":
        return softmax(raw, dim=1)
    if how == "l2norm":
        return l2norm(raw, dim=1)
    if how == "clipped_l2norm":
        return l2norm(leaky_relu(raw), dim=1)
    if how == "l1norm":
        return l1norm(raw, dim=1)
    if how == "clipped_l1norm":
        return l1norm(leaky_relu(raw), dim=1)
    if how == "clipped":
        return leaky_relu(raw)
    if how == "no_norm":
        return raw
    raise ValueError(f"unknown raw_feature_norm {how!r}")


def attention(query: torch.Tensor, context: torch.Tensor, how: str, lambda_softmax: float) -> torch.Tensor:
    """query (n_q, d), context (n_c, d) -> attended (n_q, d)."""
    raw = context @ query.T  # (n_c, n_q)
    norm = normalise_raw(raw, how).T  # (n_q, n_c)
    weights = softmax(lambda_softmax * norm, dim=1)
    return weights @ context


# --------------------------------------------------------------------------- weights read off a module
class Weights:
    """Every parameter of an IMRAM module, copied to float64, plus the config values used."""

    def __init__(self, model: nn.Module):
        cfg = model.cfg
        self.mode = cfg.mode
        self.n_steps = cfg.n_steps
        self.raw_feature_norm = cfg.raw_feature_norm
        self.lambda_softmax = float(cfg.lambda_softmax)
        self.no_IMRAM_norm = cfg.no_IMRAM_norm
        self.no_imgnorm = cfg.no_imgnorm
        self.no_txtnorm = cfg.no_txtnorm
        self.bi_gru = cfg.bi_gru
        self.embed_size = cfg.embed_size

        params = {name: p.detach().to(DT).clone() for name, p in model.named_parameters()}
        if cfg.img_encoder == "basic":
            self.img_W = params["img_enc.fc.weight"]
        else:  # weight_norm(Linear, dim=None): W = g * v / ||v||_F, g a scalar
            v = params["img_enc.fc.weight_v"]
            g = params["img_enc.fc.weight_g"]
            self.img_W = g * v / torch.sqrt((v * v).sum())
        self.img_b = params["img_enc.fc.bias"]
        self.word_table = params["txt_enc.embed.weight"]

        # A fresh nn.GRU of the same shape carrying the module's GRU weights.
        self.gru = nn.GRU(cfg.word_dim, cfg.embed_size, cfg.num_layers, batch_first=True,
                          bidirectional=cfg.bi_gru).to(DT)
        self.gru.load_state_dict({k[len("txt_enc.rnn."):]: v for k, v in params.items()
                                  if k.startswith("txt_enc.rnn.")})

        self.mem = {}  # {"text": Text-IMRAM's MDU, "image": Image-IMRAM's}
        for direction in ("text", "image"):
            mdu = f"{direction}_mdu"
            if f"{mdu}.update.weight" in params:
                self.mem[direction] = (params[f"{mdu}.update.weight"], params[f"{mdu}.update.bias"],
                                       params[f"{mdu}.gate.weight"], params[f"{mdu}.gate.bias"])


def memory_distillation(q: torch.Tensor, c: torch.Tensor, mem, no_IMRAM_norm: bool) -> torch.Tensor:
    W_o, b_o, W_g, b_g = mem
    qc = torch.cat([q, c], dim=1)
    o = torch.tanh(qc @ W_o.T + b_o)
    g = sigmoid(qc @ W_g.T + b_g)
    new_q = g * q + (1 - g) * o
    return new_q if no_IMRAM_norm else l2norm(new_q)


# --------------------------------------------------------------------------- encoders
def encode_image(w: Weights, feats: torch.Tensor) -> torch.Tensor:
    """One image: (n_region, img_dim) -> (n_region, d)."""
    emb = feats.to(DT) @ w.img_W.T + w.img_b
    return emb if w.no_imgnorm else l2norm(emb)


def encode_caption(w: Weights, tokens: torch.Tensor) -> torch.Tensor:
    """One caption, its valid tokens only: (n_word,) -> (n_word, d). GRU on a batch of one."""
    x = w.word_table[tokens][None]  # (1, n_word, word_dim)
    with torch.no_grad():
        out, _ = w.gru(x)
    out = out[0]
    if w.bi_gru:
        d = w.embed_size
        out = (out[:, :d] + out[:, d:]) / 2
    return out if w.no_txtnorm else l2norm(out)


# --------------------------------------------------------------------------- one pair
def imram_steps(w: Weights, query: torch.Tensor, context: torch.Tensor, mem) -> list[torch.Tensor]:
    """Recurrent attention memory for one pair; query items are scored. Returns [F_1..F_K] (0-d)."""
    original = query
    scores = []
    for _ in range(w.n_steps):
        attended = attention(query, context, w.raw_feature_norm, w.lambda_softmax)
        scores.append(cosine(original, attended).mean())
        query = memory_distillation(query, attended, mem, w.no_IMRAM_norm)  # as the original: every step
    return scores


def pair_step_scores(w: Weights, regions: torch.Tensor, words: torch.Tensor) -> dict:
    """One image (n_region, d) and one caption (n_word, d), no padding -> {direction: [F_k]}."""
    regions, words = regions.to(DT), words.to(DT)
    out = {}
    if w.mode in ("full", "text"):  # Text-IMRAM: words attend regions
        out["text"] = imram_steps(w, words, regions, w.mem["text"])
    if w.mode in ("full", "image"):  # Image-IMRAM: regions attend words
        out["image"] = imram_steps(w, regions, words, w.mem["image"])
    return out


def pair_score(w: Weights, regions: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """0-d float64 tensor (differentiable in the embeddings; the weights are constants)."""
    if w.mode == "mean":
        a = regions.to(DT).mean(0, keepdim=True)
        b = words.to(DT).mean(0, keepdim=True)
        return cosine(a, b)[0]
    return sum(sum(s) for s in pair_step_scores(w, regions, words).values())


# --------------------------------------------------------------------------- all pairs
def similarity(model: nn.Module, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths) -> torch.Tensor:
    """(n_img, n_region, d), (n_cap, n_word, d) padded, lengths -> (n_img, n_cap) float64.

    Caption by caption (sliced to its length), image by image, as the original evaluation.
    Differentiable in region_embs and word_embs.
    """
    w = Weights(model)
    n_img, n_cap = region_embs.shape[0], word_embs.shape[0]
    cols = []
    for j in range(n_cap):
        words = word_embs[j, : int(lengths[j])]
        cols.append(torch.stack([pair_score(w, region_embs[i], words) for i in range(n_img)]))
    return torch.stack(cols, 1)


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
    images = [encode_image(w, region_feats[i]) for i in range(region_feats.shape[0])]
    captions = [encode_caption(w, tokens[j, : int(lengths[j])]) for j in range(tokens.shape[0])]
    sims = torch.zeros(len(images), len(captions), dtype=DT)
    with torch.no_grad():
        for j, words in enumerate(captions):
            for i, regions in enumerate(images):
                sims[i, j] = pair_score(w, regions, words)
    return sims


# --------------------------------------------------------------------------- loss
def contrastive_loss(sims, margin: float = 0.2, max_violation: bool = True) -> float:
    """Hinge triplet loss; sims[i][j] = score(image i, caption j), positives on the diagonal.

    For each image i: its caption i against every other caption j (caption retrieval).
    For each caption j: its image j against every other image i (image retrieval).
    """
    s = [[float(v) for v in row] for row in sims]
    n = len(s)
    total = 0.0
    for i in range(n):  # caption retrieval, per image
        costs = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(n) if j != i]
        total += (max(costs) if max_violation else sum(costs)) if costs else 0.0
    for j in range(n):  # image retrieval, per caption
        costs = [max(0.0, margin + s[i][j] - s[j][j]) for i in range(n) if i != j]
        total += (max(costs) if max_violation else sum(costs)) if costs else 0.0
    return total
