"""The reference LoRI layer in plain torch: the twin every fast backend is tested against.

Its five kernels mirror the fast backends' one for one (``*_ref`` twins of shrink,
shrink_backward_, expand_, expand_backward and sddmm) and are composed by the same
``fused_layer`` as every backend:

    h  = (x * D) @ A.T                     [M, r]   the only activation saved
    y  = x @ W.T + b + s * h @ B.T
    dx = dy @ W + s * ((dy @ B) @ A) * D    A and D regenerated in backward
    dB = s * dy.T @ h                       returned for the kept blocks only

They run on any device and float dtype torch does, materialising A and a dense B per
call, in the input's precision.
"""

from __future__ import annotations

import torch

from lori_kernels import rng
from lori_kernels.block_sparse import check_b_blocks, gather_blocks, scatter_blocks
from lori_kernels.fused_layer import LayerKernels, register_fused_layer
from lori_kernels.layer_spec import LayerSpec

__all__ = [
    "KERNELS",
    "expand_backward_ref",
    "expand_ref_",
    "lori_linear",
    "lori_linear_stored_a",
    "sddmm_ref",
    "shrink_backward_ref_",
    "shrink_ref",
]


def _a(seed: int, r: int, d_in: int, dist: str, like: torch.Tensor) -> torch.Tensor:
    """A ``[r, d_in]`` in the dtype and on the device of ``like``."""
    return rng.generate_a_tile(seed, d_in, 0, r, 0, d_in, dist=dist, device=like.device).to(like.dtype)


def _dropout_factor(dropout_p: float, dropout_seed: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``D`` ``[M, in]`` (``like``'s shape): kept elements 1/(1-p), dropped 0."""
    keep = rng.dropout_keep(dropout_seed, dropout_p, like.shape[0], like.shape[1], device=like.device)
    return keep.to(like.dtype) * rng.dropout_scale(dropout_p)


def shrink_ref(x, seed, r, dist, dropout_p, dropout_seed):
    """``h = (x * D) @ A.T``."""
    xd = x * _dropout_factor(dropout_p, dropout_seed, x) if dropout_p > 0 else x
    return xd @ _a(seed, r, x.shape[1], dist, x).t()


def shrink_backward_ref_(dx, g, seed, dist, dropout_p, dropout_seed):
    """``dx += (g @ A) * D`` in place."""
    t = g @ _a(seed, g.shape[1], dx.shape[1], dist, dx)
    dx.add_(t * _dropout_factor(dropout_p, dropout_seed, dx) if dropout_p > 0 else t)


def expand_ref_(y, h, b_values, b_blocks, scaling):
    """``y += scaling * h @ B.T`` in place, B scattered dense."""
    y.add_((h @ scatter_blocks(b_values, b_blocks, y.shape[1], h.shape[1]).t()) * scaling)


def expand_backward_ref(dy, b_values, b_blocks, r, scaling):
    """``g = scaling * dy @ B``."""
    return (dy @ scatter_blocks(b_values, b_blocks, dy.shape[1], r)) * scaling


def sddmm_ref(dy, h, b_blocks, bo, br, scaling):
    """``db_values = scaling * dy.T @ h`` at the kept blocks (computed dense)."""
    return gather_blocks((dy.t() @ h) * scaling, b_blocks, (bo, br))


KERNELS = LayerKernels(shrink_ref, shrink_backward_ref_, expand_ref_, expand_backward_ref, sddmm_ref)
_lori_linear_fused = register_fused_layer("lori_ref", KERNELS)


def lori_linear(x, weight, bias, b_values, b_blocks, spec: LayerSpec) -> torch.Tensor:
    """The reference backend of ``lori_kernels.lori_linear`` on validated arguments; it
    also checks the content of ``b_blocks`` (range, order, uniqueness) on every eager call
    (not while ``torch.compile`` traces it: the check reads the tensor)."""
    if not torch.compiler.is_compiling():
        check_b_blocks(b_blocks, spec.out_features, spec.r, spec.block)
    return _lori_linear_fused(x, weight, bias, b_values, b_blocks, spec)


def lori_linear_stored_a(
    x, weight, bias, a, b_values, b_blocks, *, scaling, dropout_p=0.0, dropout_seed=0
) -> torch.Tensor:
    """The LoRI layer with an explicit, stored A ``[r, in]`` instead of a seed (adapters
    imported from PEFT or the original LoRI code, merges of adapters with different
    seeds): plain torch autograd, differentiable in ``x`` and ``b_values``. The dropout
    mask is LoRI-RNG's, as on every backend; ``dropout_seed`` is an int or a one-element
    int64 tensor (``torch.compile`` traces the mask's generation from it without reading it)."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_in)
    xd = x2 * _dropout_factor(dropout_p, dropout_seed, x2) if dropout_p > 0 else x2
    b = scatter_blocks(b_values, b_blocks, weight.shape[0], a.shape[0])
    y = torch.nn.functional.linear(x2, weight, bias) + scaling * ((xd @ a.t()) @ b.t())
    return y.reshape(*lead, weight.shape[0])
