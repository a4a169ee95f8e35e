"""Training on N processes is the single-process objective on the global batch (imram_min.engineering.distributed).

The multi-process tests spawn 2 processes (gloo on the CPU, one thread each) that talk through a
file in a temporary folder, and write what they computed there for the test to compare.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fixtures import random_feats, random_tokens, spawn_processes, tiny_checkpoint, tiny_data, tiny_model  # noqa: F401
from test_train import TINY as TRAIN_TINY, make_data, read_log

from imram_min.engineering import distributed as D
from imram_min import loss as L
from imram_min import train
from imram_min.engineering import tiling
from imram_min.evaluate.__main__ import main as evaluate_main
from imram_min.engineering.checkpoint import load_checkpoint
from imram_min.loss import contrastive_loss

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
        assert abs(float(L.hinge_terms(sims, sims, 0, 0.2, max_violation) - want)) <= 1e-12


def test_hinge_terms_of_the_slices_sum_to_the_contrastive_loss():
    sims = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for max_violation in (True, False):
        total = 0.0
        for rank in range(3):
            own = D.rank_slice(7, 3, rank)
            total += float(L.hinge_terms(sims[own], sims[:, own], own.start, 0.2, max_violation))
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


def _worker(rank: int, world: int, folder: str, n: int, max_violation: bool = True) -> None:
    torch.set_num_threads(1)
    ctx = D.join(rank, world, f"file://{folder}/rendezvous")
    try:
        feats, tokens, lengths = batch(n)
        own = D.rank_slice(n, world, rank)
        model = double_model()
        ddp = torch.nn.parallel.DistributedDataParallel(L.BatchLoss(model, tiling.score_pairs, ctx))
        loss = ddp(feats[own], tokens[own, :int(lengths[own].max())], lengths[own], max_violation)
        loss.backward()
        grads = {n: p.grad.detach() for n, p in model.named_parameters()}
        total = D.all_reduce_sum(float(loss) / world, ctx)
        torch.save({"loss": total, "grads": grads}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        D.teardown(ctx)


def run_two(tmp_path, n: int, max_violation: bool = True) -> list[dict]:
    spawn_processes(_worker, (WORLD, str(tmp_path), n, max_violation), WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_step(n: int, max_violation: bool = True, support: bool = False):
    """One process's loss, gradients and pair scores; by default the dense loss of every pair
    (loss.contrastive_loss with autograd through all n x n pairs): the reference."""
    feats, tokens, lengths = batch(n)
    model = double_model()
    loss = L.BatchLoss(model, tiling.score_pairs, support=support)(feats, tokens, lengths, max_violation)
    loss.backward()
    with torch.no_grad():
        sims = tiling.score_pairs(model, model.encode_images(feats), model.encode_captions(tokens, lengths), lengths)
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}, sims


def test_the_support_step_is_reproducible_bit_for_bit():
    """The same step again, float32 on 2 threads, gives the same gradients to the bit. The rows a
    batch repeats (hardest negatives) are gathered with index_select, whose backward sums them in a
    fixed order; x[index]'s backward (index_put_ with accumulate) did not on the CPU at this size,
    and two runs of the same flags parted in the first epoch with hardest negatives."""
    from imram_min.model import IMRAM, IMRAMConfig
    torch.manual_seed(0)
    model = IMRAM(IMRAMConfig(vocab_size=40, img_dim=32, word_dim=16, embed_size=64, n_steps=3)).train()
    g = torch.Generator().manual_seed(1)
    feats, tokens = torch.randn(32, 36, 32, generator=g), torch.randint(4, 40, (32, 13), generator=g)
    lengths = torch.randint(5, 14, (32,), generator=g).sort(descending=True).values
    loss_module = L.BatchLoss(model, tiling.score_pairs, support=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, first = step(loss_module, feats, tokens, lengths)
        for _ in range(8):
            model.zero_grad()
            _, again = step(loss_module, feats, tokens, lengths)
            assert all(torch.equal(again[k], first[k]) for k in first)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n", [8, 5])
def test_support_loss_gives_the_dense_loss_and_gradients(n):  # (F10): back-propagation through 3n pairs
    dense_loss, dense_grads, _ = single_step(n)
    loss, grads, _ = single_step(n, support=True)
    assert abs(loss - dense_loss) <= 1e-12 * abs(dense_loss) and loss > 0
    assert set(grads) == set(dense_grads)
    assert max(float((grads[k] - g).abs().max()) for k, g in dense_grads.items()) <= 1e-10  # |g| up to ~50


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


def test_two_processes_give_the_single_process_sum_over_negatives(tmp_path):  # the warm-up epochs' loss
    loss, grads, _ = single_step(5, max_violation=False)
    for r in run_two(tmp_path, 5, max_violation=False):
        assert abs(r["loss"] - loss) <= 1e-10
        assert max(float((r["grads"][name] - g).abs().max()) for name, g in grads.items()) <= 1e-10


def _similarity_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    ctx = D.join(rank, world, f"file://{folder}/rendezvous")
    try:
        feats, tokens, lengths = batch(7, seed=2)
        model = tiny_model(seed=1).eval()
        with torch.no_grad():
            region_embs, word_embs = model.encode_images(feats.float()), model.encode_captions(tokens, lengths)
            sims = D.sharded_similarity_matrix(model, region_embs, word_embs, lengths, ctx, tiling.similarity_matrix)
        np.save(os.path.join(folder, f"sims{rank}.npy"), sims, allow_pickle=False)
    finally:
        D.teardown(ctx)


def test_sharded_similarity_matrix_equals_one_process(tmp_path):
    spawn_processes(_similarity_worker, (WORLD, str(tmp_path)), WORLD)
    feats, tokens, lengths = batch(7, seed=2)
    model = tiny_model(seed=1).eval()
    with torch.no_grad():
        region_embs, word_embs = model.encode_images(feats.float()), model.encode_captions(tokens, lengths)
        want = tiling.similarity_matrix(model, region_embs, word_embs, lengths)
    for r in range(WORLD):
        got = np.load(tmp_path / f"sims{r}.npy", allow_pickle=False)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6


# --------------------------------------------------------------------------- torchrun
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS2 = ["--num-epochs", "2"]


def torchrun(module: str, args: list, n: int = WORLD, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node n -m module args``, one thread per process."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", module,
           *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def weights(path) -> dict:
    return load_checkpoint(path)["model"]


def max_weight_diff(a, b) -> float:
    wa, wb = weights(a), weights(b)
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def train_one_process(data, run, *extra):
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        return train.main(["--data", data, "--out", str(run), *TRAIN_TINY, *extra])


def test_torchrun_two_processes_train_the_one_process_model(tmp_path):
    data = make_data(tmp_path / "data")
    one = train_one_process(data, tmp_path / "one", *EPOCHS2)
    done = torchrun("imram_min.train", ["--data", data, "--out", tmp_path / "two", *TRAIN_TINY, *EPOCHS2])
    assert done.returncode == 0, done.stderr[-2000:]
    two = read_log(tmp_path / "two")[-1]
    assert two["epoch"] == 2 and abs(two["rsum"] - one["rsum"]) <= 1.0
    assert abs(two["train_loss"] - one["train_loss"]) <= 1e-4 * abs(one["train_loss"])
    assert max_weight_diff(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt") <= 1e-4
    assert sorted(os.listdir(tmp_path / "two")) == ["best.pt", "config.json", "last.pt", "log.jsonl"]


def test_a_two_process_checkpoint_resumes_on_one_process_and_back(tmp_path):
    data = make_data(tmp_path / "data")
    train_one_process(data, tmp_path / "straight", *EPOCHS2)
    done = torchrun("imram_min.train", ["--data", data, "--out", tmp_path / "a", *TRAIN_TINY, "--num-epochs", "1"])
    assert done.returncode == 0, done.stderr[-2000:]
    with contextlib.redirect_stdout(io.StringIO()):  # 2 processes -> 1
        train.main(["--resume", str(tmp_path / "a" / "last.pt"), *EPOCHS2])
    assert [e["epoch"] for e in read_log(tmp_path / "a")] == [1, 2]
    assert max_weight_diff(tmp_path / "straight" / "last.pt", tmp_path / "a" / "last.pt") <= 1e-4
    train_one_process(data, tmp_path / "b", "--num-epochs", "1")  # 1 process -> 2
    done = torchrun("imram_min.train", ["--resume", tmp_path / "b" / "last.pt", *EPOCHS2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e["epoch"] for e in read_log(tmp_path / "b")] == [1, 2]
    assert max_weight_diff(tmp_path / "straight" / "last.pt", tmp_path / "b" / "last.pt") <= 1e-4


def test_torchrun_evaluate_gives_the_one_process_metrics(tmp_path, tiny_data, tiny_checkpoint):
    json_one, json_two = tmp_path / "one.json", tmp_path / "two.json"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        evaluate_main([str(tiny_checkpoint), "--data", str(tiny_data), "--device", "cpu", "--json", str(json_one),
                       "--save-sims", str(tmp_path / "one.npy")])
    done = torchrun("imram_min.evaluate", [tiny_checkpoint, "--data", tiny_data, "--device", "cpu",
                                           "--json", json_two, "--save-sims", tmp_path / "two.npy"])
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads(p.read_text()) for p in (json_one, json_two))
    assert one == two
    assert np.abs(np.load(tmp_path / "one.npy") - np.load(tmp_path / "two.npy")).max() <= 1e-6


def test_kill_9_of_one_rank_ends_the_run_and_leaves_complete_checkpoints(tmp_path):
    data, run = make_data(tmp_path / "data", n_train=40), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m",
           "imram_min.train", "--data", data, "--out", str(run), *TRAIN_TINY, "--num-epochs", "50"]
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "last.pt").exists():  # the first epoch's checkpoint: the run is mid-way
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[1][-2000:]
            time.sleep(0.2)
        victim = next(pid for pid in children(agent.pid) if environ_of(pid).get("RANK") == "1")
        os.kill(victim, signal.SIGKILL)
        _, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0 and "SIGKILL" in err, err[-2000:]  # torchrun names the signal and the rank
    epoch = load_checkpoint(run / "last.pt")["train_state"]["epoch"]  # complete, loadable
    assert load_checkpoint(run / "best.pt")["meta"]["epoch"] <= epoch
    assert [e["epoch"] for e in read_log(run)][-1] >= epoch
    with contextlib.redirect_stdout(io.StringIO()):  # the resume continues where last.pt stopped
        entry = train.main(["--resume", str(run / "last.pt"), "--num-epochs", str(epoch + 1)])
    assert entry["epoch"] == epoch + 1


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def environ_of(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
