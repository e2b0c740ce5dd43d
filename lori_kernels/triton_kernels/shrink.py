"""The A side of the LoRI layer, with A (and the dropout mask D) generated in registers:

    forward   h = (x * D) @ A.T        [M, r]   shrink
    backward  (g @ A) * D              [M, in]  shrink_backward: the adapter's part of dx

A ``[r, in]`` is never written to memory: each program regenerates the tiles it needs
from the seed (LoRI-RNG v1, stream 0) and D from the dropout seed (stream 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lori_kernels import rng
from lori_kernels.triton_kernels.indexing import tile_offsets
from lori_kernels.triton_kernels.philox import a_tile, dropout_keep_tile, split_seed
from lori_kernels.triton_kernels.tuning import autotune_by_case, check_dtype, dot_precision, tile

# Autotuning candidates (BLOCK_M, BLOCK_K, num_warps) of both kernels per kind of dtype,
# each led by the tile LORI_TRITON_AUTOTUNE=0 runs. bfloat16/float16: tiles of 64 x 64
# elements per 4 warps, which spill on neither sm_90 nor sm_80 at widths that are multiples
# of 8, with or without dropout (benchmarks/results/compile_sm90.csv, compile_sm80.csv;
# 128 x 64 per 4 warps spilled there). float32 keeps A's and x's K slices in registers for
# its IEEE dot: smaller tiles.
_TENSOR_CORE_TILES = [(64, 64, 4), (128, 64, 8), (64, 128, 8)]
_FLOAT32_TILES = [(32, 64, 4), (64, 64, 4)]
TILES = {"tensor_cores": _TENSOR_CORE_TILES, "float32": _FLOAT32_TILES}


def _autotuned(kernel, operand: str, restore_value: list[str] | None = None):
    """``kernel`` autotuned over ``TILES`` per case (``autotune_by_case``; dropout does not
    change the tiles)."""
    cases = {
        (kind, dropout): [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w) for bm, bk, w in tiles]
        for kind, tiles in TILES.items()
        for dropout in (False, True)
    }
    interpreter = dict(BLOCK_M=16, BLOCK_K=16)
    return autotune_by_case(kernel, cases, ["K", "R_PAD", "DROPOUT"], operand, interpreter, restore_value)


@triton.jit
def shrink_step(
    x,
    acc,
    row0,
    k0,
    K,
    R,
    key0,
    key1,
    bound,
    dkey0,
    dkey1,
    p,
    R_PAD: tl.constexpr,
    RADEMACHER: tl.constexpr,
    DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc + (x * D) @ A.T`` (float32 ``[BLOCK_M, R_PAD]``) for the tile ``x`` of rows
    ``row0:row0+BLOCK_M`` and columns ``k0:k0+BLOCK_K`` of ``[M, K]`` (zero past K), D's and
    A's tiles there regenerated: one K step of ``shrink`` and of ``gemm.linear_shrink``."""
    rk = k0 + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    if DROPOUT:
        keep = dropout_keep_tile(dkey0, dkey1, K, row0, k0, BLOCK_M, BLOCK_K, p, ALIGNED)
        x = tl.where(keep, x, 0.0)
    a = a_tile(key0, key1, K, 0, k0, R_PAD, BLOCK_K, bound, RADEMACHER, ALIGNED)
    a = tl.where((rr[:, None] < R) & (rk[None, :] < K), a, 0.0).to(x.dtype)
    return tl.dot(x, tl.trans(a), acc, input_precision=PRECISION)


@triton.jit(do_not_specialize=["key0", "key1", "dkey0", "dkey1"])
def _shrink_kernel(
    x_ptr,
    h_ptr,
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    key0,
    key1,
    bound,
    dkey0,
    dkey1,
    p,
    keep_scale,
    R_PAD: tl.constexpr,
    RADEMACHER: tl.constexpr,
    DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + tile_offsets(rm, rk, stride_xm, stride_xk),
            mask=(rm[:, None] < M) & (rk[None, :] < K),
            other=0.0,
        )
        acc = shrink_step(
            x,
            acc,
            pid * BLOCK_M,
            k0,
            K,
            R,
            key0,
            key1,
            bound,
            dkey0,
            dkey1,
            p,
            R_PAD,
            RADEMACHER,
            DROPOUT,
            ALIGNED,
            PRECISION,
            BLOCK_M,
            BLOCK_K,
        )
    if DROPOUT:
        acc = acc * keep_scale
    tl.store(
        h_ptr + tile_offsets(rm, rr, R, 1),
        acc.to(h_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rr[None, :] < R),
    )


@triton.jit
def shrink_backward_tile(
    g_ptr,
    M,
    K,
    R,
    row0,
    col0,
    key0,
    key1,
    bound,
    dkey0,
    dkey1,
    p,
    keep_scale,
    R_PAD: tl.constexpr,
    RADEMACHER: tl.constexpr,
    DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 tile ``((g @ A) * D)[row0:row0+BLOCK_M, col0:col0+BLOCK_K]`` of ``[M, K]``,
    ``g`` contiguous ``[M, R]`` (unmasked: callers mask rows >= M and columns >= K)."""
    rm = row0 + tl.arange(0, BLOCK_M)
    rk = col0 + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    g = tl.load(g_ptr + tile_offsets(rm, rr, R, 1), mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    a = a_tile(key0, key1, K, 0, col0, R_PAD, BLOCK_K, bound, RADEMACHER, ALIGNED)
    a = tl.where((rr[:, None] < R) & (rk[None, :] < K), a, 0.0).to(g.dtype)
    out = tl.dot(g, a, input_precision=PRECISION)
    if DROPOUT:
        keep = dropout_keep_tile(dkey0, dkey1, K, row0, col0, BLOCK_M, BLOCK_K, p, ALIGNED)
        out = tl.where(keep, out * keep_scale, 0.0)
    return out


@triton.jit(do_not_specialize=["key0", "key1", "dkey0", "dkey1"])
def _shrink_backward_kernel(
    g_ptr,
    dx_ptr,
    M,
    K,
    R,
    key0,
    key1,
    bound,
    dkey0,
    dkey1,
    p,
    keep_scale,
    R_PAD: tl.constexpr,
    RADEMACHER: tl.constexpr,
    DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    col0 = tl.program_id(1) * BLOCK_K
    out = shrink_backward_tile(
        g_ptr,
        M,
        K,
        R,
        row0,
        col0,
        key0,
        key1,
        bound,
        dkey0,
        dkey1,
        p,
        keep_scale,
        R_PAD,
        RADEMACHER,
        DROPOUT,
        ALIGNED,
        PRECISION,
        BLOCK_M,
        BLOCK_K,
    )
    rm = row0 + tl.arange(0, BLOCK_M)
    rk = col0 + tl.arange(0, BLOCK_K)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(dx_ptr + tile_offsets(rm, rk, K, 1), out.to(dx_ptr.dtype.element_ty), mask=mask)


_shrink = _autotuned(_shrink_kernel, "x_ptr")
_shrink_backward = _autotuned(_shrink_backward_kernel, "g_ptr")


def rng_args(seed, d_in: int, dist: str, dropout_p: float, dropout_seed) -> dict:
    """The RNG arguments of a kernel regenerating A ``[*, d_in]`` and D ``[M, d_in]``."""
    key0, key1 = split_seed(seed)
    dkey0, dkey1 = split_seed(dropout_seed)
    return dict(
        key0=key0,
        key1=key1,
        bound=rng.a_bound(d_in),
        dkey0=dkey0,
        dkey1=dkey1,
        p=float(torch.tensor(dropout_p, dtype=torch.float32)),
        keep_scale=rng.dropout_scale(dropout_p) if dropout_p > 0 else 1.0,
        RADEMACHER=dist == "rademacher",
        DROPOUT=dropout_p > 0,
        ALIGNED=d_in % 4 == 0,
    )


def shrink(
    x: torch.Tensor, seed, r: int, dist: str = "uniform", dropout_p: float = 0.0, dropout_seed=0
) -> torch.Tensor:
    """``h = (x * D) @ A.T`` for a 2-D ``x`` ``[M, in]`` (any strides); ``h`` ``[M, r]`` in
    x's dtype."""
    check_dtype("shrink", x)
    m, k = x.shape
    h = torch.empty(m, r, dtype=x.dtype, device=x.device)
    if m == 0:
        return h
    _shrink[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        x,
        h,
        m,
        k,
        r,
        x.stride(0),
        x.stride(1),
        **rng_args(seed, k, dist, dropout_p, dropout_seed),
        R_PAD=tile(r),
        PRECISION=dot_precision(x.dtype),
    )
    return h


def shrink_backward(
    g: torch.Tensor, seed, d_in: int, dist: str = "uniform", dropout_p: float = 0.0, dropout_seed=0
) -> torch.Tensor:
    """``(g @ A) * D`` ``[M, d_in]`` in g's dtype, for ``g`` ``[M, r]``: the adapter's part of
    ``dx``, written once (the fused layer adds ``dy @ W`` to it in torch's GEMM)."""
    check_dtype("shrink_backward", g)
    m, r = g.shape
    dx = torch.empty(m, d_in, dtype=g.dtype, device=g.device)
    if m == 0:
        return dx
    g = g.contiguous()
    _shrink_backward[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d_in, meta["BLOCK_K"]))](
        g,
        dx,
        m,
        d_in,
        r,
        **rng_args(seed, d_in, dist, dropout_p, dropout_seed),
        R_PAD=tile(r),
        PRECISION=dot_precision(g.dtype),
    )
    return dx
