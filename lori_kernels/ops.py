"""The public operators ``lori_linear``, ``generate_a`` and ``delta_weight``: each checks its
arguments (``checks``), asks ``backends.resolve`` which backend runs it and calls that
backend's fused layer (``fused.LAYERS``) or kernels. Models and merging reach the kernels
only through these.
"""

from __future__ import annotations

import torch

from lori_kernels import backends, fused, rng
from lori_kernels.checks import check_delta_weight_args, check_lori_linear_args

__all__ = ["delta_weight", "generate_a", "lori_linear"]


def lori_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seed: int | torch.Tensor | None,
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
    a: torch.Tensor | None = None,
) -> torch.Tensor:
    """One LoRI layer: ``y = x @ W.T + b + scaling * ((x * D) @ A.T) @ B.T``.

    ``weight`` [out, in] and ``bias`` are frozen; A [r, in] is regenerated from ``seed``, or
    given as ``a`` (a stored A, frozen, in x's dtype; ``seed`` then None: adapters imported
    from PEFT, merges of adapters with different seeds); B [out, r] is block-sparse with
    blocks ``block = (bo, br)``: ``b_values`` [nnz, bo, br] at ``b_blocks`` int32 [nnz, 2]
    (block row, block column), sorted and unique. ``D`` is the dropout mask of
    ``dropout_seed`` scaled by 1/(1-p); ``dropout_seed`` is an int or a one-element int64
    tensor (best on the CPU: it is read on the host), which ``torch.compile`` neither guards
    on nor reads while tracing. Differentiable in ``x`` and ``b_values``, once (no
    second-order gradients); only ``x @ A.T`` (M x r) is saved for backward. ``x`` may have
    leading batch dimensions.
    """
    spec = check_lori_linear_args(
        x, weight, bias, seed, b_values, b_blocks, r, block, scaling, dist, dropout_p, dropout_seed, a
    )
    layer = fused.LAYERS[backends.resolve(backend, "lori_linear", x.device, x.dtype)]
    return layer(x, weight, bias, b_values, b_blocks, spec, a)


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
    kernels = backends.kernels(backends.resolve(backend, "generate_a", device))
    return kernels.generate_a(seed, d_in, 0, r, 0, d_in, dist=dist, device=device).to(dtype)


def delta_weight(
    seed: int | torch.Tensor | None,
    b_values: torch.Tensor,
    b_blocks: torch.Tensor,
    *,
    out_features: int,
    in_features: int,
    r: int,
    scaling: float,
    dist: str = "uniform",
    a: torch.Tensor | None = None,
    columns: slice = slice(None),
    backend: str = "auto",
) -> torch.Tensor:
    """``ΔW[:, columns] = scaling · B · A[:, columns]`` ``[out_features, len(columns)]`` in
    float32: what folding a LoRI adapter adds to its base weight ``[out_features, in_features]``.

    B is ``b_values`` [nnz, bo, br] at ``b_blocks`` (as in ``lori_linear``), and only its kept
    blocks are read: ``ΔWᵀ = scaling · Aᵀ · Bᵀ`` is the backend's ``expand_`` kernel. The
    columns of A are regenerated from ``seed``, or taken from a stored ``a`` [r, in_features]
    (``seed`` then None). ``columns`` (a slice of step 1) bounds the memory: a large layer
    folds a slab of columns at a time.
    """
    seed, cols = check_delta_weight_args(
        seed, b_values, b_blocks, out_features, in_features, r, scaling, dist, a, columns
    )
    device = b_values.device
    kernels = backends.kernels(backends.resolve(backend, "delta_weight", device, torch.float32))
    if a is None:
        a_cols = kernels.generate_a(seed, in_features, 0, r, cols.start, len(cols), dist=dist, device=device)
    else:
        a_cols = a[:, cols.start : cols.stop].float()
    delta_t = torch.zeros(len(cols), out_features, device=device)
    kernels.expand_(delta_t, a_cols.t().contiguous(), b_values.float().contiguous(), b_blocks, float(scaling))
    return delta_t.t()
