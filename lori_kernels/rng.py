"""LoRI-RNG v1 in plain torch: the generator that regenerates A and dropout masks.

This is the reference every backend (C++, CUDA, Triton) must reproduce bit for bit;
the rules are in ``docs/RNG_SPEC.md`` and the known answers in
``tests/data/rng_golden_v1.json``.

torch has no full uint32 arithmetic, so 32-bit words are held in int64 tensors and
masked with ``0xffffffff``; 32x32-bit products are split into 16-bit halves so that
they never overflow int64. A seed given as a tensor is never read on the host, so
``torch.compile`` traces the generator from it; ``dropout_seed_tensor`` (the custom op
``lori_rng::dropout_seed``) turns a count of forwards held in a tensor into a dropout seed.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "RNG_VERSION",
    "STREAM_A",
    "STREAM_DROPOUT",
    "DISTRIBUTIONS",
    "to_uint64",
    "to_int64",
    "check_seed_tensor",
    "splitmix64",
    "fnv1a64",
    "layer_seed",
    "dropout_seed",
    "dropout_seed_tensor",
    "philox4x32_10",
    "random_words",
    "a_bound",
    "generate_a_tile",
    "dropout_scale",
    "dropout_keep",
]

RNG_VERSION = "lori-rng-v1"
STREAM_A = 0
STREAM_DROPOUT = 1
DISTRIBUTIONS = ("uniform", "rademacher")

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_PEFT_PREFIX = "base_model.model."


def to_uint64(seed: int | torch.Tensor) -> int:
    """A seed as a Python int in [0, 2^64): accepts the uint64 value, its two's-complement
    int64 (how a seed is stored in a tensor or checkpoint), or a one-element int64 tensor."""
    if isinstance(seed, torch.Tensor):
        seed = int(check_seed_tensor(seed).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside [-2^63, 2^64): not a 64-bit value")
    return seed & _M64


def check_seed_tensor(seed: torch.Tensor, name: str = "seed") -> torch.Tensor:
    """``seed`` itself, once its metadata say it holds one int64 value (nothing is read)."""
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(
            f"{name} tensor must hold one int64 value, got shape {tuple(seed.shape)} and dtype {seed.dtype}"
        )
    return seed


def to_int64(seed: int | torch.Tensor) -> int:
    """The two's-complement int64 of a 64-bit seed: what an int64 tensor can hold."""
    s = to_uint64(seed)
    return s - 2**64 if s >= 2**63 else s


def splitmix64(x: int) -> int:
    """One SplitMix64 output for state ``x`` (all arithmetic mod 2^64)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def fnv1a64(data: str | bytes) -> int:
    """FNV-1a 64-bit hash of the UTF-8 bytes of ``data``."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return h


def layer_seed(global_seed: int, name: str) -> int:
    """The uint64 seed of the layer called ``name`` (as in ``model.named_modules()``)
    under a model-wide seed; a PEFT ``base_model.model.`` prefix is ignored."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return splitmix64(to_uint64(global_seed) ^ fnv1a64(name))


def dropout_seed(layer_seed: int, step: int, rank: int = 0) -> int:
    """The uint64 seed of the dropout mask that a layer with seed ``layer_seed`` draws in its
    model's ``step``-th training forward (counted from 1) on data-parallel ``rank``:
    ``splitmix64(layer_seed XOR splitmix64(step + (rank << 40)))``, all mod 2^64."""
    return splitmix64(to_uint64(layer_seed) ^ splitmix64((step + (rank << 40)) & _M64))


@torch.library.custom_op("lori_rng::dropout_seed", mutates_args=())
def _dropout_seed_op(step: torch.Tensor, layer_seed: int, rank: int) -> torch.Tensor:
    """``dropout_seed`` as a 0-dim int64 CPU tensor; ``layer_seed`` in two's complement."""
    return torch.tensor(to_int64(dropout_seed(layer_seed, int(step), rank)), dtype=torch.int64, device="cpu")


@_dropout_seed_op.register_fake
def _(step, layer_seed, rank):
    return torch.empty((), dtype=torch.int64, device="cpu")


def dropout_seed_tensor(layer_seed: int, step: torch.Tensor, rank: int = 0) -> torch.Tensor:
    """``dropout_seed`` of a step held in a one-element int64 CPU tensor, as a 0-dim int64
    CPU tensor (the uint64 in two's complement). A custom op reads the step, so
    ``torch.compile`` neither guards on its value nor breaks its graph there: a count of
    forwards kept in a tensor compiles once."""
    return _dropout_seed_op(step, to_int64(layer_seed), rank)


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * m`` for uint32 words ``a`` held in int64."""
    pl = a * (m & 0xFFFF)
    t = a * (m >> 16) + (pl >> 16)
    lo = ((t & 0xFFFF) << 16) | (pl & 0xFFFF)
    return t >> 16, lo


def philox4x32_10(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: int | torch.Tensor,
    k1: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on counters held in int64 tensors (values in [0, 2^32)); the key is
    two Python ints or two 0-dim int64 tensors. Returns the four output words as int64
    tensors."""
    for round_ in range(10):
        if round_:
            k0 = (k0 + _PHILOX_W0) & _M32
            k1 = (k1 + _PHILOX_W1) & _M32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _philox_key(seed: int | torch.Tensor, device) -> tuple[int, int] | tuple[torch.Tensor, torch.Tensor]:
    """The Philox key ``(seed & 0xffffffff, seed >> 32)``: two ints, or for a seed tensor two
    0-dim int64 tensors computed without reading it (so ``torch.compile`` traces them). A
    seed on the CPU stays there: a CPU scalar combines with tensors on any device."""
    if not isinstance(seed, torch.Tensor):
        s = to_uint64(seed)
        return s & _M32, s >> 32
    s = check_seed_tensor(seed).reshape(())
    if s.device.type != "cpu":
        s = s.to(device)
    return s & _M32, (s >> 32) & _M32


def random_words(
    seed: int | torch.Tensor,
    stream: int,
    width: int,
    row0: int,
    rows: int,
    col0: int,
    cols: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The 32-bit words (in int64) of ``stream`` for the tile ``[row0:row0+rows,
    col0:col0+cols]`` of a row-major matrix ``width`` columns wide: element ``(j, k)``
    has flat index ``i = j * width + k``. One Philox call serves four consecutive ``i``."""
    if min(rows, cols) < 0 or min(row0, col0) < 0 or width <= 0 or col0 + cols > width:
        raise ValueError(
            f"tile [{row0}:{row0 + rows}, {col0}:{col0 + cols}] does not fit a matrix {width} columns wide"
        )
    if (row0 + rows) * width > 2**64:
        raise ValueError(f"flat indices of rows up to {row0 + rows} x {width} exceed 2^64")
    # Flat indices are uint64; int64 tensors hold them in two's complement, so the
    # quotient by 4 is taken as a logical shift (q < 2^62 is always positive).
    first = to_int64((row0 * width + col0) & _M64)
    starts = torch.arange(rows, dtype=torch.int64, device=device) * width + first
    k0, k1 = _philox_key(seed, starts.device)
    quads = (cols + 3) // 4 + 1  # quads a row of ``cols`` words can touch
    q = ((starts >> 2) & (2**62 - 1)).unsqueeze(1) + torch.arange(quads, dtype=torch.int64, device=device)
    zero = torch.zeros_like(q)
    words = torch.stack(philox4x32_10(q & _M32, q >> 32, zero + stream, zero, k0, k1), dim=-1).reshape(rows, 4 * quads)
    lane = (starts & 3).unsqueeze(1) + torch.arange(cols, dtype=torch.int64, device=device)
    return words.gather(1, lane)


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """float32 ``u = (w >> 8) * 2^-24`` in [0, 1), exact."""
    return (words >> 8).to(torch.float32) * (2.0**-24)


def a_bound(d_in: int) -> float:
    """``float32(1 / sqrt(float64(d_in)))``, PyTorch's kaiming_uniform_(a=sqrt(5)) bound."""
    return float(torch.tensor(1.0 / math.sqrt(d_in), dtype=torch.float32))


def generate_a_tile(
    seed: int | torch.Tensor,
    d_in: int,
    row0: int,
    rows: int,
    col0: int,
    cols: int,
    *,
    dist: str = "uniform",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """float32 tile ``A[row0:row0+rows, col0:col0+cols]`` of the frozen A ``[*, d_in]``."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    words = random_words(seed, STREAM_A, d_in, row0, rows, col0, cols, device)
    bound = torch.tensor(a_bound(d_in), dtype=torch.float32, device=words.device)
    if dist == "rademacher":
        return torch.where((words >> 31) == 0, bound, -bound)
    # 2u - 1 is exact; then exactly one rounding in the product with the bound.
    return (_uniform(words) * 2.0 - 1.0) * bound


def dropout_scale(p: float) -> float:
    """``float32(1 / (1 - float64(float32(p))))``: the factor applied to kept inputs."""
    p32 = float(torch.tensor(p, dtype=torch.float32))
    return float(torch.tensor(1.0 / (1.0 - p32), dtype=torch.float32))


def dropout_keep(
    dropout_seed: int | torch.Tensor,
    p: float,
    m: int,
    d_in: int,
    *,
    row0: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool keep-mask ``[m, d_in]`` for rows ``row0:row0+m`` of the layer input viewed as
    ``[M, d_in]``: element ``i`` is kept iff ``u_i >= float32(p)`` (compared in float32)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    words = random_words(dropout_seed, STREAM_DROPOUT, d_in, row0, m, 0, d_in, device)
    return _uniform(words) >= torch.tensor(p, dtype=torch.float32, device=words.device)
