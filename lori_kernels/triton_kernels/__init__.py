"""Triton kernels of the fused LoRI layer, one file per family:

- ``philox.py``: LoRI-RNG v1 in Triton (device functions) and the A-writing kernel,
- ``shrink.py``: the A side, ``h = (x * D) @ A.T`` and the adapter's part of dx, ``(g @ A) * D``,
- ``expand.py``: the B side over kept blocks, ``y += s * h @ B.T`` and ``g = s * dy @ B``,
- ``expand_segments.py``: the B side of a mixed-adapter batch, one launch over many adapters,
- ``sddmm.py``: ``db_values = s * dy.T @ h`` for kept blocks only,
- ``gemm.py``: the frozen-weight GEMMs with the adapter inside,
- ``indexing.py``: int64 element offsets, shared by every kernel,
- ``tuning.py``: launch configurations and the dtype check of every launcher.

Here are the two backends' kernel sets (``lori_kernels.backends.TABLE`` names them):
``KERNELS`` of ``"triton"`` (the GEMMs left to torch), ``EPILOGUE_KERNELS`` of
``"triton_epilogue"`` (the same with ``gemm.py``'s GEMMs). Importing this package imports
Triton and defines the kernels; ``lori_kernels`` imports it only when a Triton backend is
first used. Set ``TRITON_INTERPRET=1`` before that to run the kernels on CPU tensors (slow;
for tests).
"""

from lori_kernels.backends import LayerKernels
from lori_kernels.triton_kernels import expand, expand_segments, gemm, philox, sddmm, shrink

KERNELS = LayerKernels(
    shrink.shrink,
    shrink.shrink_backward,
    expand.expand_,
    expand.expand_backward,
    sddmm.sddmm,
    philox.generate_a_tile,
    expand_segments_=expand_segments.expand_segments_,
)
EPILOGUE_KERNELS = KERNELS._replace(
    linear_expand=gemm.linear_expand,
    linear_shrink_backward=gemm.linear_shrink_backward,
    linear_shrink=gemm.linear_shrink,
)
