"""imram_min.fast gives the scores of imram_min.model (and of the reference loop), in less arithmetic."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from imram_min import fast, fast_backward
from imram_min.engineering import tiling
from imram_min import reference as ref
from imram_min.model import RAW_FEATURE_NORMS, l2norm
from test_model import (DIMS, F32, F64, IMRAM_MODES, NAN_GRAD_MSG, make_inputs, make_model, max_diff,
                        shuffled_1_to_40)

SWEEP = list(itertools.product(IMRAM_MODES, (1, 2, 3), (False, True), RAW_FEATURE_NORMS))
SWEEP_IDS = [f"{m}-K{k}-{'nonorm' if n else 'norm'}-{r}" for m, k, n, r in SWEEP]


def embed(model, feats, tokens, lengths):
    with torch.no_grad():
        return model.encode_images(feats), model.encode_captions(tokens, lengths)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (F32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("mode,n_steps,no_IMRAM_norm,raw_feature_norm", SWEEP, ids=SWEEP_IDS)
def test_fast_equals_model_and_the_paper_loop(mode, n_steps, no_IMRAM_norm, raw_feature_norm, dtype, tol):
    model = make_model(dtype, mode=mode, n_steps=n_steps, no_IMRAM_norm=no_IMRAM_norm,
                       raw_feature_norm=raw_feature_norm)
    feats, tokens, lengths = make_inputs([3, 1, 7, 4, 2], dtype=dtype)
    r, w = embed(model, feats, tokens, lengths)
    with torch.no_grad():
        got = tiling.tiled_similarity(model, r, w, lengths)
        expected = model.similarity(r, w, lengths)
    assert got.shape == (3, 5) and got.dtype == dtype
    assert max_diff(got, expected) <= tol
    assert max_diff(got, ref.float64_similarity(model, r, w, lengths)) <= max(tol, 1e-6)


LONG_SWEEP = ([("full", r) for r in RAW_FEATURE_NORMS]
              + [(m, r) for m in ("text", "image") for r in ("clipped_l2norm", "softmax")])


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode,raw_feature_norm", LONG_SWEEP, ids=[f"{m}-{r}" for m, r in LONG_SWEEP])
def test_fast_for_caption_lengths_1_to_40(mode, raw_feature_norm, dtype):
    model = make_model(dtype, mode=mode, n_steps=3, raw_feature_norm=raw_feature_norm)
    feats, tokens, lengths = make_inputs(shuffled_1_to_40(), n_img=2, n_region=6, dtype=dtype)
    r, w = embed(model, feats, tokens, lengths)
    with torch.no_grad():
        got = tiling.tiled_similarity(model, r, w, lengths)
        expected = model.similarity(r, w, lengths)
    assert max_diff(got, expected) <= {F64: 1e-12, F32: 1e-5}[dtype]
    if dtype == F32:
        assert max_diff(got, ref.float64_similarity(model, r, w, lengths)) <= 1e-5


@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_fast_step_scores_equal_model_step_scores(mode):
    model = make_model(F64, mode=mode, n_steps=3)
    feats, tokens, lengths = make_inputs([4, 1, 6, 2], dtype=F64)
    r, w = embed(model, feats, tokens, lengths)
    with torch.no_grad():
        got = fast.fast_step_scores(model, r, w, lengths)
        expected = model.step_scores(r, w, lengths)
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].shape == expected[k].shape == (3, 3, 4)
        assert max_diff(got[k], expected[k]) <= 1e-12


@pytest.mark.parametrize("max_elems", [1, 200, 1000, 5000])
@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_fast_in_small_blocks_equals_model(mode, max_elems):
    model = make_model(F64, mode=mode, n_steps=2)
    feats, tokens, lengths = make_inputs(shuffled_1_to_40(3), n_img=3, n_region=4, dtype=F64)
    r, w = embed(model, feats, tokens, lengths)
    with torch.no_grad():
        got = tiling.tiled_similarity(model, r, w, lengths, max_elems=max_elems)
        expected = model.similarity(r, w, lengths)
    assert max_diff(got, expected) <= 1e-12


@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_fast_blocks_side_by_side_equal_one_after_another(mode):
    model = make_model(F64, mode=mode, n_steps=3)
    feats, tokens, lengths = make_inputs(shuffled_1_to_40(7), n_img=5, n_region=4, dtype=F64)
    r, w = embed(model, feats, tokens, lengths)
    with torch.no_grad():
        side_by_side = tiling.tiled_similarity(model, r, w, lengths, max_elems=300, workers=3)
        assert max_diff(side_by_side, tiling.tiled_similarity(model, r, w, lengths, max_elems=300, workers=1)) <= 1e-12
        assert max_diff(side_by_side, model.similarity(r, w, lengths)) <= 1e-12


def test_worker_threads_run_single_threaded_in_the_callers_grad_mode_and_keep_order():
    threads = torch.get_num_threads()
    seen = lambda job: (job, torch.get_num_threads(), torch.is_grad_enabled())  # noqa: E731
    with torch.no_grad():
        assert tiling.in_worker_threads(seen, list(range(5)), 2) == [(i, 1, False) for i in range(5)]
    assert tiling.in_worker_threads(seen, list(range(5)), 2) == [(i, 1, True) for i in range(5)]
    assert tiling.in_worker_threads(seen, [0, 1], 1) == [(0, threads, True), (1, threads, True)]
    assert torch.get_num_threads() == threads


def test_blocks_run_side_by_side_only_for_cpu_inference():
    assert tiling.block_workers(torch.device("cpu"), grad=False) == torch.get_num_threads()
    assert tiling.block_workers(torch.device("cpu"), grad=True) == 1
    assert tiling.block_workers(torch.device("cuda"), grad=False) == 1


def test_training_recomputes_blocks_only_when_the_activations_would_not_fit(monkeypatch):
    model = make_model(mode="full", n_steps=3)
    r, w = torch.randn(4, 5, 16, requires_grad=True), torch.randn(6, 7, 16)
    need = tiling.stored_activation_bytes(model, 4, 6, 5, 7)
    monkeypatch.setattr(tiling, "free_memory", lambda device: 2 * need + 8)  # fits in half: stored
    assert not tiling.needs_recomputation(model, r, w)
    monkeypatch.setattr(tiling, "free_memory", lambda device: 2 * need - 8)  # does not: recomputed
    assert tiling.needs_recomputation(model, r, w)
    with torch.no_grad():
        assert not tiling.needs_recomputation(model, r, w)  # nothing is stored without autograd


def test_stored_activations_grow_with_the_pairs_and_vanish_for_the_mean_baseline():
    model = make_model(mode="full", n_steps=3)
    assert tiling.stored_activation_bytes(model, 4, 6, 5, 7) * 4 == tiling.stored_activation_bytes(model, 8, 12, 5, 7)
    assert tiling.stored_activation_bytes(make_model(mode="mean", n_steps=1), 4, 6, 5, 7) == 0


@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_fast_ignores_word_embeddings_past_each_length(mode):
    model = make_model(F64, mode=mode, n_steps=3)
    feats, tokens, lengths = make_inputs([2, 6, 1, 4], dtype=F64)
    r, w = embed(model, feats, tokens, lengths)
    pad = (torch.arange(w.shape[1])[None] >= lengths[:, None])[..., None]
    garbage = w + pad * torch.randn(w.shape, generator=torch.Generator().manual_seed(5), dtype=F64) * 10
    with torch.no_grad():
        assert max_diff(tiling.tiled_similarity(model, r, garbage, lengths), model.similarity(r, w, lengths)) <= 1e-12


@pytest.mark.parametrize("no_txtnorm", [False, True])
def test_fast_mean_mode_equals_model(no_txtnorm):
    model = make_model(F64, mode="mean", no_txtnorm=no_txtnorm)
    feats, tokens, lengths = make_inputs([3, 1, 7, 4], dtype=F64)
    r, w = embed(model, feats, tokens, lengths)
    with torch.no_grad():
        assert max_diff(tiling.tiled_similarity(model, r, w, lengths), model.similarity(r, w, lengths)) <= 1e-12


GRAD_SWEEP = list(itertools.product(IMRAM_MODES, RAW_FEATURE_NORMS))


@pytest.mark.parametrize("mode,raw_feature_norm", GRAD_SWEEP, ids=[f"{m}-{r}" for m, r in GRAD_SWEEP])
def test_fast_gradients_match_reference_loop(mode, raw_feature_norm):
    model = make_model(F64, mode=mode, n_steps=2, raw_feature_norm=raw_feature_norm)
    feats, tokens, lengths = make_inputs([3, 1, 5, 2], dtype=F64)
    r, w = embed(model, feats, tokens, lengths)
    probe = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    r1, w1 = r.clone().requires_grad_(), w.clone().requires_grad_()
    (tiling.tiled_similarity(model, r1, w1, lengths) * probe).sum().backward()
    r2, w2 = r.clone().requires_grad_(), w.clone().requires_grad_()
    (ref.float64_similarity(model, r2, w2, lengths) * probe).sum().backward()
    assert torch.isfinite(r1.grad).all() and torch.isfinite(w1.grad).all(), NAN_GRAD_MSG
    assert max_diff(r1.grad, r2.grad) <= 1e-10
    assert max_diff(w1.grad, w2.grad) <= 1e-10


@pytest.mark.parametrize("checkpoint,workers", [(False, 1), (True, 1), (True, 3)],
                         ids=["plain", "checkpoint", "checkpoint-3-threads"])
@pytest.mark.parametrize("mode", IMRAM_MODES)
def test_fast_parameter_gradients_equal_model(mode, checkpoint, workers):
    model = make_model(F64, mode=mode, n_steps=3)
    feats, tokens, lengths = make_inputs([3, 1, 5, 2], dtype=F64)
    probe = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=F64)

    def grads(score_fn):
        model.zero_grad()
        sims = score_fn(model.encode_images(feats), model.encode_captions(tokens, lengths))
        (sims * probe).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads(lambda r, w: model.similarity(r, w, lengths))
    got = grads(lambda r, w: tiling.tiled_similarity(model, r, w, lengths, max_elems=1000, checkpoint=checkpoint,
                                             workers=workers))
    assert set(got) == set(expected)
    for name in expected:
        assert torch.isfinite(expected[name]).all() and torch.isfinite(got[name]).all(), f"{name}: {NAN_GRAD_MSG}"
        assert max_diff(got[name], expected[name]) <= 1e-10, name


# --------------------------------------------------------------------------- each identity of fast.py alone
def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _attention(*shape, seed=0):
    return _rand(*shape, seed=seed).softmax(-1)  # rows sum to 1, as (5)


def test_identity_f1_context_projection_mixing():
    # W_c c_i + b = sum_j a_ij (W_c v_j + b), because sum_j a_ij = 1
    v, a, w_c, b = _rand(5, 4, seed=1), _attention(3, 5, seed=2), _rand(6, 4, seed=3), _rand(6, seed=4)
    c = a @ v  # (6): c_i = sum_j a_ij v_j
    assert max_diff(c @ w_c.T + b, a @ (v @ w_c.T + b)) <= 1e-12


def test_identity_f1_f2_projections_are_the_mdu_weights_split_by_side():
    model = make_model(F64, mode="full", n_steps=2)
    weights = fast.direction_weights(model)
    region_embs, word_embs = _rand(2, 3, 16, seed=1), _rand(4, 5, 16, seed=2)
    regions = fast.split_directions(fast.projections(model, region_embs, "region", weights), weights)
    words = fast.split_directions(fast.projections(model, word_embs, "word", weights), weights)
    for direction, query, context, q_part, c_part in (("text", word_embs, region_embs, words, regions),
                                                      ("image", region_embs, word_embs, regions, words)):
        w_q, w_c, b = weights[direction]
        assert max_diff(q_part[direction], query @ w_q.T) <= 1e-12  # (F2): W_q q, per query item
        assert max_diff(c_part[direction], context @ w_c.T + b) <= 1e-12  # (F1): W_c v + b, per context item


def test_identity_f2_step1_query_part_is_per_item():
    # at step 1 m = q: W_q m_i for every pair is W_q q_i of the query item alone, broadcast
    q, w_q = _rand(4, 3, 5, seed=1), _rand(10, 5, seed=2)  # (n_q_items, n_query, d)
    per_pair = q.expand(6, 4, 3, 5) @ w_q.T  # (n_c_items, n_q_items, n_query, 2d)
    assert max_diff(per_pair, (q @ w_q.T).expand(6, 4, 3, 10)) <= 1e-12


@pytest.mark.parametrize("n_steps", [1, 2, 3, 4])
def test_identity_f3_no_update_after_the_last_step(n_steps):
    model = make_model(F64, mode="full", n_steps=n_steps)
    feats, tokens, lengths = make_inputs([3, 1, 4], dtype=F64)
    r, w = embed(model, feats, tokens, lengths)
    steps = []

    def counting_update(memory, attention, step, *parts):
        steps.append(step)
        return fast.gated_update(memory, attention, step, *parts)
    with torch.no_grad():
        got = fast.fast_step_scores(model, r, w, lengths, update=counting_update)
        expected = model.step_scores(r, w, lengths)
    assert steps == list(range(n_steps - 1)) * 2  # K - 1 updates per direction, none after the last step
    assert all(max_diff(got[k], expected[k]) <= 1e-12 for k in expected)


def test_identity_f4_step_score_from_step1_raw_scores_and_gram():
    q, v = _rand(4, 3, 6, seed=1), _rand(2, 5, 6, seed=2)  # (n_q_items, n_query, d), (n_c_items, n_context, d)
    a = _attention(2, 4, 3, 5, seed=3)  # a^k: (n_c_items, n_q_items, n_query, n_context)
    raw = torch.einsum("qnd,cjd->cqnj", q, v)  # s^1_ij = <q_i, v_j>
    c = torch.einsum("cqnj,cjd->cqnd", a, v)  # c_i^k = sum_j a_ij v_j
    gram = v @ v.transpose(1, 2)  # G_jl = <v_j, v_l>
    assert max_diff(fast.attended_dot(a, raw), (q[None] * c).sum(-1)) <= 1e-12  # <q_i, c_i^k>
    assert max_diff(fast.attended_sq_norm(a, gram), (c * c).sum(-1)) <= 1e-12  # |c_i^k|^2 = a_i G a_i^T


def test_identity_f5_tanh_from_one_sigmoid_with_doubled_update_rows():
    x = _rand(7, 5, seed=1) * 4
    assert max_diff(torch.tanh(x), 2 * torch.sigmoid(2 * x) - 1) <= 1e-12
    model = make_model(F64, mode="text", n_steps=2)
    mdu, mc = model.text_mdu, _rand(3, 32, seed=2)  # [m; c], d = 16
    w_q, w_c, b = fast.mdu_weights(mdu)
    sig = torch.sigmoid(mc @ torch.cat([w_q, w_c], 1).T + b)  # one sigmoid for both units
    assert max_diff(2 * sig[:, :16] - 1, torch.tanh(mdu.update(mc))) <= 1e-12  # (7)
    assert max_diff(sig[:, 16:], torch.sigmoid(mdu.gate(mc))) <= 1e-12  # (8)


def test_identity_f6_gated_update_is_a_lerp():
    o, m, g = _rand(4, 6, seed=1), _rand(4, 6, seed=2), torch.sigmoid(_rand(4, 6, seed=3))
    assert max_diff(torch.lerp(o, m, g), g * m + (1 - g) * o) <= 1e-12
    assert max_diff(o + g * (m - o), g * m + (1 - g) * o) <= 1e-12


def test_identity_f7_last_l2norm_folded_into_the_raw_scores():
    m, v = _rand(3, 4, 6, seed=1), _rand(3, 5, 6, seed=2)
    normed = m / (torch.linalg.vector_norm(m, dim=-1, keepdim=True) + 1e-8)
    folded = (m @ v.transpose(1, 2)) / (torch.linalg.vector_norm(m, dim=-1, keepdim=True) + 1e-8)
    assert max_diff(normed @ v.transpose(1, 2), folded) <= 1e-12


@pytest.mark.parametrize("memory_shape", [(2, 4, 3, 16), (4, 3, 16)], ids=["memory", "query-broadcast"])
def test_identity_f8_gate_derivative_written_out(memory_shape):
    pre = _rand(2, 4, 3, 32, seed=1).requires_grad_()  # (n_c_items, n_q_items, n_query, 2d)
    memory = _rand(*memory_shape, seed=2).requires_grad_()  # at step 1 the query, broadcast over context items
    grad = _rand(2, 4, 3, 16, seed=3)  # dL/dm'
    assert max_diff(fast_backward.GatedUpdate.apply(pre, memory), fast.new_memory(torch.sigmoid(pre), memory)) == 0
    got = torch.autograd.grad(fast_backward.GatedUpdate.apply(pre, memory), (pre, memory), grad)
    expected = torch.autograd.grad(fast.new_memory(torch.sigmoid(pre), memory), (pre, memory), grad)  # autograd's
    assert [g.shape for g in got] == [pre.shape, memory.shape]
    assert max(max_diff(a, b) for a, b in zip(got, expected)) <= 1e-12
    small_memory = memory[:1, :2] if memory.dim() == 4 else memory[:2]
    small = (pre[:1, :2].detach().requires_grad_(), small_memory.detach().requires_grad_())
    assert torch.autograd.gradcheck(fast_backward.GatedUpdate.apply, small)  # and against finite differences


def test_gated_update_with_grad_equals_without():
    model = make_model(F64, mode="text", n_steps=2)
    w_q, w_c, b = fast.mdu_weights(model.text_mdu)
    query, v, memory = _rand(4, 3, 16, seed=1), _rand(2, 5, 16, seed=2), _rand(2, 4, 3, 16, seed=3)
    a = _attention(2, 4, 3, 5, seed=4)
    for step, m in ((0, query), (1, memory)):
        args = (m, a, step, w_q, query @ w_q.T, v @ w_c.T + b)
        with torch.no_grad():
            expected = fast.gated_update(*args)  # the in-place form of inference
        got = fast.gated_update(m.clone().requires_grad_(), *args[1:])  # through GatedUpdate (F8)
        assert got.grad_fn is not None and max_diff(got, expected) <= 1e-15


@pytest.mark.parametrize("step", [0, 1])
def test_gated_update_equals_the_mdu_on_the_attended_context(step):
    model = make_model(F64, mode="text", n_steps=2)
    w_q, w_c, b = fast.mdu_weights(model.text_mdu)
    query, v = _rand(4, 3, 16, seed=1), _rand(2, 5, 16, seed=2)  # (n_q_items, n_query, d), (n_c_items, n_context, d)
    memory = query if step == 0 else _rand(2, 4, 3, 16, seed=3)
    a = _attention(2, 4, 3, 5, seed=4)
    c = torch.einsum("cqnj,cjd->cqnd", a, v)
    with torch.no_grad():
        expected = model.text_mdu(memory, c, normalize=False)  # (7)-(9) before the l2norm
        got = fast.gated_update(memory, a, step, w_q, query @ w_q.T, v @ w_c.T + b)
    assert max_diff(got, expected) <= 1e-12


@pytest.mark.parametrize("zero_row", [False, True])
def test_identity_f9_l2norm_derivative_written_out(zero_row):
    x = _rand(2, 3, 6, seed=1)
    if zero_row:
        x[0, 1] = 0  # an all-zero memory row stays zero; its gradient is G / eps, as autograd's
    x.requires_grad_()
    grad = _rand(2, 3, 6, seed=2)
    (got,) = torch.autograd.grad(fast_backward.L2Norm.apply(x), x, grad)
    (expected,) = torch.autograd.grad(l2norm(x), x, grad)
    assert max_diff(fast_backward.L2Norm.apply(x), l2norm(x)) == 0
    assert max_diff(got, expected) <= 1e-12 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("mode,n_steps", [("full", 3), ("text", 2), ("image", 3), ("full", 1), ("mean", 1)])
def test_zipped_scores_are_the_listed_pairs_of_all_pairs(mode, n_steps):
    model = make_model(F64, mode=mode, n_steps=n_steps)
    feats, tokens, lengths = make_inputs([4, 7, 2, 5], n_img=3)
    r, w = embed(model, feats, tokens, lengths)
    images, captions = torch.tensor([0, 2, 1, 2, 0]), torch.tensor([3, 0, 1, 2, 3])  # any pairs, repeats too
    with torch.no_grad():
        expected = model.similarity(r, w, lengths)[images, captions]
        got = fast.zipped_scores(model, r[images], w[captions], lengths[captions])
    assert got.shape == (5,) and max_diff(got, expected) <= 1e-12


# --------------------------------------------------------------------------- the FLOP count of fast.py's docstring
def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode,n_steps", [("full", 3), ("full", 1), ("full", 4), ("text", 2), ("image", 3)])
def test_flop_formulas_equal_torchs_count_of_each_form(mode, n_steps):
    """fast.flops_per_pair / flops_per_item against torch's own count of the matrix products that the
    paper's loop (original), model.py (plain) and fast.py run on 3 images x 4 captions, all captions
    of 6 words (no padding: the formulas count a caption at its own length)."""
    n_img, n_cap, n_region, n_word, d = 3, 4, 5, 6, DIMS["embed_size"]
    model = make_model(F64, mode=mode, n_steps=n_steps)
    r, w, lengths = _rand(n_img, n_region, d, seed=1), _rand(n_cap, n_word, d, seed=2), torch.full((n_cap,), n_word)
    pairs = n_img * n_cap
    count = {form: fast.flops_per_pair(form, n_region, n_word, d, n_steps, mode) for form in fast.FLOP_FORMS}
    with torch.no_grad():
        assert _counted_flops(lambda: ref.per_caption_similarity(model, r, w, lengths)) == pairs * count["original"]
        assert _counted_flops(lambda: model.similarity(r, w, lengths)) == pairs * count["plain"]
    per_image, per_caption = fast.flops_per_item("fast", n_region, n_word, d, n_steps, mode)
    assert fast.flops_per_item("plain", n_region, n_word, d, n_steps, mode) == (0, 0)
    # with autograd recording (forward only), as FlopCounterMode does not count the in-place baddbmm_ of inference
    got = _counted_flops(lambda: fast.FastMatcher(model)(r.clone().requires_grad_(), w, lengths))
    assert got == pairs * count["fast"] + n_img * per_image + n_cap * per_caption


def test_flop_counts_at_the_documented_size():
    """The numbers of fast.py's docstring: r = 36 regions, captions of 8..16 words (mean over the
    lengths), d = 1024, K = 3, Full IMRAM; and by hand for one length: Text-IMRAM m = 8 words,
    n = 36 regions, Image-IMRAM m = 36, n = 8."""
    mean = {form: sum(fast.flops_per_pair(form, 36, w, 1024, 3) for w in range(8, 17)) / 9 for form in fast.FLOP_FORMS}
    assert [round(mean[f] / 1e9, 3) for f in fast.FLOP_FORMS] == [1.219, 0.816, 0.213]
    assert round(mean["original"] / mean["fast"], 2) == 5.72 and round(mean["plain"] / mean["fast"], 2) == 3.83
    d, m_n = 1024, [(8, 36), (36, 8)]
    assert fast.flops_per_pair("original", 36, 8, d, 3) == sum(3 * 4 * m * n * d + 3 * 8 * m * d * d for m, n in m_n)
    assert fast.flops_per_pair("plain", 36, 8, d, 3) == sum(3 * 4 * m * n * d + 2 * 8 * m * d * d for m, n in m_n)
    assert fast.flops_per_pair("fast", 36, 8, d, 3) == 2 * 36 * 8 * d + sum(
        3 * 2 * m * n * n + 2 * 2 * m * n * d + 2 * 4 * m * n * d + 1 * 4 * m * d * d for m, n in m_n)
