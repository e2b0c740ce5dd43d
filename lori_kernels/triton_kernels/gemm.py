"""The layer's two frozen-weight GEMMs in Triton, with the adapter in their epilogues:

    forward   y  = x @ W.T + b + s * h @ B.T     linear_expand           (B's kept blocks)
    backward  dx = dy @ W + (g @ A) * D          linear_shrink_backward  (A, D regenerated)

These make the ``"triton_epilogue"`` backend. The ``"triton"`` backend instead leaves the
GEMMs to torch (cuBLAS) and adds the adapter in place afterwards (``expand_``,
``shrink_backward_``), which reads and writes ``y`` (its kept block rows) and ``dx`` (all
of it) once more. Which of the two is faster on a GPU is what ``lori bench`` measures:
the fused epilogue saves that pass, cuBLAS may still beat Triton's main loop.

The main loop is the classic tiled GEMM: one program per output tile, tiles in groups of
``GROUP_M`` rows so that the weight tiles a group reads stay in L2, fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lori_kernels.triton_kernels.expand import block_slots, expand_tile
from lori_kernels.triton_kernels.indexing import tile_offsets
from lori_kernels.triton_kernels.shrink import rng_args, shrink_backward_tile
from lori_kernels.triton_kernels.tuning import autotune, check_dtype, configs, dot_precision, tile


def _configs():
    return configs(
        [
            dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in [
                (128, 256, 64, 3, 8),
                (256, 128, 64, 3, 8),
                (128, 128, 64, 4, 8),
                (128, 128, 32, 4, 4),
                (64, 256, 32, 4, 4),
                (128, 64, 32, 4, 4),
                (64, 128, 32, 4, 4),
                (64, 64, 32, 5, 2),
            ]
        ],
        interpreter=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2),
    )


# The autotuning key: M enters as its power-of-two bucket, so a new batch length does not
# tune again.
_KEY = ["M_BUCKET", "N", "K", "R_PAD"]


@triton.jit
def _tile_of_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, first column) of this program's output tile, in grouped order."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _matmul_tile(
    a_ptr,
    b_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    row0,
    col0,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 tile ``(a @ b)[row0:row0+BLOCK_M, col0:col0+BLOCK_N]`` of ``a [M, K] @ b [K, N]``.
    Rows and columns past the end wrap around (read in bounds, never stored), so only K is
    masked."""
    rm = (row0 + tl.arange(0, BLOCK_M)) % M
    rn = (col0 + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + tile_offsets(rm, rk, stride_am, stride_ak)
    b_ptrs = b_ptr + tile_offsets(rk, rn, stride_bk, stride_bn)
    # A step along K moves a transposed operand by BLOCK_K times its (M-sized) column stride.
    a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
    b_step = BLOCK_K * tl.cast(stride_bk, tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.jit
def _store_tile(out_ptr, value, M, N, row0, col0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stores a float32 tile into contiguous ``out [M, N]`` in out's dtype."""
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = col0 + tl.arange(0, BLOCK_N)
    tl.store(
        out_ptr + tile_offsets(rm, rn, N, 1),
        value.to(out_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


@autotune(configs=_configs(), key=_KEY)
@triton.jit
def _linear_expand_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    h_ptr,
    bv_ptr,
    slot_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    N_BLOCK_COLS,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_bias,
    scaling,
    HAS_BIAS: tl.constexpr,
    BO: tl.constexpr,
    BR: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    row0, col0 = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(
        x_ptr,
        w_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wk,
        stride_wn,
        row0,
        col0,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    if HAS_BIAS:
        rn = col0 + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + rn.to(tl.int64) * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    acc += scaling * expand_tile(
        h_ptr, bv_ptr, slot_ptr, M, N, R, N_BLOCK_COLS, row0, col0, BO, BR, R_PAD, PRECISION, BLOCK_M, BLOCK_N
    )
    _store_tile(y_ptr, acc, M, N, row0, col0, BLOCK_M, BLOCK_N)


@autotune(configs=_configs(), key=_KEY + ["DROPOUT"])
@triton.jit(do_not_specialize=["key0", "key1", "dkey0", "dkey1"])
def _linear_shrink_backward_kernel(
    dy_ptr,
    w_ptr,
    g_ptr,
    dx_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_dm,
    stride_dk,
    stride_wk,
    stride_wn,
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    row0, col0 = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(
        dy_ptr,
        w_ptr,
        M,
        N,
        K,
        stride_dm,
        stride_dk,
        stride_wk,
        stride_wn,
        row0,
        col0,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    acc += shrink_backward_tile(
        g_ptr,
        M,
        N,
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
        BLOCK_N,
    )
    _store_tile(dx_ptr, acc, M, N, row0, col0, BLOCK_M, BLOCK_N)


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def linear_expand(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    b_values: torch.Tensor,
    b_blocks: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``y = x @ W.T + b + scaling * h @ B.T`` ``[M, out]`` in one kernel, for a 2-D ``x``
    ``[M, in]``, ``h`` ``[M, r]``, B's kept blocks ``b_values`` at ``b_blocks``. ``x``,
    ``weight`` and ``bias`` may have any strides (``h`` and ``b_values`` are made contiguous)."""
    check_dtype("linear_expand", x)
    m, k = x.shape
    n = weight.shape[0]
    r = h.shape[1]
    bo, br = b_values.shape[1:]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    slots = block_slots(b_blocks, -(-n // bo), r // br)
    h, b_values = h.contiguous(), b_values.contiguous()
    _linear_expand_kernel[_grid(m, n)](
        x,
        weight,
        bias if bias is not None else x,
        h,
        b_values,
        slots,
        y,
        m,
        n,
        k,
        r,
        triton.next_power_of_2(m),
        slots.shape[1],
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        scaling,
        HAS_BIAS=bias is not None,
        BO=bo,
        BR=br,
        R_PAD=tile(r),
        PRECISION=dot_precision(x.dtype),
    )
    return y


def linear_shrink_backward(
    dy: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    seed,
    dist: str = "uniform",
    dropout_p: float = 0.0,
    dropout_seed=0,
) -> torch.Tensor:
    """``dx = dy @ W + (g @ A) * D`` ``[M, in]`` in one kernel, for a 2-D ``dy`` ``[M, out]``
    and ``g`` ``[M, r]``; A and D regenerated from their seeds. ``dy`` and ``weight`` may
    have any strides (``g`` is made contiguous)."""
    check_dtype("linear_shrink_backward", dy)
    m, k = dy.shape
    n = weight.shape[1]
    r = g.shape[1]
    dx = torch.empty(m, n, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx
    g = g.contiguous()
    _linear_shrink_backward_kernel[_grid(m, n)](
        dy,
        weight,
        g,
        dx,
        m,
        n,
        k,
        r,
        triton.next_power_of_2(m),
        dy.stride(0),
        dy.stride(1),
        weight.stride(0),
        weight.stride(1),
        **rng_args(seed, n, dist, dropout_p, dropout_seed),
        R_PAD=tile(r),
        PRECISION=dot_precision(dy.dtype),
    )
    return dx
