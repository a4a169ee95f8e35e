"""Training on N processes is the single-process objective on the global batch (imram_min.distributed).

The multi-process tests spawn 2 processes (gloo on the CPU, one thread each) that talk through a
file in a temporary folder, and write what they computed there for the test to compare.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fixtures import TINY, random_feats, random_tokens, tiny_model  # noqa: F401

from imram_min import distributed as D
from imram_min import schedule
from imram_min.model import contrastive_loss

WORLD = 2


# --------------------------------------------------------------------------- one process
def test_slices_cover_the_batch_in_order_larger_first():
    assert D.slice_sizes(5, 2) == [3, 2]
    assert D.slice_sizes(6, 4) == [2, 2, 1, 1]
    assert [D.rank_slice(5, 2, r) for r in range(2)] == [slice(0, 3), slice(3, 5)]


def test_one_process_sampler_gives_dataloader_shuffle_batches():
    data = list(range(23))
    plain = torch.utils.data.DataLoader(data, batch_size=5, shuffle=True,
                                        generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sampler = D.GlobalBatchSampler(torch.utils.data.RandomSampler(data, generator=g), 5)
    ours = torch.utils.data.DataLoader(data, batch_sampler=sampler, generator=g)
    for _ in range(2):  # two epochs: the generator advances the same way
        assert [b.tolist() for b in ours] == [b.tolist() for b in plain]


def test_process_slices_of_every_global_batch_concatenate_to_it():
    data = list(range(23))

    def batches(rank, world):
        g = torch.Generator().manual_seed(1)
        return list(D.GlobalBatchSampler(torch.utils.data.RandomSampler(data, generator=g), 5, rank, world))
    single = batches(0, 1)
    parts = [batches(r, 2) for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == single


def test_hinge_terms_of_the_whole_batch_are_the_contrastive_loss():
    sims = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for max_violation in (True, False):
        want = contrastive_loss(sims, 0.2, max_violation)
        assert abs(float(D.hinge_terms(sims, sims, 0, 0.2, max_violation) - want)) <= 1e-12


def test_hinge_terms_of_the_slices_sum_to_the_contrastive_loss():
    sims = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for max_violation in (True, False):
        total = 0.0
        for rank in range(3):
            own = D.rank_slice(7, 3, rank)
            total += float(D.hinge_terms(sims[own], sims[:, own], own.start, 0.2, max_violation))
        assert abs(total - float(contrastive_loss(sims, 0.2, max_violation))) <= 1e-12


# --------------------------------------------------------------------------- two processes
def batch(n: int, seed: int = 0):
    lengths = [3 + (7 * i) % 6 for i in range(n)]
    tokens, lengths = random_tokens(lengths, vocab_size=40, seed=seed)
    return random_feats(n, 5, seed=seed).double(), tokens, lengths


def double_model():
    return tiny_model(seed=0, n_steps=3).double().train()


def step(loss_module, feats, tokens, lengths):
    """loss, {name: gradient} of one forward + backward."""
    loss = loss_module(feats, tokens, lengths, True)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in loss_module.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, folder: str, n: int) -> None:
    torch.set_num_threads(1)
    ctx = D.join(rank, world, f"file://{folder}/rendezvous")
    try:
        feats, tokens, lengths = batch(n)
        own = D.rank_slice(n, world, rank)
        model = double_model()
        ddp = torch.nn.parallel.DistributedDataParallel(D.BatchLoss(model, schedule.score_pairs, ctx))
        loss = ddp(feats[own], tokens[own, :int(lengths[own].max())], lengths[own], True)
        loss.backward()
        grads = {n: p.grad.detach() for n, p in model.named_parameters()}
        total = D.all_reduce_sum(float(loss) / world, ctx)
        torch.save({"loss": total, "grads": grads}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        D.teardown(ctx)


def run_two(tmp_path, n: int) -> list[dict]:
    mp.start_processes(_worker, args=(WORLD, str(tmp_path), n), nprocs=WORLD, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_step(n: int):
    feats, tokens, lengths = batch(n)
    model = double_model()
    loss = D.BatchLoss(model, schedule.score_pairs)(feats, tokens, lengths, True)
    loss.backward()
    with torch.no_grad():
        sims = schedule.score_pairs(model, model.encode_images(feats), model.encode_captions(tokens, lengths), lengths)
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}, sims


@pytest.mark.parametrize("n", [6, 5])  # 5: the batch does not divide by 2 (slices of 3 and 2)
def test_two_processes_give_the_single_process_loss_and_gradients(tmp_path, n):
    loss, grads, sims = single_step(n)
    # the premise: some hardest negatives of process 0's items lie in process 1's slice
    own = D.rank_slice(n, WORLD, 0)
    off_diag = sims - torch.diag(torch.full((n,), float("inf"), dtype=sims.dtype))
    assert (off_diag[own].argmax(1) >= own.stop).any() or (off_diag[:, own].argmax(0) >= own.stop).any()
    results = run_two(tmp_path, n)
    for r in results:
        assert abs(r["loss"] - loss) <= 1e-10
        assert set(r["grads"]) == set(grads)
        for name, g in grads.items():
            assert float((r["grads"][name] - g).abs().max()) <= 1e-10, name


def _similarity_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    ctx = D.join(rank, world, f"file://{folder}/rendezvous")
    try:
        feats, tokens, lengths = batch(7, seed=2)
        model = tiny_model(seed=1).eval()
        with torch.no_grad():
            sims = D.similarities(model, model.encode_images(feats.float()), model.encode_captions(tokens, lengths),
                                  lengths, ctx, schedule.similarities)
        np.save(os.path.join(folder, f"sims{rank}.npy"), sims, allow_pickle=False)
    finally:
        D.teardown(ctx)


def test_distributed_similarities_equal_one_process(tmp_path):
    mp.start_processes(_similarity_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    feats, tokens, lengths = batch(7, seed=2)
    model = tiny_model(seed=1).eval()
    with torch.no_grad():
        want = schedule.similarities(model, model.encode_images(feats.float()), model.encode_captions(tokens, lengths),
                                     lengths)
    for r in range(WORLD):
        got = np.load(tmp_path / f"sims{r}.npy", allow_pickle=False)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6
