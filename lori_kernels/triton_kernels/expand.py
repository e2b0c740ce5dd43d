"""The B side of the LoRI layer, touching only B's kept blocks:

    forward   y += s * h @ B.T     [M, out]  expand_ (in place, into the base output)
    backward  g  = s * dy @ B      [M, r]    expand_backward

B is ``b_values`` [nnz, bo, br] at ``b_blocks`` [nnz, 2] (sorted by block row). The
forward walks each block row's kept blocks (CSR ``row_ptr``); the backward walks each
block column's (CSC ``col_ptr`` / ``col_order``), both from ``lori_kernels.block_index``.
Rows past ``out`` in a partial last block row are masked: their ``b_values`` are never read
into a result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lori_kernels.block_index import block_index
from lori_kernels.triton_kernels.indexing import tile_offsets
from lori_kernels.triton_kernels.tuning import autotune, check_dtype, configs, dot_precision, tile


@triton.jit
def expand_tile(
    h_ptr,
    bv_ptr,
    slot_ptr,
    M,
    N,
    R,
    N_BLOCK_COLS,
    row0,
    col0,
    BO: tl.constexpr,
    BR: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """float32 tile ``(h @ B.T)[row0:row0+BLOCK_M, col0:col0+BLOCK_N]`` of ``[M, N]``, the
    tile's rows of B gathered from the kept blocks through ``block_slots`` (dropped blocks
    read as zeros, and are never loaded)."""
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = col0 + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    hb = tl.load(h_ptr + tile_offsets(rm, rr, R, 1), mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    slot = tl.load(
        slot_ptr + (rn // BO)[:, None] * N_BLOCK_COLS + (rr // BR)[None, :],
        mask=(rn[:, None] < N) & (rr[None, :] < R),
        other=-1,
    )
    b = tl.load(
        bv_ptr + slot.to(tl.int64) * (BO * BR) + (rn % BO)[:, None] * BR + (rr % BR)[None, :],
        mask=slot >= 0,
        other=0.0,
    )
    return tl.dot(hb, tl.trans(b.to(hb.dtype)), input_precision=PRECISION)


@triton.jit
def block_row_product(
    h_ptr,
    bv_ptr,
    bb_ptr,
    rm,
    m_mask,
    start,
    end,
    R,
    BO: tl.constexpr,
    BR: tl.constexpr,
    BO_PAD: tl.constexpr,
    BR_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """float32 ``h[rm] @ B_i.T`` ``[len(rm), BO_PAD]`` of one block row ``i`` of B, over its
    kept blocks ``start:end`` (``b_blocks`` / ``b_values`` entries; rows where ``m_mask`` is
    off read as zeros): the forward's loop, shared with the segmented expand of mixed batches."""
    ro = tl.arange(0, BO_PAD)
    rc = tl.arange(0, BR_PAD)
    acc = tl.zeros([rm.shape[0], BO_PAD], dtype=tl.float32)
    for t in range(start, end):
        j = tl.load(bb_ptr + 2 * t + 1)
        hb = tl.load(h_ptr + tile_offsets(rm, j * BR + rc, R, 1), mask=m_mask[:, None] & (rc[None, :] < BR), other=0.0)
        b = tl.load(
            bv_ptr + t * BO * BR + ro[:, None] * BR + rc[None, :],
            mask=(ro[:, None] < BO) & (rc[None, :] < BR),
            other=0.0,
        )
        acc = tl.dot(hb, tl.trans(b), acc, input_precision=PRECISION)
    return acc


def expand_configs():
    return configs(
        [dict(BLOCK_M=bm, num_warps=w) for bm, w in [(64, 4), (128, 4), (128, 8), (256, 8)]],
        interpreter=dict(BLOCK_M=16),
    )


@autotune(configs=expand_configs(), key=["N", "R", "BO_PAD", "BR_PAD"], restore_value=["y_ptr"])
@triton.jit
def _expand_kernel(
    h_ptr,
    bv_ptr,
    bb_ptr,
    row_ptr,
    y_ptr,
    M,
    N,
    R,
    stride_ym,
    stride_yn,
    scaling,
    BO: tl.constexpr,
    BR: tl.constexpr,
    BO_PAD: tl.constexpr,
    BR_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    i = tl.program_id(1)
    start = tl.load(row_ptr + i)
    end = tl.load(row_ptr + i + 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = tl.arange(0, BO_PAD)
    acc = block_row_product(h_ptr, bv_ptr, bb_ptr, rm, rm < M, start, end, R, BO, BR, BO_PAD, BR_PAD, PRECISION)
    if end > start:
        cols = i * BO + ro
        mask = (rm[:, None] < M) & ((ro < BO) & (cols < N))[None, :]
        ptrs = y_ptr + tile_offsets(rm, cols, stride_ym, stride_yn)
        y = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (y.to(tl.float32) + scaling * acc).to(y_ptr.dtype.element_ty), mask=mask)


@autotune(configs=expand_configs(), key=["N", "R", "BO_PAD", "BR_PAD"])
@triton.jit
def _expand_backward_kernel(
    dy_ptr,
    bv_ptr,
    bb_ptr,
    col_ptr,
    col_order,
    g_ptr,
    M,
    N,
    R,
    stride_dm,
    stride_dn,
    scaling,
    BO: tl.constexpr,
    BR: tl.constexpr,
    BO_PAD: tl.constexpr,
    BR_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    j = tl.program_id(1)
    start = tl.load(col_ptr + j)
    end = tl.load(col_ptr + j + 1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ro = tl.arange(0, BO_PAD)
    rc = tl.arange(0, BR_PAD)
    acc = tl.zeros([BLOCK_M, BR_PAD], dtype=tl.float32)
    for t in range(start, end):
        k = tl.load(col_order + t)
        cols = tl.load(bb_ptr + 2 * k) * BO + ro
        dyb = tl.load(
            dy_ptr + tile_offsets(rm, cols, stride_dm, stride_dn),
            mask=(rm[:, None] < M) & ((ro < BO) & (cols < N))[None, :],
            other=0.0,
        )
        b = tl.load(
            bv_ptr + k * BO * BR + ro[:, None] * BR + rc[None, :],
            mask=(ro[:, None] < BO) & (rc[None, :] < BR),
            other=0.0,
        )
        acc = tl.dot(dyb, b, acc, input_precision=PRECISION)
    tl.store(
        g_ptr + tile_offsets(rm, j * BR + rc, R, 1),
        (scaling * acc).to(g_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rc[None, :] < BR),
    )


def expand_(
    y: torch.Tensor, h: torch.Tensor, b_values: torch.Tensor, b_blocks: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``y += scaling * h @ B.T`` in place over B's kept blocks; ``y`` [M, out],
    ``h`` [M, r]; ``y`` may have any strides (the small operands are made contiguous)."""
    check_dtype("expand_", y)
    m, n = y.shape
    bo, br = b_values.shape[1:]
    if m == 0 or b_values.shape[0] == 0:
        return y
    n_rows = -(-n // bo)
    index = block_index(b_blocks, n_rows, h.shape[1] // br)
    h, b_values, b_blocks = h.contiguous(), b_values.contiguous(), b_blocks.contiguous()
    _expand_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n_rows)](
        h,
        b_values,
        b_blocks,
        index.row_ptr,
        y,
        m,
        n,
        h.shape[1],
        y.stride(0),
        y.stride(1),
        scaling,
        BO=bo,
        BR=br,
        BO_PAD=tile(bo),
        BR_PAD=tile(br),
        PRECISION=dot_precision(y.dtype),
    )
    return y


def expand_backward(
    dy: torch.Tensor, b_values: torch.Tensor, b_blocks: torch.Tensor, r: int, scaling: float
) -> torch.Tensor:
    """``g = scaling * dy @ B`` ``[M, r]`` over B's kept blocks, in dy's dtype; ``dy`` may
    have any strides (B is made contiguous)."""
    check_dtype("expand_backward", dy)
    m, n = dy.shape
    bo, br = b_values.shape[1:]
    g = torch.empty(m, r, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return g
    n_cols = r // br
    index = block_index(b_blocks, -(-n // bo), n_cols)
    b_values, b_blocks = b_values.contiguous(), b_blocks.contiguous()
    _expand_backward_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n_cols)](
        dy,
        b_values,
        b_blocks,
        index.col_ptr,
        index.col_order,
        g,
        m,
        n,
        r,
        dy.stride(0),
        dy.stride(1),
        scaling,
        BO=bo,
        BR=br,
        BO_PAD=tile(bo),
        BR_PAD=tile(br),
        PRECISION=dot_precision(dy.dtype),
    )
    return g
