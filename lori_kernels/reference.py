"""The ``"reference"`` backend in plain torch: the twin every fast kernel is tested against.

Its kernels mirror the fast backends' one for one (``*_ref`` twins of shrink,
shrink_backward, expand_, expand_backward, sddmm and generate_a: ``KERNELS``; and
``expand_segments_ref_``, the twin of the segmented expand of mixed batches) and are
composed by the same ``fused.FusedLayer`` as every backend's:

    h  = (x * D) @ A.T                     [M, r]   the only activation saved
    y  = x @ W.T + b + s * h @ B.T
    dx = dy @ W + s * ((dy @ B) @ A) * D    A and D regenerated in backward
    dB = s * dy.T @ h                       returned for the kept blocks only

They run on any device and float dtype torch does, materialising A and a dense B per
call, in the input's precision. ``shrink_a_ref`` and ``shrink_a_backward_ref`` are the A
side with A given: every backend runs a stored A (imported from PEFT, merged from
different seeds) through them.
"""

from __future__ import annotations

import itertools

import torch

from lori_kernels import rng
from lori_kernels.backends import LayerKernels
from lori_kernels.block_sparse import gather_blocks, scatter_blocks


def _a(seed: int, r: int, d_in: int, dist: str, like: torch.Tensor) -> torch.Tensor:
    """A ``[r, d_in]`` in the dtype and on the device of ``like``."""
    return rng.generate_a_tile(seed, d_in, 0, r, 0, d_in, dist=dist, device=like.device).to(like.dtype)


def _dropout_factor(dropout_p: float, dropout_seed: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``D`` ``[M, in]`` (``like``'s shape): kept elements 1/(1-p), dropped 0."""
    keep = rng.dropout_keep(dropout_seed, dropout_p, like.shape[0], like.shape[1], device=like.device)
    return keep.to(like.dtype) * rng.dropout_scale(dropout_p)


def shrink_a_ref(x, a, dropout_p, dropout_seed):
    """``h = (x * D) @ a.T`` for a given A ``a`` [r, in]."""
    xd = x * _dropout_factor(dropout_p, dropout_seed, x) if dropout_p > 0 else x
    return xd @ a.t()


def shrink_a_backward_ref(g, a, dropout_p, dropout_seed):
    """``(g @ a) * D`` [M, in] for a given A ``a`` [r, in]."""
    t = g @ a
    return t.mul_(_dropout_factor(dropout_p, dropout_seed, t)) if dropout_p > 0 else t


def shrink_ref(x, seed, r, dist, dropout_p, dropout_seed):
    """``h = (x * D) @ A.T``."""
    return shrink_a_ref(x, _a(seed, r, x.shape[1], dist, x), dropout_p, dropout_seed)


def shrink_backward_ref(g, seed, d_in, dist, dropout_p, dropout_seed):
    """``(g @ A) * D`` [M, d_in]."""
    return shrink_a_backward_ref(g, _a(seed, g.shape[1], d_in, dist, g), dropout_p, dropout_seed)


def expand_ref_(y, h, b_values, b_blocks, scaling):
    """``y += scaling * h @ B.T`` in place, B scattered dense."""
    y.add_((h @ scatter_blocks(b_values, b_blocks, y.shape[1], h.shape[1]).t()) * scaling)


def expand_segments_ref_(y, h, rows, seg_ptr, longest, b_values, b_blocks, row_ptr, scaling):
    """``y[rows[i]] += scaling[s] * h[i] @ B_s.T`` in place for the rows ``i`` of each segment
    ``s`` (``seg_ptr[s]:seg_ptr[s+1]``), B_s the blocks ``row_ptr[s, 0]:row_ptr[s, -1]`` of the
    concatenated ``b_values`` / ``b_blocks``: the segmented expand kernels' twin, one dense
    product per segment. ``longest`` (the largest segment) sizes a kernel's launch; unused."""
    segments, blocks = itertools.pairwise(seg_ptr.tolist()), row_ptr[:, [0, -1]].tolist()
    for (start, end), (lo, hi), s in zip(segments, blocks, scaling.tolist(), strict=True):
        if end > start and hi > lo:
            b = scatter_blocks(b_values[lo:hi], b_blocks[lo:hi], y.shape[1], h.shape[1])
            y.index_add_(0, rows[start:end], (h[start:end] @ b.t()) * s)


def expand_backward_ref(dy, b_values, b_blocks, r, scaling):
    """``g = scaling * dy @ B``."""
    return (dy @ scatter_blocks(b_values, b_blocks, dy.shape[1], r)) * scaling


def sddmm_ref(dy, h, b_blocks, bo, br, scaling):
    """``db_values = scaling * dy.T @ h`` at the kept blocks (computed dense)."""
    return gather_blocks((dy.t() @ h) * scaling, b_blocks, (bo, br))


KERNELS = LayerKernels(
    shrink_ref,
    shrink_backward_ref,
    expand_ref_,
    expand_backward_ref,
    sddmm_ref,
    rng.generate_a_tile,
    expand_segments_ref_,
    matmul_shrink_on=None,
)
