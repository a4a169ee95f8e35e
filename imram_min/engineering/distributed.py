"""Training on several processes with exactly the single-process objective: the processes' plumbing.

    torchrun --standalone --nproc_per_node N -m imram_min.train --data D --out R ...

IMRAM's loss (12) looks for the hardest negative of every image among all captions of the batch
and of every caption among all images, so a loss computed per process over its own B/N items
trains a different model. Here ``--batch-size B`` is the *global* batch: every process draws the
same shuffled order (the single-process ``RandomSampler`` with the same seed) and takes its slice
of every global batch of B (``GlobalBatchSampler``; sizes differ by at most one when N does not
divide B, the larger slices first). Each process embeds its slice, gathers every process's
embeddings with their gradients (``gather``), and scores

    rows = F(own images, all captions)  (b_p, B)     cols = F(all images, own captions)  (B, b_p)

which hold every score its own images' and own captions' loss terms need (own x own is scored
once, for ``rows``): a process scores 2 B b - b^2 pairs, B^2 (2/N - 1/N^2) for equal slices, so the
pair matrix is never computed N times, but the scoring does not shrink N-fold either (N = 2: 3/4
of B^2 per process, N = 8: 0.23). Process p's loss term L_p is ``imram_min.loss.hinge_terms`` of
its slice (or its ``support_loss``), sum_p L_p = L exactly; ``imram_min.loss.BatchLoss`` is the
whole step, and ``imram_min.loss``'s docstring the argument (and why each process
back-propagates N * L_p).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

from imram_min.model import IMRAM


@dataclass
class Context:
    """Where this process stands: rank of world processes; ``gather_group``: a process group of its
    own for the embedding gathers, so that they never interleave with DDP's gradient all-reduces."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    gather_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_type: str) -> Context:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    nccl on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on the CPU. One process: nothing."""
    if not launched_by_torchrun():
        return Context()
    return join(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", device_type,
                int(os.environ.get("LOCAL_RANK", "0")))


def join(rank: int, world: int, init_method: str, device_type: str = "cpu", local_rank: int = 0) -> Context:
    """init_process_group (nccl on CUDA, else gloo) and a second group for the embedding gathers."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    return Context(rank, world, local_rank, dist.new_group(backend=backend))


def teardown(ctx: Context) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the global batch
def slice_sizes(n: int, world: int) -> list[int]:
    """Items of a batch of n per process: n // world each, the first n % world one more."""
    return [n // world + (r < n % world) for r in range(world)]


def rank_slice(n: int, world: int, rank: int) -> slice:
    """This process's slice of a global batch of n items."""
    sizes = slice_sizes(n, world)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of ``sampler``'s order, ``batch_size`` at a time (the last one smaller), of which this
    process yields its ``rank_slice``. With world = 1 exactly DataLoader(shuffle=True)'s batches,
    drawing the same random numbers, so a run on N processes visits the same global batches."""

    def __init__(self, sampler: torch.utils.data.Sampler, batch_size: int, rank: int = 0, world: int = 1):
        if batch_size < world:
            raise ValueError(f"the global batch ({batch_size}) must give every one of {world} processes an item")
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def _slice(self, batch: list[int]) -> list[int]:
        return batch[rank_slice(len(batch), self.world, self.rank)]

    def __iter__(self):
        batch = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield self._slice(batch)
                batch = []
        if batch:
            yield self._slice(batch)


def _padded(x: torch.Tensor, rows: int, trailing: tuple[int, ...]) -> torch.Tensor:
    """x (n, ...) in zeros of shape (rows, *trailing); differentiable (gradients reach x)."""
    padded = x.new_zeros((rows, *trailing))
    padded[tuple(slice(0, s) for s in x.shape)] = x
    return padded


def gather(x: torch.Tensor, ctx: Context, sizes: list[int], pad_to: tuple[int, ...] | None = None) -> torch.Tensor:
    """Every process's ``x`` (sizes[p], ...) concatenated in rank order (sum(sizes), ...), gradients
    flowing back to each owner (the gather's backward sums each process's gradient of every item into
    the item's owner). ``pad_to``: the trailing shape every process pads to first (e.g. the longest
    caption of the global batch); the padding is zeros."""
    if ctx.world == 1:
        return x
    trailing = tuple(x.shape[1:]) if pad_to is None else tuple(pad_to)
    parts = all_gather_with_grad(_padded(x, max(sizes), trailing), group=ctx.gather_group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, ctx: Context, sizes: list[int]) -> torch.Tensor:
    """``gather`` of values without gradients (lengths, shapes, scores)."""
    if ctx.world == 1:
        return x
    parts = [x.new_empty((max(sizes), *x.shape[1:])) for _ in sizes]
    dist.all_gather(parts, _padded(x, max(sizes), tuple(x.shape[1:])), group=ctx.gather_group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def all_reduce_sum(value: float, ctx: Context) -> float:
    """The sum over processes of a Python number (e.g. the loss terms L_p: the global loss)."""
    if ctx.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=ctx.gather_group)
    return float(t)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sharded_similarity_matrix(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                              ctx: Context, score_all, **kwargs):
    """All pair scores (n_img, n_cap) as one process's ``score_all`` would give them: process p scores
    its ``rank_slice`` of the images against every caption, and the rows are gathered on every
    process. score_all(model, region_embs, word_embs, lengths, **kwargs) -> (n, n_cap) numpy array
    (tiling.similarity_matrix)."""
    if ctx.world == 1:
        return score_all(model, region_embs, word_embs, lengths, **kwargs)
    n_img = region_embs.shape[0]
    own = rank_slice(n_img, ctx.world, ctx.rank)
    part = torch.from_numpy(np.ascontiguousarray(score_all(model, region_embs[own], word_embs, lengths, **kwargs)))
    return gather_no_grad(part, ctx, slice_sizes(n_img, ctx.world)).numpy()
