"""Python side of the compiled ``torch.ops.lori`` ops (schemas in ``csrc/lori_ops.cpp``):
fake (meta) implementations, so ``torch.compile`` and ``torch.library.opcheck`` can trace
them, and the fused layer over them (``lori_ext::forward``/``backward``, the ``cpu_ext``
and ``cuda_ext`` backends of ``lori_linear``). Imported by the extension loader right
after ``lori_kernels._C`` is loaded; never import it directly.
"""

from __future__ import annotations

import torch

from lori_kernels.fused_layer import LayerKernels, register_fused_layer


@torch.library.register_fake("lori::generate_a")
def _generate_a_fake(seed, d_in, row0, rows, col0, cols, dist):
    torch._check(rows >= 0 and cols >= 0, lambda: "generate_a: rows and cols must be >= 0")
    return seed.new_empty((rows, cols), dtype=torch.float32)


@torch.library.register_fake("lori::shrink")
def _shrink_fake(x, seed, r, dist, dropout_p, dropout_seed):
    return x.new_empty(x.shape[0], r)


@torch.library.register_fake("lori::shrink_backward_")
def _shrink_backward_fake(dx, g, seed, dist, dropout_p, dropout_seed):
    return None


@torch.library.register_fake("lori::expand_")
def _expand_fake(y, h, b_values, b_blocks, scaling):
    return None


@torch.library.register_fake("lori::expand_backward")
def _expand_backward_fake(dy, b_values, b_blocks, r, scaling):
    return dy.new_empty(dy.shape[0], r)


@torch.library.register_fake("lori::sddmm")
def _sddmm_fake(dy, h, b_blocks, bo, br, scaling):
    return dy.new_empty(b_blocks.shape[0], bo, br)


_ops = torch.ops.lori
KERNELS = LayerKernels(_ops.shrink, _ops.shrink_backward_, _ops.expand_, _ops.expand_backward, _ops.sddmm)
lori_linear = register_fused_layer("lori_ext", KERNELS)
