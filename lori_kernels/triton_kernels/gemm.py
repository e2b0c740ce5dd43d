"""The layer's frozen-weight GEMMs in Triton, with the adapter in them:

    forward   y  = x @ W.T + b + s * h @ B.T     linear_expand           (B's kept blocks)
              y  = x @ W.T + b, h = (x * D) @ A.T   linear_shrink        (A, D regenerated)
    backward  dx = dy @ W + (g @ A) * D          linear_shrink_backward  (A, D regenerated)

These make the ``"triton_epilogue"`` backend. The ``"triton"`` backend instead leaves the
GEMMs to torch (cuBLAS) with the adapter beside them: ``expand_`` reads and writes ``y``'s
kept block rows once more after the forward GEMM, and ``shrink_backward`` writes the
adapter's part of ``dx`` (all of it) once more, for the backward GEMM to accumulate onto.
Which of the two is faster on a GPU is what ``lori bench`` measures: the fused epilogue
saves those passes, cuBLAS may still beat Triton's main loop.

The two forward GEMMs trade one pass for another: ``linear_expand`` needs ``h`` first (the
``shrink`` kernel reading x a second time) and writes y once; ``linear_shrink`` reads x once,
its first column of output tiles accumulating ``h`` from the x tiles it loads anyway (A and
the dropout mask regenerated beside them), and leaves ``y += s * h @ B.T`` to ``expand_``,
which reads and writes y's kept block rows. The fused layer takes ``linear_shrink`` when
those rows are fewer than half of x's width (``fused.reads_x_once``): a sparse B.

``interpreter_dot_is_right`` probes Triton's CPU interpreter with the smallest dot, for
``backends.triton_dtype_problem``.

The main loop is the classic tiled GEMM: one program per output tile, tiles in groups of
``GROUP_M`` rows so that the weight tiles a group reads stay in L2, fp32 accumulation. The
adapter's tile is computed first and the main loop accumulates onto it (through ``tl.dot``'s
accumulator), so only one fp32 tile is ever live: adding it after the loop held two, which
spilled inside the loop in half of the tiles. Widths and row strides that are multiples of 8
but not of 16 are declared so (``VEC``), else Triton loads them element by element.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lori_kernels.block_index import block_slots
from lori_kernels.triton_kernels.expand import expand_tile
from lori_kernels.triton_kernels.indexing import tile_offsets
from lori_kernels.triton_kernels.shrink import rng_args, shrink_backward_tile, shrink_step
from lori_kernels.triton_kernels.tuning import autotune_by_case, check_dtype, dot_precision, tile

# Autotuning candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of each GEMM, per
# kind of dtype and whether it applies dropout (to x for h, to dx), each list led by the tile that
# LORI_TRITON_AUTOTUNE=0 runs. Chosen with benchmarks/compile_check.py so that none spills on
# sm_90 or sm_80 at widths that are multiples of 8 (benchmarks/results/compile_sm90.csv,
# compile_sm80.csv). With dropout the backward's epilogue holds a tile of Philox words beside
# the adapter's tile: the largest tiles spill there. float32 multiplies in IEEE fp32 on CUDA
# cores, whose dot keeps its operands' whole K slice in registers: small tiles, and at r 64
# the epilogue's K = 64 dot still spills 60-480 bytes, once per tile, outside the main loop.
_TENSOR_CORE_TILES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 32, 4, 4),
    (64, 256, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 5, 2),
]
_FLOAT32_TILES = [(32, 64, 32, 3, 4), (32, 32, 32, 3, 4)]
_LINEAR_SHRINK_TILES = [(128, 128, 32, 3, 8), (128, 64, 64, 3, 8), (64, 128, 32, 3, 8)]
TILES = {  # (gemm, "tensor_cores" (bfloat16, float16) or "float32", dropout) -> tiles
    ("linear_expand", "tensor_cores", False): _TENSOR_CORE_TILES,
    # h's tile [BLOCK_M, r] beside the GEMM's in the first column's programs: 8 warps per
    # tile, which spill on neither target at r 64, with or without dropout (64 x 128 per 4
    # warps spilled on sm_80 with dropout)
    ("linear_shrink", "tensor_cores", False): _LINEAR_SHRINK_TILES,
    ("linear_shrink", "tensor_cores", True): _LINEAR_SHRINK_TILES,
    ("linear_shrink_backward", "tensor_cores", False): _TENSOR_CORE_TILES,
    ("linear_shrink_backward", "tensor_cores", True): [
        (128, 128, 64, 4, 8),
        (128, 128, 32, 4, 8),
        (64, 256, 32, 4, 8),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 5, 2),
    ],
    ("linear_expand", "float32", False): [*_FLOAT32_TILES, (64, 32, 16, 3, 4)],
    ("linear_shrink", "float32", False): _FLOAT32_TILES,
    ("linear_shrink", "float32", True): _FLOAT32_TILES,
    ("linear_shrink_backward", "float32", False): _FLOAT32_TILES,
    ("linear_shrink_backward", "float32", True): _FLOAT32_TILES,
}

# The autotuning key: M enters as its power-of-two bucket, so a new batch length does not
# tune again.
_KEY = ["M_BUCKET", "N", "K", "R_PAD"]


def _autotuned(kernel, gemm: str, key: list[str], operand: str):
    """``kernel`` autotuned over ``TILES`` of ``gemm``, per case (``autotune_by_case``)."""
    cases = {
        (kind, dropout): [
            dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=s, num_warps=w) for bm, bn, bk, s, w in tiles
        ]
        for (name, kind, dropout), tiles in TILES.items()
        if name == gemm
    }
    interpreter = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    return autotune_by_case(kernel, cases, key, operand, interpreter)


def _vector(widths: tuple[int, ...], *row_major: torch.Tensor) -> int:
    """8 when every width, and the row stride of every tensor (each with unit column
    stride), is a multiple of 8 (a 16-byte vector of bfloat16 or float16), else 1. Triton
    specialises multiples of 16 only; at widths like 4104 it would load element by element."""
    aligned = all(w % 8 == 0 for w in widths) and all(t.stride(1) == 1 and t.stride(0) % 8 == 0 for t in row_major)
    return 8 if aligned else 1


@triton.jit
def _multiple_of(x, VEC: tl.constexpr):
    """``x``, a multiple of ``VEC``, computed so that Triton knows it is."""
    return (x // VEC) * VEC


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
    acc,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 tile ``acc + (a @ b)[row0:row0+BLOCK_M, col0:col0+BLOCK_N]`` of ``a [M, K] @ b [K, N]``.
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
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.jit
def _bias_row(bias_ptr, stride_bias, N, col0, BLOCK_N: tl.constexpr):
    """float32 ``bias[col0:col0+BLOCK_N]`` as a ``[1, BLOCK_N]`` row (0 past ``N``)."""
    rn = col0 + tl.arange(0, BLOCK_N)
    return tl.load(bias_ptr + rn.to(tl.int64) * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]


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
    VEC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    N, K = _multiple_of(N, VEC), _multiple_of(K, VEC)
    stride_xm, stride_wn = _multiple_of(stride_xm, VEC), _multiple_of(stride_wn, VEC)
    row0, col0 = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # The epilogue first, the main loop accumulating onto it: no second fp32 tile is live.
    acc = scaling * expand_tile(
        h_ptr, bv_ptr, slot_ptr, M, N, R, N_BLOCK_COLS, row0, col0, BO, BR, R_PAD, PRECISION, BLOCK_M, BLOCK_N
    )
    if HAS_BIAS:
        acc += _bias_row(bias_ptr, stride_bias, N, col0, BLOCK_N)
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
        acc,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    _store_tile(y_ptr, acc, M, N, row0, col0, BLOCK_M, BLOCK_N)


@triton.jit
def _matmul_shrink_tile(
    x_ptr,
    w_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    row0,
    acc,
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``_matmul_tile`` of the first column of output tiles (``col0 = 0``), which also returns
    the float32 tile ``((x * D) @ A.T)[row0:row0+BLOCK_M, :R_PAD]`` (before the dropout scale)
    from the same x tiles (``shrink.shrink_step``)."""
    rm = (row0 + tl.arange(0, BLOCK_M)) % M
    rn = tl.arange(0, BLOCK_N) % N
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tile_offsets(rm, rk, stride_xm, stride_xk)
    w_ptrs = w_ptr + tile_offsets(rk, rn, stride_wk, stride_wn)
    x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
    w_step = BLOCK_K * tl.cast(stride_wk, tl.int64)
    h = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=rk[None, :] < K - k0, other=0.0)
        w = tl.load(w_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        h = shrink_step(
            x,
            h,
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
            R_PAD,
            RADEMACHER,
            DROPOUT,
            ALIGNED,
            PRECISION,
            BLOCK_M,
            BLOCK_K,
        )
        x_ptrs += x_step
        w_ptrs += w_step
    return acc, h


@triton.jit(do_not_specialize=["key0", "key1", "dkey0", "dkey1"])
def _linear_shrink_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    h_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_bias,
    key0,
    key1,
    bound,
    dkey0,
    dkey1,
    p,
    keep_scale,
    HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr,
    RADEMACHER: tl.constexpr,
    DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    N, K = _multiple_of(N, VEC), _multiple_of(K, VEC)
    stride_xm, stride_wn = _multiple_of(stride_xm, VEC), _multiple_of(stride_wn, VEC)
    row0, col0 = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        acc += _bias_row(bias_ptr, stride_bias, N, col0, BLOCK_N)
    if col0 == 0:
        acc, h = _matmul_shrink_tile(
            x_ptr,
            w_ptr,
            M,
            N,
            K,
            R,
            stride_xm,
            stride_xk,
            stride_wk,
            stride_wn,
            row0,
            acc,
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
            BLOCK_N,
            BLOCK_K,
        )
        if DROPOUT:
            h = h * keep_scale
        _store_tile(h_ptr, h, M, R, row0, 0, BLOCK_M, R_PAD)
    else:
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
            acc,
            PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
    _store_tile(y_ptr, acc, M, N, row0, col0, BLOCK_M, BLOCK_N)


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
    VEC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    N, K = _multiple_of(N, VEC), _multiple_of(K, VEC)
    stride_dm, stride_wk = _multiple_of(stride_dm, VEC), _multiple_of(stride_wk, VEC)
    row0, col0 = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # The epilogue first, the main loop accumulating onto it: no second fp32 tile is live.
    acc = shrink_backward_tile(
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
        acc,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    _store_tile(dx_ptr, acc, M, N, row0, col0, BLOCK_M, BLOCK_N)


_linear_expand = _autotuned(_linear_expand_kernel, "linear_expand", _KEY, "x_ptr")
_linear_shrink = _autotuned(_linear_shrink_kernel, "linear_shrink", _KEY + ["DROPOUT"], "x_ptr")
_linear_shrink_backward = _autotuned(
    _linear_shrink_backward_kernel, "linear_shrink_backward", _KEY + ["DROPOUT"], "dy_ptr"
)


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
    _linear_expand[_grid(m, n)](
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
        VEC=_vector((k, n), x, weight),
        PRECISION=dot_precision(x.dtype),
    )
    return y


def linear_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seed,
    r: int,
    dist: str = "uniform",
    dropout_p: float = 0.0,
    dropout_seed=0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)`` = ``(x @ W.T + b, (x * D) @ A.T)`` ``([M, out], [M, r])`` in one kernel, x
    read once, for a 2-D ``x`` ``[M, in]``; A and D regenerated from their seeds. ``x``,
    ``weight`` and ``bias`` may have any strides."""
    check_dtype("linear_shrink", x)
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    h = torch.empty(m, r, dtype=x.dtype, device=x.device)
    if m == 0:
        return y, h
    _linear_shrink[_grid(m, n)](
        x,
        weight,
        bias if bias is not None else x,
        y,
        h,
        m,
        n,
        k,
        r,
        triton.next_power_of_2(m),
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        **rng_args(seed, k, dist, dropout_p, dropout_seed),
        HAS_BIAS=bias is not None,
        R_PAD=tile(r),
        VEC=_vector((k, n), x, weight),
        PRECISION=dot_precision(x.dtype),
    )
    return y, h


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
    _linear_shrink_backward[_grid(m, n)](
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
        VEC=_vector((k, n), dy, weight),
        PRECISION=dot_precision(dy.dtype),
    )
    return dx


@triton.jit
def _dot_probe_kernel(a_ptr, b_ptr, c_ptr, SIZE: tl.constexpr):
    """``c = a @ b`` for contiguous ``SIZE x SIZE`` tiles, c in float32."""
    i = tl.arange(0, SIZE)
    offsets = i[:, None] * SIZE + i[None, :]
    tl.store(c_ptr + offsets, tl.dot(tl.load(a_ptr + offsets), tl.load(b_ptr + offsets)))


@functools.cache
def interpreter_dot_is_right(dtype: torch.dtype) -> bool:
    """Whether Triton's CPU interpreter (``TRITON_INTERPRET=1``) multiplies ``dtype`` tiles
    right: one 16 x 16 ``tl.dot`` of small integers (exact in every dtype and in float32
    accumulation) against torch, run once per process. triton 3.8's gets bfloat16 wrong (it
    multiplies the raw bit patterns); tests/conftest.py replaces that dot for the tests and
    calls ``interpreter_dot_is_right.cache_clear()``."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-3, 4, (16, 16), generator=g).to(dtype) for _ in range(2))
    c = torch.empty(16, 16)
    _dot_probe_kernel[(1,)](a, b, c, SIZE=16)
    return torch.equal(c, a.float() @ b.float())
