"""The compiled extension's ops seen from Python (schemas in ``csrc/lori_ops.cpp``): their
fake (meta) implementations, so that ``torch.compile`` and ``torch.library.opcheck`` trace
them, and ``KERNELS``, the kernel set of the ``cpu_ext`` and ``cuda_ext`` backends.
Imported by the extension loader (``_extension.load_error``) right after
``lori_kernels._C``; never import it directly.
"""

from __future__ import annotations

import torch

from lori_kernels import rng
from lori_kernels.backends import LayerKernels
from lori_kernels.block_index import block_index


@torch.library.register_fake("lori::generate_a")
def _generate_a_fake(seed, d_in, row0, rows, col0, cols, dist):
    torch._check(rows >= 0 and cols >= 0, lambda: "generate_a: rows and cols must be >= 0")
    return seed.new_empty((rows, cols), dtype=torch.float32)


_fake = torch.library.register_fake
_fake("lori::shrink")(lambda x, seed, r, dist, dropout_p, dropout_seed: x.new_empty(x.shape[0], r))
_fake("lori::shrink_backward")(lambda g, seed, d_in, dist, dropout_p, dropout_seed: g.new_empty(g.shape[0], d_in))
_fake("lori::expand_")(lambda y, h, b_values, b_blocks, row_ptr, scaling: None)
_fake("lori::expand_segments_")(lambda y, h, rows, seg_ptr, longest, b_values, b_blocks, row_ptr, scaling: None)
_fake("lori::expand_backward")(
    lambda dy, b_values, b_blocks, col_ptr, col_order, r, scaling: dy.new_empty(dy.shape[0], r)
)
_fake("lori::sddmm")(lambda dy, h, b_blocks, bo, br, scaling: dy.new_empty(b_blocks.shape[0], bo, br))


def generate_a(seed, d_in: int, row0: int, rows: int, col0: int, cols: int, *, dist="uniform", device=None):
    """float32 tile ``A[row0:row0+rows, col0:col0+cols]`` by ``lori::generate_a`` on ``device``."""
    seed_t = torch.tensor(rng.to_int64(seed), dtype=torch.int64, device=device)
    return torch.ops.lori.generate_a(seed_t, d_in, row0, rows, col0, cols, dist)


def expand_(y, h, b_values, b_blocks, scaling) -> None:
    """``y += scaling * h @ B.T`` by ``lori::expand_``, with the cached block row index."""
    bo, br = b_values.shape[1:]
    index = block_index(b_blocks, -(-y.shape[1] // bo), h.shape[1] // br)
    torch.ops.lori.expand_(y, h, b_values, b_blocks, index.row_ptr, scaling)


def expand_backward(dy, b_values, b_blocks, r, scaling) -> torch.Tensor:
    """``g = scaling * dy @ B`` by ``lori::expand_backward``, with the cached block column index."""
    bo, br = b_values.shape[1:]
    index = block_index(b_blocks, -(-dy.shape[1] // bo), r // br)
    return torch.ops.lori.expand_backward(dy, b_values, b_blocks, index.col_ptr, index.col_order, r, scaling)


_ops = torch.ops.lori
KERNELS = LayerKernels(
    _ops.shrink,
    _ops.shrink_backward,
    expand_,
    expand_backward,
    _ops.sddmm,
    generate_a,
    expand_segments_=_ops.expand_segments_,
    matmul_shrink_on=("cpu",),  # csrc/shrink_cpu.cpp; the CUDA shrink generates A in shared memory
)
