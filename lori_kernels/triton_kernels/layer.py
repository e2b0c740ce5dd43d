"""The fused LoRI layer on Triton kernels, as ``torch.library`` custom ops with fake
(meta) and autograd registrations, so ``torch.compile(fullgraph=True)`` traces it and
activation checkpointing recomputes it exactly (A and D come from seeds).

    forward   y = x @ W.T + b           (torch matmul)
              h = (x * D) @ A.T          shrink
              y += s * h @ B.T           expand_, in place over the kept blocks
    backward  g = s * dy @ B             expand_backward
              dx = dy @ W                (torch matmul)
              dx += (g @ A) * D          shrink_backward_, in place
              db_values = s * dy.T @ h   sddmm, kept blocks only

Only ``h`` [M, r] is saved for backward (with the frozen weight and B, which are not
activations).
"""

from typing import Optional

import torch

from lori_kernels import rng
from lori_kernels.layer_spec import LayerSpec
from lori_kernels.triton_kernels.expand import block_index, expand_, expand_backward
from lori_kernels.triton_kernels.sddmm import sddmm
from lori_kernels.triton_kernels.shrink import shrink, shrink_backward_

__all__ = ["lori_linear_triton"]


def _index(b_blocks: torch.Tensor, out_features: int, r: int, block: tuple):
    return block_index(b_blocks, -(-out_features // block[0]), r // block[1])


@torch.library.custom_op("lori_triton::forward", mutates_args=())
def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], b_values: torch.Tensor,
    b_blocks: torch.Tensor, seed: int, r: int, scaling: float, dist: str, dropout_p: float,
    dropout_seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    block = tuple(b_values.shape[1:])
    y = torch.nn.functional.linear(x, weight, bias)
    h = shrink(x, seed, r, dist=dist, dropout_p=dropout_p, dropout_seed=dropout_seed)
    expand_(y, h, b_values, b_blocks, _index(b_blocks, weight.shape[0], r, block), scaling)
    return y, h


@_forward.register_fake
def _(x, weight, bias, b_values, b_blocks, seed, r, scaling, dist, dropout_p, dropout_seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], r)


@torch.library.custom_op("lori_triton::backward", mutates_args=())
def _backward(
    dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, b_values: torch.Tensor,
    b_blocks: torch.Tensor, seed: int, scaling: float, dist: str, dropout_p: float,
    dropout_seed: int, need_dx: bool, need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, db_values)``; an output that is not needed comes back empty."""
    r = h.shape[1]
    block = tuple(b_values.shape[1:])
    dx = db_values = dy.new_empty(0)
    if need_dx:
        g = expand_backward(dy, b_values, b_blocks, _index(b_blocks, weight.shape[0], r, block), r, scaling)
        dx = dy @ weight
        shrink_backward_(dx, g, seed, dist=dist, dropout_p=dropout_p, dropout_seed=dropout_seed)
    if need_db:
        db_values = sddmm(dy, h, b_blocks, block, scaling)
    return dx, db_values


@_backward.register_fake
def _(dy, h, weight, b_values, b_blocks, seed, scaling, dist, dropout_p, dropout_seed, need_dx, need_db):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if need_dx else dy.new_empty(0)
    return dx, b_values.new_empty(b_values.shape) if need_db else dy.new_empty(0)


def _setup_context(ctx, inputs, output):
    _, weight, _, b_values, b_blocks, seed, _, scaling, dist, dropout_p, dropout_seed = inputs
    ctx.save_for_backward(output[1], weight, b_values, b_blocks)
    ctx.rng_args = (seed, scaling, dist, dropout_p, dropout_seed)


def _autograd_backward(ctx, dy, _dh):
    h, weight, b_values, b_blocks = ctx.saved_tensors
    need_dx, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dx, db_values = _backward(dy, h, weight, b_values, b_blocks, *ctx.rng_args, need_dx, need_db)
    return (dx if need_dx else None), None, None, (db_values if need_db else None), None, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def lori_linear_triton(x, weight, bias, b_values, b_blocks, spec: LayerSpec) -> torch.Tensor:
    """The Triton backend of ``lori_kernels.lori_linear`` on validated arguments."""
    x2 = x.reshape(-1, spec.in_features)
    y, _ = _forward(
        x2, weight, bias, b_values.contiguous(), b_blocks.contiguous(), rng.to_int64(spec.seed),
        spec.r, spec.scaling, spec.dist, spec.dropout_p, rng.to_int64(spec.dropout_seed),
    )
    return y.reshape(*x.shape[:-1], spec.out_features)
