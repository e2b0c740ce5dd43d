"""The ``"triton_epilogue"`` backend of ``lori_kernels.lori_linear``: the Triton backend's
kernels, with the two frozen-weight GEMMs run by Triton too and the adapter fused into
their epilogues (``gemm.py``), as ``lori_triton_epilogue::forward`` and ``::backward``."""

from lori_kernels.fused_layer import register_fused_layer
from lori_kernels.triton_kernels import layer
from lori_kernels.triton_kernels.gemm import linear_expand, linear_shrink_backward

__all__ = ["KERNELS", "lori_linear"]

KERNELS = layer.KERNELS._replace(linear_expand=linear_expand, linear_shrink_backward=linear_shrink_backward)
lori_linear = register_fused_layer("lori_triton_epilogue", KERNELS)
