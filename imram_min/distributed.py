"""Training on several processes with exactly the single-process objective.

    torchrun --standalone --nproc_per_node N -m imram_min.train --data D --out R ...

IMRAM's loss looks for the hardest negative of every image among all captions of the batch and
of every caption among all images, so a loss computed per process over its own B/N items trains
a different model. Here ``--batch-size B`` is the *global* batch: every process draws the same
shuffled order (the single-process ``RandomSampler`` with the same seed) and takes its slice of
every global batch of B (``GlobalBatchSampler``; sizes differ by at most one when N does not
divide B, the larger slices first). Each process embeds its slice, gathers every process's
embeddings with their gradients (``gather``), and scores

    rows = F(own images, all captions)  (b_p, B)     cols = F(all images, own captions)  (B, b_p)

which hold every score its own images' and own captions' loss terms need (own x own is scored
once, for ``rows``): a process scores 2 B b - b^2 pairs, B^2 (2/N - 1/N^2) for equal slices, so the
pair matrix is never computed N times, but the scoring does not shrink N-fold either (N = 2: 3/4
of B^2 per process, N = 8: 0.23). With offset o_p of the slice and the single-process loss (model.contrastive_loss)

    L = sum_i max_{j != i} [m - F(i, i) + F(i, j)]_+  +  sum_j max_{i != j} [m - F(j, j) + F(i, j)]_+

process p takes the terms of its own images i in o_p .. o_p + b_p (from ``rows``) and of its own
captions j (from ``cols``), so sum_p L_p = L exactly, hardest negatives included wherever they
lie.

Same-image pairs. A batch item is a caption and its image, so one image can hold two places of a
batch. The original (SCAN layout: 5 captions per image, batches of 128 out of ~145K captions: a
repeat is rare) counts the repeat as a negative, and so does this code on the SCAN layout. In any
other layout (DIR/{split}_cap2img.txt; small data of 1-5 captions per picture, where repeats are
the rule) ``image_ids`` is given and a pair (i, j) whose image and caption belong to the same
picture is no negative: its hinge term is 0, like the diagonal's (else the repeat's cost is the
margin exactly, the hardest negative with no gradient, and the image is pushed away from its
other captions). Gradients: the gather's backward sums every process's gradient into the items' owner, so
process p's parameter gradient is its share of dL/dtheta; DistributedDataParallel then *averages*
over processes, so each process back-propagates N * L_p and the averaged gradient is dL/dtheta.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

from . import fast
from .model import IMRAM, contrastive_loss


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


# --------------------------------------------------------------------------- the loss
def same_image(image_ids: torch.Tensor, offset: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the pairs that are not negatives, from the global batch's image_ids (B,): (b, B)
    own image i vs caption j, (B, b) image i vs own caption j; True where both are of one picture."""
    own = image_ids[offset:offset + b]
    return own[:, None] == image_ids[None, :], image_ids[:, None] == own[None, :]


def hinge_terms(rows: torch.Tensor, cols: torch.Tensor, offset: int, margin: float,
                max_violation: bool, image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """This process's share of ``model.contrastive_loss`` of the global batch.

    rows: (b, B) = F(own images, all captions); cols: (B, b) = F(all images, own captions); own
    items are o .. o + b - 1 of the global batch (o = ``offset``). With b = B, o = 0 and
    rows = cols = sims it is contrastive_loss(sims). image_ids (B,): the picture of each item
    (a layout other than SCAN's): pairs of one picture are no negatives (``same_image``).
    """
    b = rows.shape[0]
    own = torch.arange(b, device=rows.device)
    positive_img = rows[own, offset + own]  # F(i, i) of own images
    positive_cap = cols[offset + own, own]  # F(j, j) of own captions
    cost_cap = (margin + rows - positive_img[:, None]).clamp(min=0)  # image i vs every caption j != i
    cost_img = (margin + cols - positive_cap[None, :]).clamp(min=0)  # caption j vs every image i != j
    if image_ids is None:
        cost_cap = cost_cap.index_put((own, offset + own), cost_cap.new_zeros(()))
        cost_img = cost_img.index_put((offset + own, own), cost_img.new_zeros(()))
    else:  # the diagonal and every other pair of one picture
        same_rows, same_cols = same_image(image_ids.to(rows.device), offset, b)
        cost_cap, cost_img = cost_cap.masked_fill(same_rows, 0.0), cost_img.masked_fill(same_cols, 0.0)
    if max_violation:
        return cost_cap.max(1).values.sum() + cost_img.max(0).values.sum()
    return cost_cap.sum() + cost_img.sum()


def support_loss(model: IMRAM, rows: torch.Tensor, cols: torch.Tensor, offset: int, region_embs: torch.Tensor,
                 word_embs: torch.Tensor, lengths: torch.Tensor, margin: float,
                 image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``hinge_terms(rows, cols, offset, margin, max_violation=True)`` with its gradient, from the 3 b
    pairs it depends on (F10).

    (F10) With hardest negatives the loss is a function of the positives F(i, i), of F(i, j^_i)
    and of F(i^_j, j) alone (j^_i = the argmax of image i's row of costs, i^_j of caption j's
    column), and so is its gradient: dL/dF is 0 on every other pair. So every pair is scored
    without autograd (``rows`` / ``cols``, which pick j^ and i^) and only these pairs are scored
    again with it (``fast.zipped_scores``): back-propagation through 3 b pairs instead of 2 B b - b^2.

    rows (b, B) / cols (B, b): the scores of ``hinge_terms``, without gradient; region_embs
    (B, n_region, d), word_embs (B, n_word, d), lengths (B,): the global batch's embeddings, with
    gradient (``gather``); own items o .. o + b - 1 (o = ``offset``). image_ids (B,): as in
    ``hinge_terms``, pairs of one picture are no negatives.
    """
    b, device = rows.shape[0], rows.device
    own = torch.arange(b, device=device)
    with torch.no_grad():  # the hardest negatives, as hinge_terms picks them
        cost_cap = (margin + rows - rows[own, offset + own][:, None]).clamp(min=0)
        cost_img = (margin + cols - cols[offset + own, own][None, :]).clamp(min=0)
        if image_ids is None:
            cost_cap[own, offset + own] = 0
            cost_img[offset + own, own] = 0
        else:
            image_ids = image_ids.to(device)
            same_rows, same_cols = same_image(image_ids, offset, b)
            cost_cap[same_rows], cost_img[same_cols] = 0, 0
        hard_cap, hard_img = cost_cap.max(1).indices, cost_img.max(0).indices  # j^ of own images, i^ of own captions
    items = offset + own  # global indices of own images and of own captions (pair k is image k, caption k)
    # a hardest "negative" that is no negative (the item itself, or in a sidecar layout one of its picture) adds 0
    ids = torch.arange(len(lengths), device=device) if image_ids is None else image_ids
    neg_cap, neg_img = ids[hard_cap] != ids[items], ids[hard_img] != ids[items]
    images, captions = torch.cat([items, items, hard_img]), torch.cat([items, hard_cap, items])
    n_word = int(lengths[captions.cpu()].max())
    # index_select, not x[index]: its backward (index_add_) sums the rows that repeat in a fixed order;
    # x[index]'s (index_put_ with accumulate) did not on the CPU, and training was not reproducible
    scores = fast.zipped_scores(model, region_embs.index_select(0, images),
                                word_embs[:, :n_word].index_select(0, captions),
                                lengths[captions.cpu()])  # (3b,): F(i, i), F(i, j^_i), F(i^_j, j)
    positive, hard_for_image, hard_for_caption = scores[:b], scores[b:2 * b], scores[2 * b:]
    cost_cap = (margin + hard_for_image - positive).clamp(min=0) * neg_cap  # 0 where j^ is i itself
    cost_img = (margin + hard_for_caption - positive).clamp(min=0) * neg_img
    return cost_cap.sum() + cost_img.sum()


class BatchLoss(nn.Module):
    """(region_feats, tokens, lengths) of this process's slice -> its loss term L_p, to back-propagate.

    Scores ``rows`` / ``cols`` (one process: rows = cols = the (B, B) pair scores) and takes
    ``hinge_terms``; on N processes after the gathers, multiplied by N because DDP averages the
    gradients (see the module docstring). With hardest negatives and ``support`` (the default) the
    pairs are scored without autograd and the loss is ``support_loss`` (F10): the same loss and
    gradients, back-propagated through 3 b pairs. Wrapped in DistributedDataParallel, its forward
    is the whole step. ``score_pairs(model, region_embs, word_embs, lengths)``: the scorer
    (schedule.score_pairs). ``image_ids`` (this process's slice, (b,)): given in a layout other
    than SCAN's, so that pairs of one picture are no negatives (module docstring); None: the original.
    """

    def __init__(self, model: IMRAM, score_pairs, ctx: Context | None = None, support: bool = True):
        super().__init__()
        self.model, self.score_pairs, self.ctx, self.support = model, score_pairs, ctx or Context(), support

    def forward(self, region_feats: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                max_violation: bool, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        model, ctx = self.model, self.ctx
        region_embs = model.encode_images(region_feats)  # (b, n_region, d)
        word_embs = model.encode_captions(tokens, lengths)  # (b, n_word, d)
        sparse = max_violation and self.support
        if ctx.world == 1:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
                sims = self.score_pairs(model, region_embs, word_embs, lengths)  # (B, B)
            if sparse:
                return support_loss(model, sims, sims, 0, region_embs, word_embs, lengths, model.cfg.margin, image_ids)
            if image_ids is not None:
                return hinge_terms(sims, sims, 0, model.cfg.margin, max_violation, image_ids)
            return contrastive_loss(sims, model.cfg.margin, max_violation)
        b = torch.tensor([len(lengths), int(lengths.max())], device=region_embs.device)
        shape = gather_no_grad(b[None], ctx, [1] * ctx.world)  # (world, 2): slice size, longest caption
        sizes, n_word = [int(s) for s in shape[:, 0]], int(shape[:, 1].max())
        all_regions = gather(region_embs, ctx, sizes)  # (B, n_region, d)
        all_words = gather(word_embs, ctx, sizes, (n_word, word_embs.shape[-1]))  # (B, n_word, d)
        all_lengths = gather_no_grad(lengths.to(region_embs.device), ctx, sizes).cpu()
        if image_ids is not None:
            image_ids = gather_no_grad(image_ids.to(region_embs.device), ctx, sizes)
        offset, b = sum(sizes[:ctx.rank]), sizes[ctx.rank]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
            rows = self.score_pairs(model, region_embs, all_words, all_lengths)  # (b, B)
            # (B, b): the other processes' images against own captions; own x own is already in rows
            cols = [rows[:, offset:offset + b]]
            if offset:
                cols.insert(0, self.score_pairs(model, all_regions[:offset], word_embs, lengths))
            if offset + b < len(all_regions):
                cols.append(self.score_pairs(model, all_regions[offset + b:], word_embs, lengths))
            cols = torch.cat(cols)
        if sparse:
            loss = support_loss(model, rows, cols, offset, all_regions, all_words, all_lengths, model.cfg.margin,
                                image_ids)
        else:
            loss = hinge_terms(rows, cols, offset, model.cfg.margin, max_violation, image_ids)
        return loss * ctx.world


def all_reduce_sum(value: float, ctx: Context) -> float:
    """The sum over processes of a Python number (e.g. the loss terms L_p: the global loss)."""
    if ctx.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=ctx.gather_group)
    return float(t)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def similarities(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                 ctx: Context, score_all, **kwargs):
    """All pair scores (n_img, n_cap) as one process's ``score_all`` would give them: process p scores
    its ``rank_slice`` of the images against every caption, and the rows are gathered on every
    process. score_all(model, region_embs, word_embs, lengths, **kwargs) -> (n, n_cap) numpy array
    (schedule.similarities)."""
    if ctx.world == 1:
        return score_all(model, region_embs, word_embs, lengths, **kwargs)
    n_img = region_embs.shape[0]
    own = rank_slice(n_img, ctx.world, ctx.rank)
    part = torch.from_numpy(np.ascontiguousarray(score_all(model, region_embs[own], word_embs, lengths, **kwargs)))
    return gather_no_grad(part, ctx, slice_sizes(n_img, ctx.world)).numpy()
