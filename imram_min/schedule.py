"""Scheduling: how the pair matrix is cut into blocks and run on this machine.

Nothing here changes a score: ``imram_min.model`` states the method and ``imram_min.fast`` its exact
restructuring; this file decides block sizes, caption bucketing by length, worker threads, activation
checkpointing and allocator settings. Training, evaluation, the benchmarks and export share it.
"""
from __future__ import annotations

import ctypes
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm import tqdm

from .fast import FastMatcher, direction_weights, projections
from .model import IMRAM


MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30  # bytes, glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD


def retain_freed_memory() -> bool:
    """Let glibc keep freed blocks for reuse instead of handing them back to the OS at once.

    Blocks of pairs allocate and free tensors of ~16 MB many times a second; with glibc's
    defaults each is mapped afresh and its pages faulted in again (on a 2-core CPU that was
    ~15% of scoring time, in the kernel). Sets M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to
    MMAP_THRESHOLD (32 MB) and TRIM_THRESHOLD (1 GB) for this process. Called by the training
    and evaluation commands (the benchmarks set the same through the environment, for every
    scorer alike); a no-op returning False off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return (bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD))
                and bool(libc.mallopt(m_trim_threshold, TRIM_THRESHOLD)))
    except (OSError, AttributeError):
        return False


CAPTION_BLOCK = 8  # captions per block at most: few captions of similar length pad little (bucketing)


def pair_block_sizes(n_img: int, n_cap: int, n_region: int, n_word: int, d: int, max_elems: int):
    """Images and captions per block so that one per-pair state tensor holds at most ``max_elems`` values."""
    per_pair = max(n_region, n_word) * 2 * d
    pairs = max(1, max_elems // per_pair)
    cap_block = max(1, min(n_cap, pairs, CAPTION_BLOCK))
    img_block = max(1, min(n_img, pairs // cap_block))
    return img_block, cap_block


def block_workers(device: torch.device, grad: bool) -> int:
    """Threads that score blocks side by side: torch's intra-op threads for CPU inference, else 1.

    On a CPU, blocks of pairs are independent; scoring one block per core with single-threaded
    kernels beats splitting every kernel across the cores: the many small per-pair passes then
    keep every core busy and no kernel waits at a barrier (2 cores: ~10% more pairs/s).
    Training (autograd) and CUDA score blocks one after another.
    """
    return 1 if grad or device.type != "cpu" else max(1, torch.get_num_threads())


def in_worker_threads(fn, jobs: list, workers: int) -> list:
    """[fn(job) for job in jobs], on ``workers`` threads that each run single-threaded kernels
    (torch releases the GIL inside its kernels) in the caller's grad mode. The caller's thread
    count is restored after."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()  # grad mode is per thread

    def run(job):
        with torch.set_grad_enabled(grad):
            return fn(job)
    try:
        with ThreadPoolExecutor(min(workers, len(jobs)), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(run, jobs))
    finally:
        torch.set_num_threads(threads)  # MKL's thread count is process-wide


def similarity(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
               max_elems: int = 1 << 22, checkpoint: bool = False, workers: int | None = None) -> torch.Tensor:
    """Similarities (n_img, n_cap), equal to ``model.similarity``, in bounded-memory blocks.

    Captions are sorted by length so that each block is padded only to its own longest caption
    (bucketing), then put back in their order. ``max_elems`` bounds the largest per-pair tensor
    of a block (default 4M values, 16 MB in float32: small blocks stay in cache). With ``checkpoint`` (training) each block's
    activations are recomputed in the backward pass instead of stored, so the memory of a
    training step is that of one block plus the (n_img, n_cap) scores. ``workers``: threads
    scoring blocks side by side (None: ``block_workers``; 1: one block after another).
    """
    matcher = FastMatcher(model)
    lengths_cpu = lengths.cpu()
    order = torch.argsort(lengths_cpu, descending=True, stable=True)
    n_img, n_region, d = region_embs.shape
    n_cap = word_embs.shape[0]
    img_block, cap_block = pair_block_sizes(n_img, n_cap, n_region, word_embs.shape[1], d, max_elems)
    # per-item projections once for the whole shard, not once per block (restructurings 1 and 2)
    weights = direction_weights(model)
    region_proj = projections(model, region_embs, "region", weights)
    word_proj = projections(model, word_embs, "word", weights)
    grad = torch.is_grad_enabled()
    workers = block_workers(region_embs.device, grad) if workers is None else workers
    cap_blocks = []
    for j in range(0, n_cap, cap_block):  # longest captions first: the costliest blocks start first
        idx = order[j:j + cap_block]
        n_word = int(lengths_cpu[idx].max())
        idx_dev = idx.to(word_embs.device)
        cap_blocks.append((word_embs[idx_dev, :n_word], lengths[idx.to(lengths.device)],
                           None if word_proj is None else word_proj[idx_dev, :n_word]))

    def score_block(job):
        (words, lens, words_proj), i = job
        regions_proj = None if region_proj is None else region_proj[i:i + img_block]
        args = (region_embs[i:i + img_block], words, lens, regions_proj, words_proj, weights)
        if checkpoint and grad:
            return activation_checkpoint(matcher, *args, use_reentrant=False)
        return matcher(*args)

    jobs = [(caps, i) for caps in cap_blocks for i in range(0, n_img, img_block)]
    blocks = iter(in_worker_threads(score_block, jobs, workers))
    cols = [torch.cat([next(blocks) for _ in range(0, n_img, img_block)], 0) for _ in cap_blocks]
    sims = torch.cat(cols, 1)
    return sims[:, torch.argsort(order).to(sims.device)]


CUDA_MAX_ELEMS = 1 << 26  # similarity's block size on a GPU: its CPU default leaves a GPU launch-bound


def score_pairs(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
    """THE single call site of pair scoring, for evaluation and for training (train.py imports it).

    region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d), lengths (n_cap,) -> (n_img, n_cap).
    Differentiable. The exact fast form (``imram_min.fast``); the reference form is
    ``model.similarity``, and the tests hold the two together. When training on a GPU, each block
    of pairs is recomputed in the backward pass instead of stored (activation checkpointing),
    which bounds the memory of a step at batch 128, d = 1024.
    """
    if not region_embs.is_cuda:
        return similarity(model, region_embs, word_embs, lengths)
    return similarity(model, region_embs, word_embs, lengths, max_elems=CUDA_MAX_ELEMS,
                           checkpoint=torch.is_grad_enabled())


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda if available else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def similarities(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                 device: str | torch.device = "cpu", shard_size: int = 128, progress: bool = False) -> np.ndarray:
    """All pair scores (n_img, n_cap) float32, computed in shards of ``shard_size`` images x captions.

    region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d), lengths (n_cap,), on any
    device; each caption shard is trimmed to its own longest caption before it is scored.
    """
    model.eval()
    device = torch.device(device)
    n_img, n_cap = region_embs.shape[0], word_embs.shape[0]
    sims = np.zeros((n_img, n_cap), dtype=np.float32)
    regions = region_embs.to(device)
    lengths = lengths.cpu()
    n_shards = math.ceil(n_img / shard_size) * math.ceil(n_cap / shard_size)
    with tqdm(total=n_shards, desc="similarities", disable=not progress, leave=False) as bar:
        for j in range(0, n_cap, shard_size):
            lens = lengths[j:j + shard_size]
            words = word_embs[j:j + shard_size, :int(lens.max())].to(device)
            for i in range(0, n_img, shard_size):
                block = score_pairs(model, regions[i:i + shard_size], words, lens)
                sims[i:i + shard_size, j:j + shard_size] = block.float().cpu().numpy()
                bar.update(1)
    return sims
