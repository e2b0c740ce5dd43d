"""The public operators: ``generate_a`` and ``lori_linear``, dispatched to a backend."""

from __future__ import annotations

from types import ModuleType

import torch

from lori_kernels import _extension, backends, rng
from lori_kernels.fused_layer import LayerKernels
from lori_kernels.layer_spec import check_lori_linear_args

__all__ = ["generate_a", "layer_kernels", "lori_linear"]


def _backend_module(name: str) -> ModuleType:
    """The module of a backend, holding its ``KERNELS`` and its ``lori_linear``; the
    Triton kernels are defined, and the extension's layer registered, on first use."""
    if name == "triton":
        from lori_kernels.triton_kernels import layer as module
    elif name == "triton_epilogue":
        from lori_kernels.triton_kernels import epilogue_layer as module
    elif name in ("cpu_ext", "cuda_ext"):
        from lori_kernels import ops as module  # once the extension is loaded
    else:
        from lori_kernels import reference as module
    return module


def layer_kernels(backend: str) -> LayerKernels:
    """The kernels (shrink, shrink_backward_, expand_, expand_backward, sddmm, and the
    optional GEMMs with epilogues) that a backend's fused layer is made of: for
    benchmarks and kernel-level tests."""
    if backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {backends.BACKENDS}")
    if backend.endswith("_ext") and (error := _extension.load_error()) is not None:
        raise RuntimeError(error)
    return _backend_module(backend).KERNELS


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
    the dropout mask of ``dropout_seed`` scaled by 1/(1-p); ``dropout_seed`` is an int or a
    one-element int64 tensor (best on the CPU: it is read on the host), which
    ``torch.compile`` neither guards on nor reads while tracing. Differentiable in ``x``
    and ``b_values``, once (no second-order gradients); only ``x @ A.T`` (M x r) is saved
    for backward. ``x`` may have leading batch dimensions.
    """
    spec = check_lori_linear_args(
        x,
        weight,
        bias,
        seed,
        b_values,
        b_blocks,
        r=r,
        block=block,
        scaling=scaling,
        dist=dist,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )
    chosen = backends.resolve(backend, "lori_linear", x.device, x.dtype)
    return _backend_module(chosen).lori_linear(x, weight, bias, b_values, b_blocks, spec)
