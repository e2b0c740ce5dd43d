"""The gradient of B for its kept blocks only (a block-sparse SDDMM):

    db_values[k] = s * dy[:, rows of block k].T @ h[:, columns of block k]    [bo, br]

Each kept block reduces over all M tokens. With few kept blocks (high sparsity) that is
too little parallelism, so M is split across programs and a second kernel adds their fp32
partial sums in split order and writes db_values in dy's dtype (deterministic, no atomics;
one launch where torch's sum and cast took two); unsplit, the kernel writes db_values itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lori_kernels.triton_kernels.indexing import tile_offsets
from lori_kernels.triton_kernels.tuning import autotune, check_dtype, configs, dot_precision, processor_count, tile


@autotune(
    configs=configs(
        # (128, 4) spilled on sm_80 in bfloat16 (benchmarks/results/compile_sm80.csv)
        [dict(BLOCK_M=bm, num_warps=w) for bm, w in [(64, 4), (128, 8)]],
        interpreter=dict(BLOCK_M=16),
    ),
    key=["N", "R", "BO_PAD", "BR_PAD", "ROWS_PER_SPLIT"],
)
@triton.jit
def _sddmm_kernel(
    dy_ptr,
    h_ptr,
    bb_ptr,
    out_ptr,
    M,
    N,
    R,
    NNZ,
    stride_dm,
    stride_dn,
    ROWS_PER_SPLIT,
    scaling,
    BO: tl.constexpr,
    BR: tl.constexpr,
    BO_PAD: tl.constexpr,
    BR_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    k = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.load(bb_ptr + 2 * k) * BO + tl.arange(0, BO_PAD)
    rc = tl.arange(0, BR_PAD)
    hcols = tl.load(bb_ptr + 2 * k + 1) * BR + rc
    ro = tl.arange(0, BO_PAD)
    m_begin = split * ROWS_PER_SPLIT
    m_end = tl.minimum(M, m_begin + ROWS_PER_SPLIT)
    acc = tl.zeros([BO_PAD, BR_PAD], dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        dyb = tl.load(
            dy_ptr + tile_offsets(rm, cols, stride_dm, stride_dn),
            mask=(rm[:, None] < m_end) & ((ro < BO) & (cols < N))[None, :],
            other=0.0,
        )
        hb = tl.load(h_ptr + tile_offsets(rm, hcols, R, 1), mask=(rm[:, None] < m_end) & (rc[None, :] < BR), other=0.0)
        acc = tl.dot(tl.trans(dyb), hb, acc, input_precision=PRECISION)
    tl.store(
        out_ptr + ((split * NNZ + k) * BO + ro[:, None]) * BR + rc[None, :],
        (scaling * acc).to(out_ptr.dtype.element_ty),
        mask=(ro[:, None] < BO) & (rc[None, :] < BR),
    )


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, SPLITS, SIZE, BLOCK: tl.constexpr):
    """``out[i] = partial[0, i] + ... + partial[SPLITS - 1, i]`` in float32, in that order,
    stored in out's dtype, for ``partial`` ``[SPLITS, SIZE]`` and ``out`` ``[SIZE]``."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < SIZE
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    ptrs = partial_ptr + offsets
    for _ in range(0, SPLITS):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += SIZE  # a 64-bit pointer: no int32 product split * SIZE
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


_SUM_BLOCK = 1024  # elements of db_values per program of the sum of partials


def sddmm(dy: torch.Tensor, h: torch.Tensor, b_blocks: torch.Tensor, bo: int, br: int, scaling: float) -> torch.Tensor:
    """``db_values`` ``[nnz, bo, br]`` = ``scaling * dy.T @ h`` at the kept blocks, in
    dy's dtype; zero in the padded rows of a partial last block row. ``dy`` may have any
    strides (``h`` and ``b_blocks`` are made contiguous)."""
    check_dtype("sddmm", dy)
    m, n = dy.shape
    nnz = b_blocks.shape[0]
    if nnz == 0 or m == 0:
        return torch.zeros(nnz, bo, br, dtype=dy.dtype, device=dy.device)
    h, b_blocks = h.contiguous(), b_blocks.contiguous()
    # Enough programs to fill the device twice over, each reducing at least 256 rows.
    splits = max(1, min(triton.cdiv(2 * processor_count(dy.device), nnz), triton.cdiv(m, 256)))
    rows_per_split = triton.cdiv(m, splits)
    partial = torch.empty(splits, nnz, bo, br, dtype=torch.float32 if splits > 1 else dy.dtype, device=dy.device)
    _sddmm_kernel[(nnz, splits)](
        dy,
        h,
        b_blocks,
        partial,
        m,
        n,
        h.shape[1],
        nnz,
        dy.stride(0),
        dy.stride(1),
        rows_per_split,
        scaling,
        BO=bo,
        BR=br,
        BO_PAD=tile(bo),
        BR_PAD=tile(br),
        PRECISION=dot_precision(dy.dtype),
    )
    if splits == 1:
        return partial[0]
    db_values = torch.empty(nnz, bo, br, dtype=dy.dtype, device=dy.device)
    _sum_partials_kernel[(triton.cdiv(db_values.numel(), _SUM_BLOCK),)](
        partial, db_values, splits, db_values.numel(), BLOCK=_SUM_BLOCK
    )
    return db_values
