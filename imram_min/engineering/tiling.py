"""Tiling: how the pair matrix is cut into blocks and run on this machine.

Nothing here changes a score: ``imram_min.model`` states the method and ``imram_min.fast`` its exact
restructuring; this file decides block sizes, caption bucketing by length, worker threads, activation
checkpointing and allocator settings. ``tiled_similarity`` is the one tiler of the pair matrix (its plan is
``runtime.tiles``', shared with the runtime); training (``score_pairs``) and evaluation
(``similarity_matrix``) both go through it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm import tqdm

from imram_min.fast import FastMatcher, direction_weights, projections
from imram_min.model import IMRAM
from runtime import tiles


GROUP_BLOCKS = 16  # caption blocks whose captions are on the device at once, their blocks on one pool of workers
CAPTION_BLOCK = 8  # captions per block at most: few captions of similar length pad little (bucketing)
CPU_MAX_ELEMS = 1 << 22  # values in a block's largest per-pair tensor on a CPU (16 MB in float32: stays in cache)
CUDA_MAX_ELEMS = 1 << 26  # the same on a GPU: the CPU bound leaves a GPU launch-bound


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


def tiled_similarity(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                     max_elems: int | None = None, checkpoint: bool = False, workers: int | None = None,
                     device: str | torch.device | None = None, progress: bool = False) -> torch.Tensor:
    """Pair scores (n_img, n_cap), equal to ``model.similarity``, in bounded-memory blocks: THE one tiler.

    region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d), lengths (n_cap,), on any
    device; scored on ``device`` (default: region_embs's), the result on it too. The plan is
    ``runtime.tiles``': captions sorted by length (longest first) in blocks of at most
    CAPTION_BLOCK, each padded only to its own longest caption (bucketing) and moved to the device
    GROUP_BLOCKS caption blocks at a time, whose blocks share one pool of workers (5 image slices of
    one caption block on 2 workers left one idle a sixth of the time: -10% pairs/s); within a caption block, image slices such that a block's largest per-pair
    tensor holds at most ``max_elems`` values (default CPU_MAX_ELEMS, CUDA_MAX_ELEMS on a GPU).
    The per-item projections of ``imram_min.fast`` are made once per item: the images' once for
    the call (n_img x n_region x P on the device), the captions' once per caption block.

    checkpoint (training): each block's activations are recomputed in the backward pass instead
    of stored, so the memory of a training step is that of one block plus the (n_img, n_cap)
    scores. workers: threads scoring blocks side by side (None: ``block_workers``; 1: one block
    after another). progress: a tqdm bar over the blocks. Differentiable.
    """
    device = region_embs.device if device is None else torch.device(device)
    n_img, n_region, d = region_embs.shape
    n_cap, n_word = word_embs.shape[:2]
    if max_elems is None:
        max_elems = CUDA_MAX_ELEMS if device.type == "cuda" else CPU_MAX_ELEMS
    regions = region_embs.to(device)
    if n_img == 0 or n_cap == 0:
        return regions.new_zeros(n_img, n_cap)
    lengths_cpu = lengths.cpu()
    per_pair = lambda n_word: max(n_region, n_word) * 2 * d  # noqa: E731  values of the largest per-pair tensor
    # the plan: caption blocks (similar lengths, longest first), then per caption block its image slices
    _, cap_block = tiles.block_sizes(n_img, n_cap, per_pair(n_word), max_elems, CAPTION_BLOCK)
    plan = []
    for idx in tiles.caption_blocks(lengths_cpu.numpy(), cap_block):
        block_word = int(lengths_cpu[idx].max())  # this caption block is padded to its own longest caption
        img_block, _ = tiles.block_sizes(n_img, len(idx), per_pair(block_word), max_elems, CAPTION_BLOCK)
        plan.append((idx, block_word, tiles.pair_blocks(n_img, img_block, [idx])))

    matcher = FastMatcher(model)
    weights = direction_weights(model)
    region_proj = projections(model, regions, "region", weights)  # (F1), (F2) of fast.py: once per image
    grad = torch.is_grad_enabled()
    workers = block_workers(device, grad) if workers is None else workers
    cols = []
    with tqdm(total=sum(len(blocks) for *_, blocks in plan), desc="similarities", disable=not progress,
              leave=False) as bar:
        def score_block(job):
            (images, _), words, lens, words_proj = job
            args = (regions[images], words, lens, None if region_proj is None else region_proj[images],
                    words_proj, weights)
            scores = activation_checkpoint(matcher, *args, use_reentrant=False) if checkpoint and grad \
                else matcher(*args)
            bar.update(1)
            return scores

        for group in range(0, len(plan), GROUP_BLOCKS):  # one pool of workers for many blocks: balanced load
            jobs = []
            for idx, block_word, blocks in plan[group:group + GROUP_BLOCKS]:
                caps = torch.from_numpy(idx)
                words = word_embs[caps.to(word_embs.device), :block_word].to(device)  # moved in its turn
                lens = lengths[caps.to(lengths.device)]
                words_proj = projections(model, words, "word", weights)  # once per caption
                jobs += [(block, words, lens, words_proj) for block in blocks]
            scores = iter(in_worker_threads(score_block, jobs, workers))
            for idx, block_word, blocks in plan[group:group + GROUP_BLOCKS]:
                cols.append(torch.cat([next(scores) for _ in blocks], 0))  # (n_img, len(idx))
    order = torch.from_numpy(np.concatenate([idx for idx, *_ in plan]))
    scores = torch.cat(cols, 1)
    return scores[:, torch.argsort(order).to(scores.device)]


STORE_FRACTION = 0.5  # recompute when a step's stored pair activations would exceed this share of free memory


def stored_activation_bytes(model: IMRAM, n_img: int, n_cap: int, n_region: int, n_word: int) -> int:
    """Estimated float32 bytes autograd keeps for the pair scores of one training step without
    recomputation: per pair, direction and step the attention weights (a few n_query x n_context
    tensors) and, for each memory update, two (n_query, 2d) tensors. Calibrated on the one
    measurement there is: batch 128, d = 1024, 36 regions, captions of 16 words on an H100 peaked at
    30.2 GB without recomputation; this gives 28.6 GB for its pairs."""
    cfg = model.cfg
    if cfg.mode == "mean":
        return 0
    sides = {"text": (n_word, n_region), "image": (n_region, n_word)}  # (n_query, n_context)
    per_pair = sum(cfg.n_steps * 3 * n_q * n_c + (cfg.n_steps - 1) * 2 * n_q * 2 * cfg.embed_size
                   for name, (n_q, n_c) in sides.items() if name in model.mdus())
    return 4 * per_pair * n_img * n_cap


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: the GPU's (cudaMemGetInfo), or the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def needs_recomputation(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor) -> bool:
    """Recompute each block's activations in the backward pass (activation checkpointing, ~1.6x slower
    on an H100) only when storing them would take more than STORE_FRACTION of the free memory."""
    if not torch.is_grad_enabled():
        return False
    free = free_memory(region_embs.device)
    need = stored_activation_bytes(model, region_embs.shape[0], word_embs.shape[0], region_embs.shape[1],
                                   word_embs.shape[1])
    return need > STORE_FRACTION * free if free is not None else region_embs.is_cuda


def score_pairs(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
    """THE single call site of pair scoring in training (loss.BatchLoss): ``tiled_similarity`` on the
    batch's device.

    region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d), lengths (n_cap,) -> (n_img, n_cap).
    With hardest negatives training calls it without autograd (``loss.support_loss``
    re-scores the 3B pairs the loss depends on). With autograd (warm-up epochs, --no-max-violation)
    each block of pairs is recomputed in the backward pass instead of stored only when the step's
    activations would not fit (``needs_recomputation``): at batch 128, d = 1024 on a GPU of 80 GB
    they are stored (185 vs 114 samples/s on an H100), on one of 24 GB recomputed.
    """
    return tiled_similarity(model, region_embs, word_embs, lengths,
                            checkpoint=needs_recomputation(model, region_embs, word_embs))


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda if available else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def similarity_matrix(model: IMRAM, region_embs: torch.Tensor, word_embs: torch.Tensor, lengths: torch.Tensor,
                      device: str | torch.device = "cpu", progress: bool = False) -> np.ndarray:
    """All pair scores (n_img, n_cap) as float32 numpy, for evaluation: ``tiled_similarity`` on ``device``.

    region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d), lengths (n_cap,), on any
    device (e.g. a whole split on the CPU); each caption block is moved to ``device`` in its turn.
    """
    model.eval()
    scores = tiled_similarity(model, region_embs, word_embs, lengths, device=device, progress=progress)
    return scores.float().cpu().numpy()
