"""imram_min.model held against the paper's per-caption loop (imram_min/reference.py) and hand values.

Every model here has small sizes (d = 16) and *all* parameters redrawn at random (biases
included), so that no term of the method can hide behind a zero initialisation.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from imram_min import reference as ref
from imram_min.loss import contrastive_loss
from imram_min.model import IMRAM, MODES, RAW_FEATURE_NORMS, IMRAMConfig

F64, F32 = torch.float64, torch.float32
DIMS = dict(vocab_size=50, img_dim=12, word_dim=10, embed_size=16)
IMRAM_MODES = ("full", "text", "image")
TOL = {F64: 1e-6, F32: 1e-5}


def make_model(dtype=F64, seed=0, scale=0.5, **cfg) -> IMRAM:
    torch.manual_seed(seed)
    model = IMRAM(IMRAMConfig(**{**DIMS, **cfg}))
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.to(dtype).eval()


def make_inputs(lengths, n_img=3, n_region=5, dtype=F64, seed=0, pad_token=0, n_word=None):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.long)
    n_word = int(lengths.max()) if n_word is None else n_word
    tokens = torch.randint(1, DIMS["vocab_size"], (len(lengths), n_word), generator=gen)
    pad = torch.arange(n_word)[None] >= lengths[:, None]
    tokens = tokens.masked_fill(pad, pad_token)
    feats = torch.randn(n_img, n_region, DIMS["img_dim"], generator=gen).to(dtype)
    return feats, tokens, lengths


def shuffled_1_to_40(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randperm(40, generator=gen) + 1).tolist()


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------- scores vs reference loop
SWEEP = list(itertools.product(IMRAM_MODES, (1, 2, 3), (False, True), RAW_FEATURE_NORMS))
SWEEP_IDS = [f"{m}-K{k}-{'nonorm' if n else 'norm'}-{r}" for m, k, n, r in SWEEP]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,n_steps,no_IMRAM_norm,raw_feature_norm", SWEEP, ids=SWEEP_IDS)
def test_forward_matches_reference_loop(mode, n_steps, no_IMRAM_norm, raw_feature_norm, dtype):
    model = make_model(dtype, mode=mode, n_steps=n_steps, no_IMRAM_norm=no_IMRAM_norm,
                       raw_feature_norm=raw_feature_norm)
    feats, tokens, lengths = make_inputs([3, 1, 7, 4, 2], dtype=dtype)
    with torch.no_grad():
        sims = model(feats, tokens, lengths)
    expected = ref.forward(model, feats, tokens, lengths)
    assert sims.shape == (3, 5) and sims.dtype == dtype
    assert max_diff(sims, expected) <= TOL[dtype]


LONG_SWEEP = ([("full", r) for r in RAW_FEATURE_NORMS]
              + [(m, r) for m in ("text", "image") for r in ("clipped_l2norm", "softmax")])


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,raw_feature_norm", LONG_SWEEP, ids=[f"{m}-{r}" for m, r in LONG_SWEEP])
def test_similarity_matches_reference_for_caption_lengths_1_to_40(mode, raw_feature_norm, dtype):
    model = make_model(dtype, mode=mode, n_steps=3, raw_feature_norm=raw_feature_norm)
    feats, tokens, lengths = make_inputs(shuffled_1_to_40(), n_img=2, n_region=6, dtype=dtype)
    with torch.no_grad():
        region_embs = model.encode_images(feats)
        word_embs = model.encode_captions(tokens, lengths)
        sims = model.similarity(region_embs, word_embs, lengths)
    expected = ref.float64_similarity(model, region_embs, word_embs, lengths)
    assert sims.shape == (2, 40)
    assert max_diff(sims, expected) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_forward_matches_reference_for_caption_lengths_1_to_40(dtype):
    model = make_model(dtype, mode="full", n_steps=3)
    feats, tokens, lengths = make_inputs(shuffled_1_to_40(1), n_img=2, n_region=6, dtype=dtype)
    with torch.no_grad():
        sims = model(feats, tokens, lengths)
    assert max_diff(sims, ref.forward(model, feats, tokens, lengths)) <= TOL[dtype]


CONFIG_VARIANTS = [
    dict(no_imgnorm=True),
    dict(no_txtnorm=True),
    dict(no_imgnorm=True, no_txtnorm=True, no_IMRAM_norm=True),
    dict(bi_gru=False),
    dict(num_layers=2),
    dict(num_layers=2, bi_gru=False),
    dict(img_encoder="weight_norm"),
    dict(lambda_softmax=4.0),
    dict(lambda_softmax=20.0, raw_feature_norm="softmax"),
    dict(lambda_softmax=1.0, raw_feature_norm="no_norm"),
]


@pytest.mark.parametrize("mode", IMRAM_MODES)
@pytest.mark.parametrize("variant", CONFIG_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_forward_matches_reference_for_config_variants(variant, mode):
    model = make_model(F64, mode=mode, n_steps=2, **variant)
    feats, tokens, lengths = make_inputs([5, 2, 1, 8], dtype=F64)
    with torch.no_grad():
        sims = model(feats, tokens, lengths)
    assert max_diff(sims, ref.forward(model, feats, tokens, lengths)) <= 1e-6


@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_step_scores_match_reference_step_by_step(mode):
    model = make_model(F64, mode=mode, n_steps=3)
    feats, tokens, lengths = make_inputs([4, 1, 6], n_img=2, dtype=F64)
    with torch.no_grad():
        region_embs = model.encode_images(feats)
        word_embs = model.encode_captions(tokens, lengths)
        steps = model.step_scores(region_embs, word_embs, lengths)
    w = ref.Weights(model)
    expected_dirs = {"full": {"text", "image"}, "text": {"text"}, "image": {"image"}}[mode]
    assert set(steps) == expected_dirs
    for direction, s in steps.items():
        assert s.shape == (3, 2, 3)
        for i, j in itertools.product(range(2), range(3)):
            per_step = ref.pair_step_scores(w, region_embs[i], word_embs[j, : int(lengths[j])])[direction]
            assert max(abs(a - float(b)) for a, b in zip(s[:, i, j].tolist(), per_step)) <= 1e-12


def test_similarity_is_sum_of_step_scores_over_steps_and_directions():
    model = make_model(F64, mode="full", n_steps=3)
    feats, tokens, lengths = make_inputs([4, 1, 6], dtype=F64)
    with torch.no_grad():
        r, w = model.encode_images(feats), model.encode_captions(tokens, lengths)
        steps = model.step_scores(r, w, lengths)
        sims = model.similarity(r, w, lengths)
    assert max_diff(sims, steps["text"].sum(0) + steps["image"].sum(0)) <= 1e-13


def test_full_mode_is_text_mode_plus_image_mode_with_the_same_weights():
    full = make_model(F64, mode="full", n_steps=2)
    text = IMRAM(IMRAMConfig(**{**DIMS, "mode": "text", "n_steps": 2})).double().eval()
    image = IMRAM(IMRAMConfig(**{**DIMS, "mode": "image", "n_steps": 2})).double().eval()
    state = full.state_dict()
    text.load_state_dict({k: v for k, v in state.items() if not k.startswith("image_mdu.")})
    image.load_state_dict({k: v for k, v in state.items() if not k.startswith("text_mdu.")})
    feats, tokens, lengths = make_inputs([3, 5, 1], dtype=F64)
    with torch.no_grad():
        assert max_diff(full(feats, tokens, lengths),
                        text(feats, tokens, lengths) + image(feats, tokens, lengths)) <= 1e-13


@pytest.mark.parametrize("mode,present,absent", [("full", ("text_mdu", "image_mdu"), ()),
                                                 ("text", ("text_mdu",), ("image_mdu",)),
                                                 ("image", ("image_mdu",), ("text_mdu",)),
                                                 ("mean", (), ("text_mdu", "image_mdu"))])
def test_each_mode_holds_only_the_memories_it_uses(mode, present, absent):
    names = {n.split(".")[0] for n, _ in make_model(mode=mode).named_parameters()}
    assert all(p in names for p in present) and not any(a in names for a in absent)


@pytest.mark.parametrize("n_steps", [1, 2])
@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_only_a_second_step_depends_on_the_memory_weights(mode, n_steps):
    model = make_model(F64, mode=mode, n_steps=n_steps)
    feats, tokens, lengths = make_inputs([3, 1, 5], dtype=F64)
    with torch.no_grad():
        before = model(feats, tokens, lengths)
        for name, p in model.named_parameters():
            if name.startswith(("text_mdu.", "image_mdu.")):
                p.mul_(-3.0).add_(1.0)
        changed = max_diff(model(feats, tokens, lengths), before)
    assert changed == 0.0 if n_steps == 1 else changed > 1e-3


# --------------------------------------------------------------------------- gradients
NAN_GRAD_MSG = (
    "model.py deviates from the original: NaN gradient in Image-IMRAM with an l2norm raw_feature_norm. "
    "attention_weights() l2-normalises raw scores over the query (region) axis for every context word, "
    "padded words included; a padded word's column is all zeros, sqrt(0) has an infinite derivative, and "
    "the upstream gradient there is 0 (masked to -inf later), so autograd computes 0/0 = NaN, which then "
    "spreads to every region and word. The original slices each caption to its length, so it never "
    "normalises a padded column. Fix: in attention_weights, before the query-axis normalisation, "
    "`if context_mask is not None: sims = sims.masked_fill(~context_mask[..., None, :], 1.0)`."
)
GRAD_SWEEP = list(itertools.product(IMRAM_MODES, RAW_FEATURE_NORMS))


@pytest.mark.parametrize("mode,raw_feature_norm", GRAD_SWEEP, ids=[f"{m}-{r}" for m, r in GRAD_SWEEP])
def test_similarity_gradients_match_reference_loop(mode, raw_feature_norm):
    model = make_model(F64, mode=mode, n_steps=2, raw_feature_norm=raw_feature_norm)
    feats, tokens, lengths = make_inputs([3, 1, 5, 2], dtype=F64)
    with torch.no_grad():
        r, w = model.encode_images(feats), model.encode_captions(tokens, lengths)
    probe = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    r1, w1 = r.clone().requires_grad_(), w.clone().requires_grad_()
    (model.similarity(r1, w1, lengths) * probe).sum().backward()
    r2, w2 = r.clone().requires_grad_(), w.clone().requires_grad_()
    (ref.float64_similarity(model, r2, w2, lengths) * probe).sum().backward()
    assert torch.isfinite(r1.grad).all() and torch.isfinite(w1.grad).all(), NAN_GRAD_MSG
    assert max_diff(r1.grad, r2.grad) <= 1e-10
    assert max_diff(w1.grad, w2.grad) <= 1e-10  # zero past each length, as in the loop


def test_default_training_step_has_finite_gradients():
    model = make_model(F64)  # default config: mode "full", clipped_l2norm
    feats, tokens, lengths = make_inputs([3, 1, 5], dtype=F64)
    contrastive_loss(model(feats, tokens, lengths)).backward()
    bad = sorted(n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all())
    assert not bad, f"{NAN_GRAD_MSG} Non-finite gradients in: {bad}"


# --------------------------------------------------------------------------- padding
@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_similarity_ignores_word_embeddings_past_each_length(mode):
    model = make_model(F64, mode=mode, n_steps=3)
    feats, tokens, lengths = make_inputs([2, 6, 1, 4], dtype=F64)
    with torch.no_grad():
        r, w = model.encode_images(feats), model.encode_captions(tokens, lengths)
        pad = (torch.arange(w.shape[1])[None] >= lengths[:, None])[..., None]
        garbage = w + pad * torch.randn(w.shape, generator=torch.Generator().manual_seed(5), dtype=F64) * 10
        assert torch.equal(model.similarity(r, garbage, lengths), model.similarity(r, w, lengths))


@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_extra_padding_columns_do_not_change_scores(mode):
    model = make_model(F64, mode=mode, n_steps=2)
    feats, tokens, lengths = make_inputs([2, 6, 1, 4], dtype=F64)
    long_tokens = torch.cat([tokens, torch.zeros(4, 9, dtype=tokens.dtype)], 1)
    with torch.no_grad():  # padding is masked exactly; the wider matrix products may round differently
        assert max_diff(model(feats, long_tokens, lengths), model(feats, tokens, lengths)) <= 1e-14


@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_padding_token_ids_do_not_change_scores(mode):
    model = make_model(F64, mode=mode, n_steps=2)
    feats, tokens, lengths = make_inputs([2, 6, 1, 4], dtype=F64, pad_token=0)
    _, tokens7, _ = make_inputs([2, 6, 1, 4], dtype=F64, pad_token=7)
    with torch.no_grad():
        assert torch.equal(model(feats, tokens7, lengths), model(feats, tokens, lengths))


# --------------------------------------------------------------------------- text encoder
TEXT_VARIANTS = list(itertools.product((True, False), (1, 2), (False, True)))


@pytest.mark.parametrize("bi_gru,num_layers,no_txtnorm", TEXT_VARIANTS,
                         ids=[f"bi{b}-L{n}-nonorm{t}" for b, n, t in TEXT_VARIANTS])
def test_text_encoder_equals_gru_on_each_caption_alone(bi_gru, num_layers, no_txtnorm):
    model = make_model(F64, bi_gru=bi_gru, num_layers=num_layers, no_txtnorm=no_txtnorm)
    lengths = [5, 1, 12, 3, 9, 2, 7]
    _, tokens, lengths_t = make_inputs(lengths, dtype=F64, n_word=14)
    with torch.no_grad():
        out = model.encode_captions(tokens, lengths_t)
    assert out.shape == (7, 14, 16) and out.dtype == F64
    alone = ref.encode_captions(model, tokens, lengths_t)
    for j, n in enumerate(lengths):
        assert (out[j, :n] - alone[j]).abs().max().item() <= 1e-12


def test_text_encoder_padded_positions_are_exact_zeros():
    model = make_model(F64, no_txtnorm=True)  # not even the l2norm's eps could hide a non-zero
    lengths = [5, 1, 12, 3]
    _, tokens, lengths_t = make_inputs(lengths, dtype=F64, n_word=14, pad_token=9)
    with torch.no_grad():
        out = model.encode_captions(tokens, lengths_t)
    for j, n in enumerate(lengths):
        assert torch.count_nonzero(out[j, n:]) == 0
        assert torch.count_nonzero(out[j, :n].abs().sum(-1)) == n


def test_text_encoder_output_does_not_depend_on_padding_tokens():
    model = make_model(F64)
    lengths = [5, 1, 12, 3]
    _, tokens, lengths_t = make_inputs(lengths, dtype=F64, n_word=14, pad_token=0)
    other = tokens.clone()
    pad = torch.arange(14)[None] >= lengths_t[:, None]
    other[pad] = torch.randint(1, DIMS["vocab_size"], (int(pad.sum()),), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.encode_captions(other, lengths_t), model.encode_captions(tokens, lengths_t))


def _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.GRU's cell, by hand: gates in the order r, z, n."""
    gi = w_ih @ x + b_ih
    gh = w_hh @ h + b_hh
    d = h.shape[0]
    r = ref.sigmoid(gi[:d] + gh[:d])
    z = ref.sigmoid(gi[d:2 * d] + gh[d:2 * d])
    n = torch.tanh(gi[2 * d:] + r * gh[2 * d:])
    return (1 - z) * n + z * h


def test_backward_direction_starts_at_each_captions_own_last_word():
    model = make_model(F64, bi_gru=True, num_layers=1, no_txtnorm=True)
    rnn = model.txt_enc.rnn
    with torch.no_grad():  # silence the forward direction: h stays 0, output = backward / 2
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(rnn, name).zero_()
    lengths = [4, 1, 7, 2]
    _, tokens, lengths_t = make_inputs(lengths, dtype=F64, n_word=9, pad_token=3)
    with torch.no_grad():
        out = model.encode_captions(tokens, lengths_t)
        table = model.txt_enc.embed.weight
        w = [getattr(rnn, f"{n}_l0_reverse") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        for j, n in enumerate(lengths):
            h = torch.zeros(16, dtype=F64)
            for t in reversed(range(n)):  # from this caption's last word, never from padding
                h = _gru_cell(table[tokens[j, t]], h, *w)
                assert (2 * out[j, t] - h).abs().max().item() <= 1e-12


# --------------------------------------------------------------------------- image encoder
@pytest.mark.parametrize("no_imgnorm", [False, True])
def test_image_encoder_basic_is_linear_then_l2norm(no_imgnorm):
    model = make_model(F64, no_imgnorm=no_imgnorm)
    feats, _, _ = make_inputs([1], n_img=3, n_region=4, dtype=F64)
    fc = model.img_enc.fc
    with torch.no_grad():
        out = model.encode_images(feats)
        lin = feats @ fc.weight.T + fc.bias
        expected = lin if no_imgnorm else lin / (lin.norm(dim=-1, keepdim=True) + 1e-8)
    assert out.shape == (3, 4, 16)
    assert (out - expected).abs().max().item() <= 1e-13
    if not no_imgnorm:
        assert (out.norm(dim=-1) - 1).abs().max().item() <= 1e-7


def test_image_encoder_basic_init_is_xavier_uniform_with_zero_bias():
    torch.manual_seed(0)
    fc = IMRAM(IMRAMConfig(**DIMS)).img_enc.fc
    bound = (6.0 / (DIMS["img_dim"] + DIMS["embed_size"])) ** 0.5
    assert torch.count_nonzero(fc.bias) == 0
    assert fc.weight.abs().max().item() <= bound
    assert fc.weight.abs().max().item() > 0.5 * bound


@pytest.mark.parametrize("no_imgnorm", [False, True])
def test_image_encoder_weight_norm_uses_scalar_g_times_v_over_frobenius_norm(no_imgnorm):
    model = make_model(F64, img_encoder="weight_norm", no_imgnorm=no_imgnorm)
    params = dict(model.img_enc.named_parameters())
    assert set(params) == {"fc.weight_g", "fc.weight_v", "fc.bias"}
    assert params["fc.weight_g"].numel() == 1
    assert params["fc.weight_v"].shape == (16, DIMS["img_dim"])
    with torch.no_grad():
        params["fc.weight_g"].fill_(2.5)
        v, b = params["fc.weight_v"], params["fc.bias"]
        feats, _, _ = make_inputs([1], n_img=2, n_region=4, dtype=F64)
        lin = feats @ (2.5 * v / v.pow(2).sum().sqrt()).T + b
        expected = lin if no_imgnorm else lin / (lin.norm(dim=-1, keepdim=True) + 1e-8)
        out = model.encode_images(feats)
        assert (out - expected).abs().max().item() <= 1e-13
        v.mul_(7.0)  # the direction of v only matters
        assert (model.encode_images(feats) - out).abs().max().item() <= 1e-13


def test_image_encoder_weight_norm_starts_at_g_equal_to_norm_of_v():
    torch.manual_seed(0)
    enc = IMRAM(IMRAMConfig(**DIMS, img_encoder="weight_norm")).img_enc
    with torch.no_grad():
        assert abs(enc.fc.weight_g.item() - enc.fc.weight_v.norm().item()) <= 1e-6
        assert (enc.weight() - enc.fc.weight_v).abs().max().item() <= 1e-6


# --------------------------------------------------------------------------- pairs are independent
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("img_block,cap_block", [(1, 1), (1, 7), (2, 3), (3, 40)])
@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_similarity_of_a_block_of_pairs_equals_those_pairs_of_all(mode, img_block, cap_block, dtype):
    # A pair's score depends on that pair only: any block of images x captions (its captions
    # trimmed to their longest) gives the same entries. Not bit-for-bit: torch's batched matmul
    # rounds differently for different batch shapes, so to a few ulps.
    model = make_model(dtype, mode=mode, n_steps=2)
    feats, tokens, lengths = make_inputs(shuffled_1_to_40(2), n_img=3, n_region=4, dtype=dtype)
    with torch.no_grad():
        r, w = model.encode_images(feats), model.encode_captions(tokens, lengths)
        whole = model.similarity(r, w, lengths)
        rows = []
        for i in range(0, 3, img_block):
            cols = []
            for j in range(0, 40, cap_block):
                n_word = int(lengths[j:j + cap_block].max())
                cols.append(model.similarity(r[i:i + img_block], w[j:j + cap_block, :n_word], lengths[j:j + cap_block]))
            rows.append(torch.cat(cols, 1))
        blocks = torch.cat(rows, 0)
    assert blocks.shape == whole.shape == (3, 40)
    assert max_diff(blocks, whole) <= {F64: 1e-13, F32: 4e-6}[dtype]


# --------------------------------------------------------------------------- loss
HAND_SIMS = [[0.75, 0.625, 0.375],
             [0.375, 0.5, 0.5],
             [0.125, 0.0, 0.25]]
# margin 0.25. Caption retrieval (rows): row 0 -> 0.125 (col 1); row 1 -> 0.125 (col 0), 0.25 (col 2);
# row 2 -> 0.125 (col 0). Image retrieval (columns): col 0 -> none; col 1 -> 0.375 (row 0);
# col 2 -> 0.375 (row 0), 0.5 (row 1).
# hardest: (0.125 + 0.25 + 0.125) + (0 + 0.375 + 0.5) = 1.375
# summed:  (0.125 + 0.375 + 0.125) + (0 + 0.375 + 0.875) = 1.875


@pytest.mark.parametrize("max_violation,expected", [(True, 1.375), (False, 1.875)])
def test_contrastive_loss_hand_computed(max_violation, expected):
    sims = torch.tensor(HAND_SIMS, dtype=F64)
    assert contrastive_loss(sims, margin=0.25, max_violation=max_violation).item() == expected
    assert ref.contrastive_loss(HAND_SIMS, margin=0.25, max_violation=max_violation) == expected


@pytest.mark.parametrize("margin", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("max_violation", [True, False])
def test_contrastive_loss_matches_reference(max_violation, margin):
    sims = torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    got = contrastive_loss(sims, margin=margin, max_violation=max_violation).item()
    assert abs(got - ref.contrastive_loss(sims, margin, max_violation)) <= 1e-12


def test_contrastive_loss_is_zero_when_positives_win_by_the_margin():
    sims = torch.full((4, 4), 0.1, dtype=F64).fill_diagonal_(0.5)
    assert contrastive_loss(sims, margin=0.2, max_violation=True).item() == 0.0
    assert contrastive_loss(sims, margin=0.2, max_violation=False).item() == 0.0


def test_contrastive_loss_defaults_are_margin_02_hardest_negative():
    sims = torch.tensor(HAND_SIMS, dtype=F64)
    assert contrastive_loss(sims).item() == contrastive_loss(sims, margin=0.2, max_violation=True).item()
    cfg = IMRAMConfig()
    assert (cfg.margin, cfg.max_violation) == (0.2, True)


def test_contrastive_loss_gradient_reaches_only_the_hardest_negatives():
    sims = torch.tensor(HAND_SIMS, dtype=F64, requires_grad=True)
    contrastive_loss(sims, margin=0.25, max_violation=True).backward()
    # hardest terms: rows (0,1) (1,2) (2,0); columns (0,1) (1,2); column 0 has none.
    # each adds +1 at the negative and -1 at its positive.
    expected = torch.tensor([[-1.0, 2.0, 0.0],
                             [0.0, -2.0, 2.0],
                             [1.0, 0.0, -2.0]], dtype=F64)
    assert torch.equal(sims.grad, expected)


# --------------------------------------------------------------------------- "mean" baseline
@pytest.mark.parametrize("no_txtnorm", [False, True])
def test_mean_mode_is_cosine_of_mean_region_and_mean_valid_word(no_txtnorm):
    model = make_model(F64, mode="mean", no_txtnorm=no_txtnorm)
    feats, tokens, lengths = make_inputs([3, 1, 7, 4], dtype=F64, pad_token=5)
    with torch.no_grad():
        r, w = model.encode_images(feats), model.encode_captions(tokens, lengths)
        sims = model.similarity(r, w, lengths)
        fwd = model(feats, tokens, lengths)
    expected = torch.tensor([[ref.cosine(r[i].mean(0, keepdim=True), w[j, : int(lengths[j])].mean(0, keepdim=True)).item()
                              for j in range(4)] for i in range(3)], dtype=F64)
    # l2norm's +1e-8 against cosine's clamp: equal up to ~1e-8 relative
    assert max_diff(sims, expected) <= 1e-7
    assert max_diff(fwd, expected) <= 1e-7
    assert max_diff(sims, ref.float64_similarity(model, r, w, lengths)) <= 1e-7


def test_mean_mode_ignores_word_embeddings_past_each_length():
    model = make_model(F64, mode="mean")
    feats, tokens, lengths = make_inputs([3, 1, 7, 4], dtype=F64)
    with torch.no_grad():
        r, w = model.encode_images(feats), model.encode_captions(tokens, lengths)
        pad = (torch.arange(w.shape[1])[None] >= lengths[:, None])[..., None]
        assert torch.equal(model.similarity(r, w + pad * 3.0, lengths), model.similarity(r, w, lengths))


# --------------------------------------------------------------------------- config
def test_config_rejects_unknown_raw_feature_norm():
    with pytest.raises(ValueError, match="raw_feature_norm"):
        IMRAMConfig(raw_feature_norm="l3norm")


def test_config_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        IMRAMConfig(mode="both")


def test_config_rejects_unknown_image_encoder():
    with pytest.raises(ValueError, match="img_encoder"):
        IMRAMConfig(img_encoder="resnet")


@pytest.mark.parametrize("n_steps", [0, -1])
def test_config_rejects_fewer_than_one_step(n_steps):
    with pytest.raises(ValueError, match="n_steps"):
        IMRAMConfig(n_steps=n_steps)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="bogus"):
        IMRAMConfig.from_dict({**IMRAMConfig().to_dict(), "bogus": 1})


def test_config_round_trips_through_dict():
    cfg = IMRAMConfig(embed_size=32, mode="image", raw_feature_norm="softmax", n_steps=2, no_IMRAM_norm=True)
    assert IMRAMConfig.from_dict(cfg.to_dict()) == cfg


def test_every_listed_norm_and_mode_is_accepted():
    for how in RAW_FEATURE_NORMS:
        assert IMRAMConfig(raw_feature_norm=how).raw_feature_norm == how
    for mode in MODES:
        assert IMRAMConfig(mode=mode).mode == mode
    assert set(RAW_FEATURE_NORMS) == {"softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm",
                                      "clipped", "no_norm"}
