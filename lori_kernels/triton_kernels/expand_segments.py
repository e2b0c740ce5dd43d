"""The B side of a mixed-adapter batch (``lori_linear_multi``), one launch for many adapters:

    y[rows[i]] += scaling[s] * h[i] @ B_s.T     for the rows i of each segment s

``h`` [M_g, r] holds the rows of one shrink group sorted by adapter into segments
(``seg_ptr[s]:seg_ptr[s+1]``, Punica's SGMV layout); ``rows`` maps them back to the rows of
``y``. The segments' B are concatenated (``b_values``, ``b_blocks``) and ``row_ptr[s]`` is
segment ``s``'s CSR view of its blocks (``lori_kernels.block_index``) as offsets into the
concatenation. A program is one tile of a segment's rows times one block row of its B, the
forward's loop over kept blocks (``expand.block_row_product``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lori_kernels.triton_kernels.expand import block_row_product, expand_configs
from lori_kernels.triton_kernels.indexing import tile_offsets
from lori_kernels.triton_kernels.tuning import autotune, check_dtype, dot_precision, tile


@autotune(configs=expand_configs(), key=["N", "R", "BO_PAD", "BR_PAD"], restore_value=["y_ptr"])
@triton.jit
def _expand_segments_kernel(
    h_ptr,
    rows_ptr,
    seg_ptr,
    bv_ptr,
    bb_ptr,
    row_ptr,
    scaling_ptr,
    y_ptr,
    N,
    R,
    N_BLOCK_ROWS,
    stride_ym,
    stride_yn,
    BO: tl.constexpr,
    BR: tl.constexpr,
    BO_PAD: tl.constexpr,
    BR_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    i = tl.program_id(1)
    s = tl.program_id(2)
    seg_start = tl.load(seg_ptr + s)
    seg_end = tl.load(seg_ptr + s + 1)
    start = tl.load(row_ptr + s * (N_BLOCK_ROWS + 1) + i)
    end = tl.load(row_ptr + s * (N_BLOCK_ROWS + 1) + i + 1)
    m0 = seg_start + pid_m * BLOCK_M
    if (end > start) & (m0 < seg_end):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < seg_end
        acc = block_row_product(h_ptr, bv_ptr, bb_ptr, rm, m_mask, start, end, R, BO, BR, BO_PAD, BR_PAD, PRECISION)
        ro = tl.arange(0, BO_PAD)
        cols = i * BO + ro
        dest = tl.load(rows_ptr + rm, mask=m_mask, other=0)
        mask = m_mask[:, None] & ((ro < BO) & (cols < N))[None, :]
        ptrs = y_ptr + tile_offsets(dest, cols, stride_ym, stride_yn)
        y = tl.load(ptrs, mask=mask, other=0.0)
        scaling = tl.load(scaling_ptr + s)
        tl.store(ptrs, (y.to(tl.float32) + scaling * acc).to(y_ptr.dtype.element_ty), mask=mask)


def expand_segments_(
    y: torch.Tensor,
    h: torch.Tensor,
    rows: torch.Tensor,
    seg_ptr: torch.Tensor,
    longest: int,
    b_values: torch.Tensor,
    b_blocks: torch.Tensor,
    row_ptr: torch.Tensor,
    scaling: torch.Tensor,
) -> torch.Tensor:
    """``y[rows[i]] += scaling[s] * h[i] @ B_s.T`` in place for the rows of each segment ``s``
    (``seg_ptr`` int32 [S + 1] into ``h`` [M_g, r]; ``rows`` int64 [M_g], unique rows of ``y``
    [M, out], which may have any strides); ``longest`` is the largest segment's row count (the
    launch grid, known on the host). B_s: ``row_ptr[s]`` (int32 [S, n_block_rows + 1]) into the
    concatenated ``b_values`` [nnz, bo, br] / ``b_blocks``; ``scaling`` float32 [S]."""
    check_dtype("expand_segments_", y)
    n_segments, n_rows = seg_ptr.shape[0] - 1, row_ptr.shape[1] - 1
    bo, br = b_values.shape[1:]
    if longest == 0 or b_values.shape[0] == 0:
        return y
    h, b_values, b_blocks = h.contiguous(), b_values.contiguous(), b_blocks.contiguous()
    _expand_segments_kernel[lambda meta: (triton.cdiv(longest, meta["BLOCK_M"]), n_rows, n_segments)](
        h,
        rows,
        seg_ptr,
        b_values,
        b_blocks,
        row_ptr,
        scaling,
        y,
        y.shape[1],
        h.shape[1],
        n_rows,
        y.stride(0),
        y.stride(1),
        BO=bo,
        BR=br,
        BO_PAD=tile(bo),
        BR_PAD=tile(br),
        PRECISION=dot_precision(y.dtype),
    )
    return y
