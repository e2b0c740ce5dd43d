"""The reference LoRI layer in plain torch: the twin every fast backend is tested against.

    h  = (x * D) @ A.T                     [M, r]   the only activation saved
    y  = x @ W.T + b + s * h @ B.T
    dx = dy @ W + s * ((dy @ B) @ A) * D    A and D regenerated in backward
    dB = s * dy.T @ h                       returned for the kept blocks only

It runs on any device and dtype torch does, materialises A and a dense B per call, and
saves only ``h`` (plus the frozen weight, which is no activation) for backward, so its
memory profile matches the fused kernels'.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lori_kernels import rng
from lori_kernels.block_sparse import check_b_blocks, gather_blocks, scatter_blocks
from lori_kernels.layer_spec import LayerSpec

__all__ = ["lori_linear_ref"]


def _a(spec: LayerSpec, like: torch.Tensor) -> torch.Tensor:
    """A ``[r, in]`` in the dtype and on the device of ``like``."""
    a = rng.generate_a_tile(
        spec.seed, spec.in_features, 0, spec.r, 0, spec.in_features, dist=spec.dist,
        device=like.device,
    )
    return a.to(like.dtype)


def _dropout_factor(spec: LayerSpec, like: torch.Tensor) -> torch.Tensor:
    """``D`` ``[M, in]``: kept elements 1/(1-p), dropped 0, in the dtype of ``like``."""
    keep = rng.dropout_keep(
        spec.dropout_seed, spec.dropout_p, like.shape[0], spec.in_features, device=like.device
    )
    return keep.to(like.dtype) * rng.dropout_scale(spec.dropout_p)


class _LoRILinearRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, b_values, b_blocks, spec: LayerSpec):
        a = _a(spec, x)
        xd = x * _dropout_factor(spec, x) if spec.has_dropout else x
        h = xd @ a.t()
        b = scatter_blocks(b_values, b_blocks, spec.out_features, spec.r)
        y = torch.nn.functional.linear(x, weight, bias) + (h @ b.t()) * spec.scaling
        ctx.save_for_backward(h, weight, b_values, b_blocks)
        ctx.spec = spec
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        h, weight, b_values, b_blocks = ctx.saved_tensors
        spec: LayerSpec = ctx.spec
        dx = db_values = None
        if ctx.needs_input_grad[0]:
            b = scatter_blocks(b_values, b_blocks, spec.out_features, spec.r)
            g = (dy @ b) * spec.scaling
            dxd = g @ _a(spec, dy)
            if spec.has_dropout:
                dxd = dxd * _dropout_factor(spec, dy)
            dx = dy @ weight + dxd
        if ctx.needs_input_grad[3]:
            db = (dy.t() @ h) * spec.scaling
            db_values = gather_blocks(db, b_blocks, spec.block)
        return dx, None, None, db_values, None, None


def lori_linear_ref(x, weight, bias, b_values, b_blocks, spec: LayerSpec) -> torch.Tensor:
    """The reference backend of ``lori_kernels.lori_linear`` on validated arguments."""
    check_b_blocks(b_blocks, spec.out_features, spec.r, spec.block)
    x2 = x.reshape(-1, spec.in_features)
    y = _LoRILinearRef.apply(x2, weight, bias, b_values, b_blocks, spec)
    return y.reshape(*x.shape[:-1], spec.out_features)
