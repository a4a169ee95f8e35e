"""Score every image against every caption with an exported model dir: numpy + ONNX Runtime, no torch.

    from runtime import Scorer
    scorer = Scorer("runs/default/model")               # device="auto": CUDA if offered, else CPU
    sims = scorer.score(region_feats, ["a dog on a sofa", ...])   # (n_img, n_cap) float32

    sims = scorer.score(["cat.jpg", "cup.png"], captions)        # image files: needs feature_extractor.onnx
    sims = scorer.score("cat.jpg", captions)                     # one picture: (1, n_cap)
    scorer.unknown_words(["a zebra on a sofa"])                  # {0: ["zebra"]}: words read as <unk>

``Scorer`` is the all-pairs scorer on top of ``runtime.engine.Engine`` (model dir, sessions,
tokenisation, encoders, projections, one matcher call).

Bounded memory (``score``): captions are tokenised exactly as in training (runtime.text, at most
MAX_WORDS tokens each), sorted by length and cut into shards of ``shard`` captions
(runtime.tiles.caption_blocks), each padded only to its own longest caption and encoded once;
images are read a group at a time (a np.memmap streams from disk; a group's features,
embeddings and projections stay within GROUP_BYTES), encoded and projected, and scored against
every caption shard (projected once per group) in matcher calls of ``shard`` images x ``shard``
captions. One matcher call holds about shard^2 * ``Engine.per_pair`` values; the default shard
(runtime.tiles.block_sizes, square) keeps that near PAIR_BUDGET values. On the CPU the matcher
calls run side by side on ``workers`` threads, each call single-threaded (one call per core beats
every call split across the cores: ~10% on 2 cores), while the main thread projects the next
caption shard. Padding never changes a score (the matcher masks it exactly), so the result does
not depend on the shard size beyond float rounding. A score that is NaN or Inf is an InputError
(naming the image and caption), never returned.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from .engine import Engine
from .inputs import InputError, check_captions, check_image_paths, check_region_feats, image_paths_or_none
from .text import UNK
from .tiles import caption_blocks

GROUP_BYTES = 256 << 20  # an image group's features + embeddings + projections, at most (float32)
MAX_GROUP = 1024  # images per group, at most


def length_shards(lengths: np.ndarray, step: int):
    """Yield the indices of shards of ``step`` captions of similar length, longest first."""
    yield from caption_blocks(lengths, step)


def progress_ticker(total: int, progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    """A function to call after each block of work: it calls progress(done, total), if given."""
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, total)
    return tick


def output_array(out: np.ndarray | None, n_img: int, n_cap: int) -> np.ndarray:
    """``out`` checked to be float32 (n_img, n_cap), or a new such array when None."""
    if out is None:
        return np.empty((n_img, n_cap), dtype=np.float32)
    if out.shape != (n_img, n_cap) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {(n_img, n_cap)}, got {out.dtype} {out.shape}")
    return out


def check_scores(block: np.ndarray, rows: slice, idx: np.ndarray) -> np.ndarray:
    """``block`` (the scores of images ``rows`` x captions ``idx``) if all finite, else InputError."""
    if not np.isfinite(block).all():
        i, j = np.argwhere(~np.isfinite(block))[0]
        raise InputError(f"the score of image {rows.start + i} and caption {int(idx[j])} is {block[i, j]} "
                         f"(features of too large a magnitude, or a broken model); no scores were kept")
    return block


class Scorer(Engine):
    """The ONNX graphs of a model dir (``runtime.engine.Engine``: model dir, sessions, tokenisation,
    encoders, projections, ``match``) with sharded all-pairs scoring (``score``, ``score_embeddings``).

    Arguments and attributes: those of Engine (model_dir, device, shard, threads, image_batch,
    tf32; manifest, config, vocab, img_dim, embed_size, mode, n_steps, device, provider,
    workers, has_feature_extractor, preprocessing, feature_size, feature_grid).
    """

    def group_size(self, n_region: int, step: int) -> int:
        """Images encoded and projected together: a multiple of ``step`` (the shard), at most
        MAX_GROUP, their features + embeddings + projections within GROUP_BYTES."""
        proj = 4 * self.embed_size if self.projected else 0  # P <= 4d
        per_image = 4 * max(1, n_region) * (self.img_dim + self.embed_size + proj)
        return max(step, min(MAX_GROUP, GROUP_BYTES // per_image) // step * step)

    def _score_group(self, region_embs: np.ndarray, caption_shards: list, step: int, out: np.ndarray,
                     tick: Callable, first: int = 0, region_proj: np.ndarray | None = None) -> None:
        """out (n, n_cap) <- one image group's region_embs (n, n_region, d) x every caption shard
        (indices, word_embs, lengths[, word_proj]) in matcher calls of ``step`` images, the group
        and each caption shard projected once (unless their projections are given: region_proj,
        a shard's word_proj). The calls run on ``self.workers`` threads; the next caption shard is
        projected while they run, and at most three shards' calls are in flight.
        first: the index of the group's first image (for error messages)."""
        if region_proj is None:
            region_proj = self.project("region", region_embs)
        queued = deque()  # (caption indices, [(rows, future)]) of the shards in flight

        def collect():
            idx, calls = queued.popleft()
            for rows, call in calls:
                out[rows, idx] = check_scores(call.result(), slice(first + rows.start, None), idx)
                tick()
        pool = ThreadPoolExecutor(self.workers)
        try:
            for idx, word_embs, lens, *given in caption_shards:
                word_proj = given[0] if given and given[0] is not None else self.project("word", word_embs)
                calls = []
                for i in range(0, len(region_embs), step):
                    rows = slice(i, i + step)
                    calls.append((rows, pool.submit(self.match, region_embs[rows], word_embs, lens,
                                                    None if region_proj is None else region_proj[rows], word_proj)))
                queued.append((idx, calls))
                if len(queued) > 2:
                    collect()
            while queued:
                collect()
        finally:  # on an error (or Ctrl-C) the calls not yet started are dropped
            pool.shutdown(wait=True, cancel_futures=True)

    def score_embeddings(self, region_embs: np.ndarray, word_embs: np.ndarray, lengths: np.ndarray,
                         out: np.ndarray | None = None,
                         progress: Callable[[int, int], None] | None = None,
                         region_proj: np.ndarray | None = None, word_proj: np.ndarray | None = None) -> np.ndarray:
        """Similarities (n_img, n_cap) float32 of every image with every caption, from embeddings:
        region_embs (n_img, n_region, d), word_embs (n_cap, n_word, d) (zeros or anything past each
        length), lengths (n_cap,). As ``score`` does after encoding: captions sorted by length into
        shards, images in groups, matcher calls of shard x shard pairs. out, progress: as ``score``.
        region_proj (n_img, n_region, P), word_proj (n_cap, n_word, P): the items' ``project``, when
        already made (an index that stores them); else made here. Images (and their projections) of
        another float dtype are made float32 by each matcher call, for its own images."""
        region_embs = np.asarray(region_embs)
        word_embs, lengths = np.asarray(word_embs, dtype=np.float32), np.asarray(lengths, dtype=np.int64)
        n_img, n_cap = len(region_embs), len(lengths)
        step = self.shard_size(region_embs.shape[1], word_embs.shape[1])
        out = output_array(out, n_img, n_cap)

        def shard(idx):
            n_word = int(lengths[idx].max())
            return (idx, np.ascontiguousarray(word_embs[idx, :n_word]), lengths[idx],
                    None if word_proj is None else np.ascontiguousarray(word_proj[idx, :n_word], dtype=np.float32))
        caption_shards = [shard(idx) for idx in caption_blocks(lengths, step)]
        tick = progress_ticker(len(caption_shards) * -(-n_img // step), progress)
        group = self.group_size(region_embs.shape[1], step)
        for i in range(0, n_img, group):
            self._score_group(region_embs[i:i + group], caption_shards, step, out[i:i + group], tick, i,
                              None if region_proj is None else region_proj[i:i + group])
        return out

    # ------------------------------------------------------------------ words
    def unknown_words(self, captions: Sequence[str], tokens: np.ndarray | None = None) -> dict[int, list[str]]:
        """{caption index: its words the model's vocabulary lacks, in order, each once} for the
        captions that have any. Such a word is encoded as <unk>, exactly as the model saw unknown
        words in training: the caption is still scored (one of only unknown words too, as
        <start> <unk> ... <end>). tokens: ``tokenize(captions)``'s ids, if already made (n_cap, n_word)."""
        if tokens is None:
            tokens = self.tokenize(captions)[0]
        out = {}
        for i in np.flatnonzero((np.asarray(tokens) == UNK).any(1)):
            words = [w for w in self.tokenizer.tokenize(captions[i]) if self.vocab(w) == UNK]  # the folder's rules
            out[int(i)] = list(dict.fromkeys(words))
        return out

    # ------------------------------------------------------------------ all pairs
    def score(self, region_feats, captions: Sequence[str], out: np.ndarray | None = None,
              progress: Callable[[int, int], None] | None = None, check: bool = True,
              captions_name: str = "captions") -> np.ndarray:
        """Similarities (n_img, n_cap) float32 of every image with every caption.

        region_feats: (n_img, n_region, img_dim) float array or memmap (read a group at a time),
        or a list of image file paths (decoded a batch at a time while scoring; needs a model dir
        exported with --feature-extractor), or one image file path (str or os.PathLike: n_img = 1).
        captions: list of strings, at most MAX_WORDS tokens
        each. out: an (n_img, n_cap) float32 array to fill (e.g. a memmap), else a new array.
        progress(done, total) is called after each block of work (a caption shard, a batch of
        pictures, an image x caption shard). captions_name: what error messages call the captions.
        InputError for bad input, and for a score that comes out NaN or Inf.
        """
        if isinstance(region_feats, (str, os.PathLike)):  # one picture
            region_feats = [region_feats]
        paths = image_paths_or_none(region_feats)
        if paths is not None:
            paths = check_image_paths(paths)
            self.require_feature_extractor()
            n_img, n_region = len(paths), self.feature_grid ** 2
        else:
            if check:
                region_feats = check_region_feats(region_feats, self.img_dim)
            n_img, n_region, _ = region_feats.shape
        captions = check_captions(captions, captions_name)
        tokens, lengths = self.tokenize(captions, captions_name)
        step = self.shard_size(n_region, tokens.shape[1])
        group = self.group_size(n_region, step)
        n_cap_shards, n_img_shards = -(-len(captions) // step), -(-n_img // step)
        total = n_cap_shards * (1 + n_img_shards)
        if paths is not None:  # + the batches of pictures of every image group
            total += sum(-(-min(group, n_img - i) // self.image_batch) for i in range(0, n_img, group))
        out = output_array(out, n_img, len(captions))
        tick = progress_ticker(total, progress)
        caption_shards = []
        for shard in self.caption_shards(tokens, lengths, step):
            caption_shards.append(shard)
            tick()
        for i in range(0, n_img, group):
            if paths is None:
                feats = region_feats[i:i + group]
            else:
                feats = np.empty((min(group, n_img - i), n_region, self.img_dim), dtype=np.float32)
                for j, batch in self._feature_batches(paths[i:i + group]):
                    feats[j:j + len(batch)] = batch
                    tick()
            self._score_group(self.encode_images(feats, check=False), caption_shards, step, out[i:i + group],
                              tick, i)
        return out
