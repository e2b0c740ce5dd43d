"""Triton kernels of the fused LoRI layer (the ``"triton"`` backend), one file per family:

- ``philox.py``: LoRI-RNG v1 in Triton (device functions) and the A-writing kernel,
- ``shrink.py``: the A side, ``h = (x * D) @ A.T`` and ``dx += ((g @ A) * D)``,
- ``expand.py``: the B side over kept blocks, ``y += s * h @ B.T`` and ``g = s * dy @ B``,
- ``sddmm.py``: ``db_values = s * dy.T @ h`` for kept blocks only,
- ``gemm.py``: the frozen-weight GEMMs with the adapter in their epilogues,
- ``indexing.py``: int64 element offsets, shared by every kernel,
- ``layer.py``: the ``"triton"`` backend, ``lori_kernels.fused_layer`` over these kernels
  (the GEMMs left to torch),
- ``epilogue_layer.py``: the ``"triton_epilogue"`` backend, the same with ``gemm.py``.

Importing this package imports Triton and defines the kernels; ``lori_kernels`` imports it
only when the Triton backend is first used. Set ``TRITON_INTERPRET=1`` before that to run
the kernels on CPU tensors (slow; for tests).
"""
