"""Hand-written derivatives of the fast form's memory update, for training: (F8) and (F9).

``imram_min.fast`` is the forward algebra; this file only makes its backward pass cheaper. Both
functions compute exactly what their forward in ``fast`` computes (the tests hold them to it, and
their derivatives to autograd's and to finite differences); autograd would differentiate the same
forward one operation at a time, in about twice as many passes over the per-pair (..., d) tensors.
Symbols: ``imram_min.model``'s table; (7)-(9) its formulas, (F5), (F6) ``imram_min.fast``'s.

    (F8) the gated update's pointwise part (``Gate``). With the pre-activations
         pre = [pre_o | pre_g] = [2 z_o | z_g] (F5; z_o, z_g the pre-activations of (7), (8)),
         s = sigmoid(pre_o), o = 2 s - 1 = tanh(z_o) (7), g = sigmoid(pre_g) (8), the new memory
         x' = o + g (x - o) (9, F6) of the memory x, and G = dL/dx':
             dL/dx     = G g
             dL/dpre_o = G (1 - g) 2 s (1 - s)
             dL/dpre_g = G (x - o) g (1 - g)
    (F9) the memory's l2norm (``L2Norm``), y = x / (|x| + eps), G = dL/dy:
             dL/dx = G / (|x| + eps) - y <y, G> / |x|      (the second term is 0 where x = 0)
"""
from __future__ import annotations

import torch

from .model import EPS

_MINUS_ONE = torch.tensor(-1.0)


class Gate(torch.autograd.Function):
    """(F8): pre (..., 2d) = [2 z_o | z_g], memory (..., d) or broadcast to it (the query at step 1)
    -> the new memory (..., d), equal to ``fast.new_memory(sigmoid(pre), memory)``.

    Autograd would differentiate the slices of pre, the tanh identity and the lerp one node each
    (zero-filled slice gradients, copies into views); this writes the (..., 2d) gradient in place.
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        sig = torch.sigmoid(pre)  # [s | g]  (8)
        ctx.save_for_backward(sig, memory)
        d = sig.shape[-1] // 2
        o = torch.add(_MINUS_ONE.to(sig), sig[..., :d], alpha=2)  # (F5), (7): o = 2 s - 1
        return torch.lerp(o, memory.to(o.dtype), sig[..., d:])  # (F6), (9): o + g (x - o); as fast.new_memory

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sig, memory = ctx.saved_tensors
        d = sig.shape[-1] // 2
        s, g = sig[..., :d], sig[..., d:]
        grad_pre = torch.empty_like(sig)
        grad_memory = grad * g  # G g
        torch.sub(grad, grad_memory, out=grad_pre[..., :d]).mul_(2)  # 2 G (1 - g)
        torch.mul(torch.add(memory.to(sig.dtype), s, alpha=-2).add_(1), grad, out=grad_pre[..., d:])  # G (x - o)
        grad_pre.mul_(sig).mul_(1 - sig)  # x sigmoid' = sig (1 - sig), both halves
        return grad_pre, grad_memory.sum_to_size(memory.shape).to(memory.dtype)


class L2Norm(torch.autograd.Function):
    """(F9): l2norm over the last axis, y = x / (|x| + eps), equal to ``model.l2norm``; (..., d) -> (..., d).

    Autograd's norm and division nodes make twice the passes over the (..., d) memory.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        y = x / (norm + EPS)
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, norm = ctx.saved_tensors
        along = (y * grad).sum(-1, keepdim=True).div_(norm.clamp(min=torch.finfo(norm.dtype).tiny))  # <y, G> / |x|
        return (grad / (norm + EPS)).sub_(y * along)
