"""LoRI-RNG v1 (docs/RNG_SPEC.md) as Triton device functions, and a kernel writing A.

Our own Philox4x32-10, not ``tl.rand``/``tl.randint``, whose streams change between
Triton releases. Flat indices are uint64. Where every row of a tile starts at a flat
index divisible by 4 (``d_in % 4 == 0``, tiles 4-aligned along the row) one Philox call
yields four consecutive words; otherwise each element runs its own call and keeps its
lane.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lori_kernels import rng
from lori_kernels.triton_kernels.indexing import tile_offsets


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counters (tensors) under the uint32 key (k0, k1)."""
    for round_ in tl.static_range(10):
        if round_ > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def random_words(
    key0, key1, stream: tl.constexpr, row_start, ROWS: tl.constexpr, COLS: tl.constexpr, ALIGNED: tl.constexpr
):
    """uint32 words ``[ROWS, COLS]`` of ``stream`` for flat indices ``row_start + c``,
    ``row_start`` a uint64 ``[ROWS, 1]``. ``ALIGNED``: every ``row_start`` is divisible
    by 4 and ``COLS`` too, so one Philox call serves four consecutive columns."""
    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    if ALIGNED:
        q = row_start // 4 + tl.arange(0, COLS // 4)[None, :].to(tl.uint64)
        zero = tl.zeros([ROWS, COLS // 4], dtype=tl.uint32)
        w0, w1, w2, w3 = philox4x32_10(q.to(tl.uint32), (q >> 32).to(tl.uint32), zero + stream, zero, k0, k1)
        # Interleave the four lanes: column 4c + l holds lane l of call c.
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROWS, COLS])
    else:
        i = row_start + tl.arange(0, COLS)[None, :].to(tl.uint64)
        q = i >> 2
        lane = i & 3
        zero = tl.zeros([ROWS, COLS], dtype=tl.uint32)
        w0, w1, w2, w3 = philox4x32_10(q.to(tl.uint32), (q >> 32).to(tl.uint32), zero + stream, zero, k0, k1)
        words = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return words


@triton.jit
def words_to_uniform(w):
    """float32 ``(w >> 8) * 2^-24`` in [0, 1), exact."""
    return (w >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def words_to_a(w, bound, RADEMACHER: tl.constexpr):
    """float32 A values: ``(2u - 1) * bound`` (one rounding), or ``+-bound`` by the top bit."""
    if RADEMACHER:
        a = tl.where((w >> 31) == 0, bound, -bound)
    else:
        a = (words_to_uniform(w) * 2.0 - 1.0) * bound
    return a


@triton.jit
def row_starts(row0, d_in, col0, ROWS: tl.constexpr):
    """uint64 flat indices ``[ROWS, 1]`` of elements ``(row0 + i, col0)`` of a ``[*, d_in]``
    matrix. ``row0 + ROWS`` must fit row0's type: a row past 2^31 needs an int64 ``row0``
    (an int32 one lets ``rows * d_in`` be a 32 x 32-bit multiply, 26 registers fewer in
    ``_shrink_kernel``)."""
    rows = (row0 + tl.arange(0, ROWS)).to(tl.uint64)
    return (rows * d_in + col0)[:, None]


@triton.jit
def a_tile(
    key0,
    key1,
    d_in,
    row0,
    col0,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    bound,
    RADEMACHER: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """float32 tile ``A[row0:row0+ROWS, col0:col0+COLS]`` of A ``[*, d_in]`` (unmasked:
    callers mask rows >= r and columns >= d_in)."""
    row_start = row_starts(row0, d_in, col0, ROWS)
    return words_to_a(random_words(key0, key1, 0, row_start, ROWS, COLS, ALIGNED), bound, RADEMACHER)


@triton.jit
def dropout_keep_tile(key0, key1, d_in, row0, col0, ROWS: tl.constexpr, COLS: tl.constexpr, p, ALIGNED: tl.constexpr):
    """Bool keep-mask of the input tile ``x[row0:row0+ROWS, col0:col0+COLS]`` (x viewed as
    ``[M, d_in]``): kept iff ``u >= float32(p)``."""
    row_start = row_starts(row0, d_in, col0, ROWS)
    return words_to_uniform(random_words(key0, key1, 1, row_start, ROWS, COLS, ALIGNED)) >= p


@triton.jit(do_not_specialize=["key0", "key1", "row0"])
def _rng_tile_kernel(
    out_ptr,
    key0,
    key1,
    width,
    row0,
    rows,
    col0,
    cols,
    bound,
    p,
    KEEP: tl.constexpr,
    RADEMACHER: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Writes a tile of A (float32) or, with KEEP, of a dropout keep-mask (int8)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    tile_row0 = row0.to(tl.int64) + pid_r * BLOCK_R
    tile_col0 = col0 + pid_c * BLOCK_C
    if KEEP:
        value = dropout_keep_tile(key0, key1, width, tile_row0, tile_col0, BLOCK_R, BLOCK_C, p, ALIGNED).to(tl.int8)
    else:
        value = a_tile(key0, key1, width, tile_row0, tile_col0, BLOCK_R, BLOCK_C, bound, RADEMACHER, ALIGNED)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(out_ptr + tile_offsets(r, c, cols, 1), value, mask=(r[:, None] < rows) & (c[None, :] < cols))


def split_seed(seed) -> tuple[int, int]:
    """The Philox key ``(seed & 0xffffffff, seed >> 32)`` of a 64-bit seed."""
    s = rng.to_uint64(seed)
    return s & 0xFFFFFFFF, s >> 32


def _rng_tile(
    seed, width, row0, rows, col0, cols, *, dtype, device, bound=0.0, p=0.0, keep=False, rademacher=False
) -> torch.Tensor:
    if min(row0, rows, col0, cols) < 0 or width <= 0 or col0 + cols > width:
        raise ValueError(f"tile [{row0}:{row0 + rows}, {col0}:{col0 + cols}] does not fit width {width}")
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    key0, key1 = split_seed(seed)
    block_r, block_c = 16, 64
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _rng_tile_kernel[grid](
        out,
        key0,
        key1,
        width,
        row0,
        rows,
        col0,
        cols,
        bound,
        p,
        KEEP=keep,
        RADEMACHER=rademacher,
        ALIGNED=width % 4 == 0 and col0 % 4 == 0,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return out


def generate_a_tile(
    seed, d_in: int, row0: int, rows: int, col0: int, cols: int, *, dist: str = "uniform", device="cuda"
) -> torch.Tensor:
    """float32 ``A[row0:row0+rows, col0:col0+cols]`` written by a Triton kernel; equal bit
    for bit to ``lori_kernels.rng.generate_a_tile``."""
    if dist not in rng.DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {rng.DISTRIBUTIONS}, got {dist!r}")
    return _rng_tile(
        seed,
        d_in,
        row0,
        rows,
        col0,
        cols,
        dtype=torch.float32,
        device=device,
        bound=rng.a_bound(d_in),
        rademacher=dist == "rademacher",
    )


def dropout_keep(dropout_seed, p: float, m: int, d_in: int, *, row0: int = 0, device="cuda") -> torch.Tensor:
    """Bool keep-mask ``[m, d_in]`` written by a Triton kernel; equal to
    ``lori_kernels.rng.dropout_keep``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    p32 = float(torch.tensor(p, dtype=torch.float32))
    return _rng_tile(dropout_seed, d_in, row0, m, 0, d_in, dtype=torch.int8, device=device, p=p32, keep=True).bool()
