"""The public operators ``lori_linear``, ``lori_linear_multi``, ``generate_a`` and ``delta_weight``: each checks its
arguments (``checks``), asks ``backends.resolve`` which backend runs it and calls that
backend's fused layer (``fused.LAYERS``) or kernels. Models and merging reach the kernels
only through these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lori_kernels import backends, checks, fused, multi, rng
from lori_kernels.multi import AdapterSpec, PackedAdapters

__all__ = ["delta_weight", "generate_a", "lori_linear", "lori_linear_multi"]


def lori_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
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
    out_features: int | None = None,
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
    leading batch dimensions. Under ``torch.autocast`` for x's device the layer runs in the
    autocast dtype, as ``F.linear`` does: the floating-point arguments are cast to it (``b_values``
    differentiably, so its gradient reaches the float32 parameter in float32).

    The adapter alone, ``scaling * ((x * D) @ A.T) @ B.T``: ``weight=None``, ``bias=None`` and
    ``out_features`` given, for a base layer that runs its own forward (``LoRILinear`` over a
    quantized weight: torchao's tensor subclasses, bitsandbytes' layers). The adapter's part
    then starts from zeros ([M, out] written once more than with a weight).
    """
    x, weight, bias, b_values, a = _autocast(x, weight, bias, b_values, a)
    spec = checks.check_lori_linear_args(
        x, weight, bias, seed, b_values, b_blocks, r, block, scaling, dist, dropout_p, dropout_seed, a, out_features
    )
    layer = fused.LAYERS[backends.resolve(backend, "lori_linear", x.device, x.dtype)]
    return layer(x, weight, bias, b_values, b_blocks, spec, a)


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` cast to the autocast dtype when autocast is on for the first one's device
    (None stays None); as they are otherwise."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def lori_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    row_adapters,
    adapters: PackedAdapters | Sequence[AdapterSpec],
    *,
    backend: str = "auto",
    out_features: int | None = None,
) -> torch.Tensor:
    """Many LoRI adapters of one layer in one batch: row ``i`` of ``x`` (its first dimension)
    gets ``y_i = x_i @ W.T + b + s_a * (x_i @ A_a.T) @ B_a.T`` with ``a = row_adapters[i]``, or
    the base alone where ``row_adapters[i]`` is -1.

    ``adapters`` are ``lori_kernels.AdapterSpec`` (seed or stored A, compact B as in
    ``lori_linear``, r, block, scaling, dist; ``b_values`` in x's dtype), or those packed once
    by ``lori_kernels.pack_adapters(adapters, out_features)`` for many calls (packing
    concatenates B: a copy). Adapters with the same seed, r and dist share one shrink
    ``h = x_g @ A.T`` over all their rows; each block shape of a group then runs one segmented
    block-sparse expand over its rows sorted by adapter (Punica's SGMV segments).
    ``row_adapters`` (ints, or an integer tensor read on the host: segment sizes set the
    launch) has one entry per row of ``x``, which may have more dimensions (``[batch, tokens,
    in]``: each row's tokens share its adapter). Each row's result equals ``lori_linear`` with
    its adapter alone, up to summation order. Inference only: no dropout, and nothing may
    require grad under grad mode (run it under ``torch.no_grad()``). ``weight=None``, ``bias=None``
    and ``out_features``: the adapters' part alone, as ``lori_linear`` without a weight.
    """
    out_features, in_features = checks.check_base(x, weight, bias, out_features, min_dims=2)
    packed = adapters if isinstance(adapters, PackedAdapters) else multi.pack_adapters(adapters, out_features)
    rows, tokens = checks.check_lori_linear_multi_args(x, in_features, out_features, row_adapters, packed)
    name = backends.resolve(backend, "lori_linear_multi", x.device, x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    plan = packed.plan(rows, tokens)
    y = multi.forward(backends.kernels(name), x2, weight, bias, out_features, packed, plan)
    return y.reshape(*x.shape[:-1], out_features)


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
    seed, cols = checks.check_delta_weight_args(
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
