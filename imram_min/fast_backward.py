"""Hand-written derivatives of the fast form's memory update, for training: (F8) and (F9).

``imram_min.fast`` is the forward algebra; this file only makes its backward pass cheaper. Both
functions compute exactly what their forward in ``fast`` computes (the tests hold them to it, and
their derivatives to autograd's and to finite differences); autograd would differentiate the same
forward one operation at a time, in about twice as many passes over the per-pair (..., d) tensors.
Symbols: ``imram_min.model``'s table; (7)-(9) its formulas, (F5), (F6) ``imram_min.fast``'s.

    (F8) the gated update's pointwise part (``GatedUpdate``). With the pre-activations
         pre = [pre_o | pre_g] = [2 z_o | z_g] (F5; z_o, z_g the pre-activations of (7), (8)),
         sig_o = sigmoid(pre_o), o = 2 sig_o - 1 = tanh(z_o) (7), g = sigmoid(pre_g) (8), and the
         new memory before its l2norm u = o + g (x - o) (9, F6) of the memory x = x^(k):
             dL/dx     = dL/du g
             dL/dpre_o = dL/du (1 - g) 2 sig_o (1 - sig_o)
             dL/dpre_g = dL/du (x - o) g (1 - g)
    (F9) the memory's l2norm (``L2Norm``), x' = u / (|u| + eps) (9):
             dL/du = dL/dx' / (|u| + eps) - x' <x', dL/dx'> / |u|     (the second term is 0 where u = 0)
"""
from __future__ import annotations

import torch

from .model import EPS

_MINUS_ONE = torch.tensor(-1.0)


class GatedUpdate(torch.autograd.Function):
    """(F8): pre (..., 2d) = [2 z_o | z_g], memory x (..., d) or broadcast to it (the query at step 1)
    -> the new memory before its l2norm, u = o + g (x - o) (..., d), equal to
    ``fast.new_memory(sigmoid(pre), memory)``.

    Autograd would differentiate the slices of pre, the tanh identity and the lerp one node each
    (zero-filled slice gradients, copies into views); this writes the (..., 2d) gradient in place.
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        sig = torch.sigmoid(pre)  # [sig_o | g]  (8)
        ctx.save_for_backward(sig, memory)
        d = sig.shape[-1] // 2
        o = torch.add(_MINUS_ONE.to(sig), sig[..., :d], alpha=2)  # (F5), (7): o = 2 sig_o - 1
        return torch.lerp(o, memory.to(o.dtype), sig[..., d:])  # (F6), (9): u = o + g (x - o); as fast.new_memory

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad = dL/du
        sig, memory = ctx.saved_tensors
        d = sig.shape[-1] // 2
        sig_o, g = sig[..., :d], sig[..., d:]
        grad_pre = torch.empty_like(sig)
        grad_memory = grad * g  # dL/dx = dL/du g
        torch.sub(grad, grad_memory, out=grad_pre[..., :d]).mul_(2)  # 2 dL/du (1 - g)
        # dL/du (x - o), with x - o = x - 2 sig_o + 1
        torch.mul(torch.add(memory.to(sig.dtype), sig_o, alpha=-2).add_(1), grad, out=grad_pre[..., d:])
        # times sigmoid' = sig (1 - sig), both halves: dL/dpre_o = 2 dL/du (1 - g) sig_o (1 - sig_o),
        # dL/dpre_g = dL/du (x - o) g (1 - g)
        grad_pre.mul_(sig).mul_(1 - sig)
        return grad_pre, grad_memory.sum_to_size(memory.shape).to(memory.dtype)


class L2Norm(torch.autograd.Function):
    """(F9): l2norm over the last axis, x' = u / (|u| + eps), equal to ``model.l2norm``; (..., d) -> (..., d).

    Autograd's norm and division nodes make twice the passes over the (..., d) memory.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True)  # |u|
        unit = u / (norm + EPS)  # x'
        ctx.save_for_backward(unit, norm)
        return unit

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad = dL/dx'
        unit, norm = ctx.saved_tensors
        tiny = torch.finfo(norm.dtype).tiny
        along = (unit * grad).sum(-1, keepdim=True).div_(norm.clamp(min=tiny))  # <x', dL/dx'> / |u|
        return (grad / (norm + EPS)).sub_(unit * along)  # dL/du = dL/dx' / (|u| + eps) - x' <x', dL/dx'> / |u|
