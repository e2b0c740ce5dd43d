"""The Triton backend of ``lori_kernels.lori_linear``: the fused layer of
``lori_kernels.fused_layer`` over the Triton kernels, as ``lori_triton::forward`` and
``lori_triton::backward``."""

from lori_kernels.fused_layer import LayerKernels, register_fused_layer
from lori_kernels.triton_kernels.expand import expand_, expand_backward
from lori_kernels.triton_kernels.sddmm import sddmm
from lori_kernels.triton_kernels.shrink import shrink, shrink_backward_

__all__ = ["KERNELS", "lori_linear"]

KERNELS = LayerKernels(shrink, shrink_backward_, expand_, expand_backward, sddmm)
lori_linear = register_fused_layer("lori_triton", KERNELS)
