"""The public operators: ``generate_a`` and ``lori_linear``, dispatched to a backend."""

from __future__ import annotations

import torch

from lori_kernels import backends, rng
from lori_kernels.layer_spec import check_lori_linear_args
from lori_kernels.reference import lori_linear_ref

__all__ = ["generate_a", "lori_linear"]


def _lori_linear_backend(name: str):
    """lori_linear's implementation for a backend name (backends.py says which run where);
    the Triton kernels are imported (and defined) on first use."""
    if name == "triton":
        from lori_kernels.triton_kernels.layer import lori_linear_triton

        return lori_linear_triton
    return lori_linear_ref


def generate_a(
    seed: int | torch.Tensor,
    r: int,
    d_in: int,
    *,
    dist: str = "uniform",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The frozen LoRI A ``[r, d_in]`` of a 64-bit ``seed``, exactly per LoRI-RNG v1.

    Computed in float32 (bit-identical on every backend), then rounded to ``dtype``.
    ``seed`` is the uint64 value, its two's-complement int64, or an int64 tensor.
    """
    if r < 0 or d_in <= 0:
        raise ValueError(f"A must have r >= 0 rows and d_in > 0 columns, got r={r}, d_in={d_in}")
    if dist not in rng.DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {rng.DISTRIBUTIONS}, got {dist!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    chosen = backends.resolve(backend, "generate_a", device)
    if chosen == "reference":
        a = rng.generate_a_tile(seed, d_in, 0, r, 0, d_in, dist=dist, device=device)
    elif chosen == "triton":
        from lori_kernels.triton_kernels.philox import generate_a_tile

        a = generate_a_tile(seed, d_in, 0, r, 0, d_in, dist=dist, device=device)
    else:
        seed_t = torch.tensor(rng.to_int64(seed), dtype=torch.int64, device=device)
        a = torch.ops.lori.generate_a(seed_t, d_in, 0, r, 0, d_in, dist)
    return a.to(dtype)


def lori_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seed: int | torch.Tensor,
    b_values: torch.Tensor,
    b_blocks: torch.Tensor,
    *,
    r: int,
    block: tuple[int, int],
    scaling: float,
    dist: str = "uniform",
    dropout_p: float = 0.0,
    dropout_seed: int | torch.Tensor = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """One LoRI layer: ``y = x @ W.T + b + scaling * ((x * D) @ A.T) @ B.T``.

    ``weight`` [out, in] and ``bias`` are frozen; A [r, in] is regenerated from ``seed``;
    B [out, r] is block-sparse with blocks ``block = (bo, br)``: ``b_values`` [nnz, bo, br]
    at ``b_blocks`` int32 [nnz, 2] (block row, block column), sorted and unique. ``D`` is
    the dropout mask of ``dropout_seed`` scaled by 1/(1-p). Differentiable in ``x`` and
    ``b_values``; only ``x @ A.T`` (M x r) is saved for backward. ``x`` may have leading
    batch dimensions.
    """
    spec = check_lori_linear_args(
        x, weight, bias, seed, b_values, b_blocks, r=r, block=block, scaling=scaling,
        dist=dist, dropout_p=dropout_p, dropout_seed=dropout_seed,
    )
    chosen = backends.resolve(backend, "lori_linear", x.device, x.dtype)
    return _lori_linear_backend(chosen)(x, weight, bias, b_values, b_blocks, spec)
