"""The loss that trains IMRAM: formula (12), its terms per slice of a batch, and the exact 3B-pair form (F10).

Symbols: the table in ``imram_min.model``'s docstring. A batch holds B matching pairs, image i
with caption i (position i of the batch); F(i, j) = F(image i, caption j) (11) are the pair scores,
Delta the margin. Here, as in the table's last row, i and j index images and captions.

    (12) L = sum_i max_{j != i} [Delta - F(i, i) + F(i, j)]_+  +  sum_j max_{i != j} [Delta - F(j, j) + F(i, j)]_+

with hardest negatives (``max_violation``, VSE++, the paper's); without, each max is a sum over
the negatives. Four functions compute it, each equal to the one before:

* ``contrastive_loss(pair_scores)``: (12) on the (B, B) pair scores, the definition; autograd
  runs through all B^2 pairs.
* ``hinge_terms(rows, cols, offset)``: the terms of (12) that belong to a slice of the batch, its
  b positions o .. o + b - 1: their images (the first sum) and captions (the second), from
  rows = F(own images, all captions) (b, B) and cols = F(all images, own captions) (B, b): every
  score these terms read. The slices' terms sum to L exactly, hardest negatives included
  wherever they lie: this is how N processes share one batch
  (``imram_min.engineering.distributed``); one process: b = B, o = 0.
* ``support_loss``: ``hinge_terms`` with hardest negatives, the gradient through 3b pairs (F10).
* ``BatchLoss``: what ``imram_min.train`` calls per batch: encode, score, and one of the above.

(F10) the loss scores only the pairs it depends on. With hardest negatives, write
j^_i = argmax_{j != i} F(i, j) (image i's hardest caption) and i^_j = argmax_{i != j} F(i, j)
(caption j's hardest image). Then

    L = sum_i [Delta - F(i, i) + F(i, j^_i)]_+  +  sum_j [Delta - F(j, j) + F(i^_j, j)]_+

taking j^_i, i^_j where ``hinge_terms`` takes its maxima, the largest hinge costs (where the
largest cost is positive that is the argmax of the scores, [Delta - F(i, i) + .]_+ increasing
there; where it is 0 the term and its gradient are 0 whichever index). The indices are piecewise
constant in the scores and carry no gradient, so dL/dF(i, j) is 0 on every pair but (i, i),
(i, j^_i) and (i^_j, j): 3B pairs out of B^2. So ``support_loss`` scores every pair without
autograd (``rows``, ``cols``: they only pick j^ and i^), then scores these 3b pairs again with
autograd (``fast.zipped_scores``) and takes the hinge of them: the same value and the same
gradient as ``hinge_terms`` (to float precision: the re-scored pairs are the same numbers,
computed one pair at a time), back-propagated through 3b pairs instead of 2 B b - b^2.

Same-image pairs. A batch position holds a caption and its image, so one image can hold two
positions of a batch. The original (SCAN layout: 5 captions per image, batches of 128 out of
~145K captions: a repeat is rare) counts the repeat as a negative, and so does this code on the SCAN layout. In any
other layout (DIR/{split}_cap2img.txt; small data of 1-5 captions per picture, where repeats are
the rule) ``image_ids`` is given and a pair (i, j) whose image and caption belong to the same
picture is no negative: its hinge term is 0, like the diagonal's (else the repeat's cost is the
margin exactly, the hardest negative with no gradient, and the image is pushed away from its
other captions).

Gradients on N processes: the gather's backward sums every process's gradient into the process
that owns the embeddings, so process p's parameter gradient is its share of dL/dtheta;
DistributedDataParallel then *averages* over processes, so each process back-propagates N * L_p and the averaged gradient is
dL/dtheta.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from imram_min import fast
from imram_min.engineering.distributed import Context, gather, gather_no_grad
from imram_min.model import IMRAM


# --------------------------------------------------------------------------- (12), the definition
def contrastive_loss(pair_scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True) -> torch.Tensor:
    """(12): the hinge triplet ranking loss on a batch of matching pairs (the diagonal), margin Delta.

    pair_scores (B, B), pair_scores[i, j] = F(image i, caption j). With ``max_violation`` only
    the hardest negatives T^ (per image) and I^ (per caption) count (VSE++), else every negative
    is summed. Returns a 0-d tensor.
    """
    positive = pair_scores.diag()  # F(I, T)
    cost_cap = (margin + pair_scores - positive[:, None]).clamp(min=0)  # [Delta - F(I,T) + F(I,T')]_+, row I
    cost_img = (margin + pair_scores - positive[None, :]).clamp(min=0)  # [Delta - F(I,T) + F(I',T)]_+, column T
    eye = torch.eye(pair_scores.shape[0], dtype=torch.bool, device=pair_scores.device)
    cost_cap = cost_cap.masked_fill(eye, 0)
    cost_img = cost_img.masked_fill(eye, 0)
    if max_violation:  # T^ = argmax_T' F(I, T'), I^ = argmax_I' F(I', T)
        return cost_cap.max(1).values.sum() + cost_img.max(0).values.sum()
    return cost_cap.sum() + cost_img.sum()


# --------------------------------------------------------------------------- (12) per slice of the batch, and (F10)
def same_image(image_ids: torch.Tensor, offset: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the pairs that are not negatives, from the global batch's image_ids (B,): (b, B)
    own image i vs caption j, (B, b) image i vs own caption j; True where both are of one picture."""
    own = image_ids[offset:offset + b]
    return own[:, None] == image_ids[None, :], image_ids[:, None] == own[None, :]


def hinge_terms(rows: torch.Tensor, cols: torch.Tensor, offset: int, margin: float,
                max_violation: bool, image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The terms of (12) of a slice of the batch: this process's share of ``contrastive_loss``.

    rows: (b, B) = F(own images, all captions); cols: (B, b) = F(all images, own captions); own
    positions are o .. o + b - 1 of the global batch (o = ``offset``). With b = B, o = 0 and
    rows = cols = pair_scores it is contrastive_loss(pair_scores). image_ids (B,): the picture of
    each position (a layout other than SCAN's): pairs of one picture are no negatives (``same_image``).
    """
    b = rows.shape[0]
    own = torch.arange(b, device=rows.device)
    positive_img = rows[own, offset + own]  # F(i, i) of own images
    positive_cap = cols[offset + own, own]  # F(j, j) of own captions
    cost_cap = (margin + rows - positive_img[:, None]).clamp(min=0)  # [Delta - F(i, i) + F(i, j)]_+, row i
    cost_img = (margin + cols - positive_cap[None, :]).clamp(min=0)  # [Delta - F(j, j) + F(i, j)]_+, column j
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
    The derivation: this module's docstring.

    rows (b, B) / cols (B, b): the scores of ``hinge_terms``, without gradient; region_embs
    (B, n_region, d), word_embs (B, n_word, d), lengths (B,): the global batch's embeddings, with
    gradient (``gather``); own positions o .. o + b - 1 (o = ``offset``). image_ids (B,): as in
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
        hard_cap = cost_cap.max(1).indices  # j^_i of own images i
        hard_img = cost_img.max(0).indices  # i^_j of own captions j
    positions = offset + own  # global indices of own images and of own captions (image i, caption i)
    # a hardest "negative" that is no negative (the position itself, or in a sidecar layout one of its picture) adds 0
    ids = torch.arange(len(lengths), device=device) if image_ids is None else image_ids
    neg_cap, neg_img = ids[hard_cap] != ids[positions], ids[hard_img] != ids[positions]
    images, captions = torch.cat([positions, positions, hard_img]), torch.cat([positions, hard_cap, positions])
    n_word = int(lengths[captions.cpu()].max())
    # index_select, not x[index]: its backward (index_add_) sums the rows that repeat in a fixed order;
    # x[index]'s (index_put_ with accumulate) did not on the CPU, and training was not reproducible
    scores = fast.zipped_scores(model, region_embs.index_select(0, images),
                                word_embs[:, :n_word].index_select(0, captions),
                                lengths[captions.cpu()])  # (3b,): F(i, i), F(i, j^_i), F(i^_j, j)
    positive, hard_for_image, hard_for_caption = scores[:b], scores[b:2 * b], scores[2 * b:]
    # (F10): L = sum_i [Delta - F(i, i) + F(i, j^_i)]_+ + sum_j [Delta - F(j, j) + F(i^_j, j)]_+
    cost_cap = (margin + hard_for_image - positive).clamp(min=0) * neg_cap  # 0 where j^_i is no negative
    cost_img = (margin + hard_for_caption - positive).clamp(min=0) * neg_img  # 0 where i^_j is no negative
    return cost_cap.sum() + cost_img.sum()


class BatchLoss(nn.Module):
    """(region_feats, tokens, lengths) of this process's slice -> its loss term L_p, to back-propagate.

    Scores ``rows`` / ``cols`` (one process: rows = cols = the (B, B) pair scores) and takes
    ``hinge_terms``; on N processes after the gathers, multiplied by N because DDP averages the
    gradients (this module's docstring). With hardest negatives and ``support`` (the default) the
    pairs are scored without autograd and the loss is ``support_loss`` (F10): the same loss and
    gradients, back-propagated through 3 b pairs. Wrapped in DistributedDataParallel, its forward
    is the whole step. ``score_pairs(model, region_embs, word_embs, lengths)``: the scorer
    (``imram_min.engineering.tiling.score_pairs``). ``image_ids`` (this process's slice, (b,)): given in a layout other
    than SCAN's, so that pairs of one picture are no negatives (module docstring); None: the original.
    The multi-process scoring of ``rows`` / ``cols`` and the gathers: ``imram_min.engineering.distributed``.
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
                pair_scores = self.score_pairs(model, region_embs, word_embs, lengths)  # (B, B)
            if sparse:
                return support_loss(model, pair_scores, pair_scores, 0, region_embs, word_embs, lengths,
                                    model.cfg.margin, image_ids)
            if image_ids is not None:
                return hinge_terms(pair_scores, pair_scores, 0, model.cfg.margin, max_violation, image_ids)
            return contrastive_loss(pair_scores, model.cfg.margin, max_violation)
        local_shape = torch.tensor([len(lengths), int(lengths.max())], device=region_embs.device)
        shape = gather_no_grad(local_shape[None], ctx, [1] * ctx.world)  # (world, 2): slice size, longest caption
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
