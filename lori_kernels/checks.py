"""Validation of the public operators' arguments, shared by every backend.

The checks read only metadata (shapes, dtypes, devices) and the Python arguments, so they
cost no device synchronisation. ``check_lori_linear_args`` returns a call's non-tensor
arguments (and its dropout seed, as a tensor) as a ``LayerSpec``. The content of
``b_blocks`` (range, order, uniqueness) is checked by ``block_sparse.check_b_blocks`` where
the blocks are made or loaded, and by the reference backend on every eager call.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from lori_kernels import rng
from lori_kernels.block_sparse import check_b_layout, check_block

__all__ = [
    "COMPUTE_DTYPES",
    "LayerSpec",
    "check_base",
    "check_delta_weight_args",
    "check_lori_linear_args",
    "check_lori_linear_multi_args",
    "check_row_adapters",
]

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LayerSpec:
    """The non-tensor arguments of one LoRI layer call, and its dropout seed."""

    seed: int  # int64 (the uint64 in two's complement); 0 with a stored A
    in_features: int
    out_features: int
    r: int
    block: tuple[int, int]
    scaling: float
    dist: str
    dropout_p: float
    dropout_seed: torch.Tensor  # one int64 (the uint64 in two's complement), read inside the layer's ops


def _check_tensor(name: str, t, x: torch.Tensor, x_name: str = "x") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {x_name} has {x.dtype}; they must match")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}; they must match")


def _check_common(r, block, scaling, dist) -> tuple[int, int]:
    """The checks ``lori_linear`` and ``delta_weight`` share; returns ``block`` as a tuple."""
    block = check_block(block, r)
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if dist not in rng.DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {rng.DISTRIBUTIONS}, got {dist!r}")
    return block


def _check_seed_or_a(seed, a, r: int, in_features: int, like: torch.Tensor, like_name: str = "x") -> int:
    """The int64 seed, or 0 once a stored A ``[r, in_features]`` (frozen, in ``like``'s
    dtype and on its device) stands in for it."""
    if a is None:
        return rng.to_int64(seed)
    if seed is not None:
        raise ValueError("give a seed or a stored A, not both: pass seed=None with a=...")
    _check_tensor("a", a, like, like_name)
    if tuple(a.shape) != (r, in_features):
        raise ValueError(f"a must have shape [r, in] = [{r}, {in_features}], got {list(a.shape)}")
    if a.requires_grad:
        raise ValueError("a requires grad, but LoRI keeps A frozen; detach it")
    return 0


def _check_x(x, min_dims: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < min_dims:
        least = "one dimension" if min_dims == 1 else f"{min_dims} dimensions (rows first)"
        raise ValueError(f"x must have at least {least} (its last is in_features)")


def _check_weight(x, weight, bias, min_dims: int) -> tuple[int, int]:
    """``(out_features, in_features)`` of ``x`` and the frozen ``weight`` and ``bias``."""
    _check_x(x, min_dims)
    _check_tensor("weight", weight, x)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight [out, in] = "
            f"{list(weight.shape)} expects {in_features}"
        )
    if weight.requires_grad:
        raise ValueError(
            "weight requires grad, but LoRI keeps the base weight frozen and lori_linear does "
            "not compute its gradient; call weight.requires_grad_(False)"
        )
    if bias is not None:
        _check_tensor("bias", bias, x)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
        if bias.requires_grad:
            raise ValueError("bias requires grad, but LoRI keeps it frozen; detach it")
    return out_features, in_features


def _check_adapter_only(x, weight, bias, out_features, min_dims: int) -> tuple[int, int]:
    """``(out_features, in_features)`` of the adapter-only form: no weight, no bias."""
    _check_x(x, min_dims)
    if weight is not None:
        raise ValueError("out_features is given only without a weight (the adapter alone); a weight's shape sets it")
    if bias is not None:
        raise ValueError("bias belongs to the base layer: without a weight (the adapter alone) pass bias=None")
    if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features <= 0:
        raise ValueError(
            f"without a weight (the adapter alone) out_features must be a positive int, got {out_features!r}"
        )
    return out_features, x.shape[-1]


def check_base(x, weight, bias, out_features, min_dims: int = 1) -> tuple[int, int]:
    """``(out_features, in_features)`` of a layer operator's ``x`` and frozen ``weight`` and
    ``bias``, or of its adapter-only form (no weight, no bias, ``out_features`` given)."""
    if weight is None or out_features is not None:
        return _check_adapter_only(x, weight, bias, out_features, min_dims)
    return _check_weight(x, weight, bias, min_dims)


def check_lori_linear_args(
    x, weight, bias, seed, b_values, b_blocks, r, block, scaling, dist, dropout_p, dropout_seed, a, out_features
) -> LayerSpec:
    """The ``LayerSpec`` of a ``lori_linear`` call (arguments in its order), once they are right."""
    out_features, in_features = check_base(x, weight, bias, out_features)
    block = _check_common(r, block, scaling, dist)
    check_b_layout(b_values, b_blocks, block)
    _check_tensor("b_values", b_values, x)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return LayerSpec(
        seed=_check_seed_or_a(seed, a, r, in_features, x),
        in_features=in_features,
        out_features=out_features,
        r=r,
        block=block,
        scaling=float(scaling),
        dist=dist,
        dropout_p=float(dropout_p),
        dropout_seed=_dropout_seed_tensor(dropout_seed) if dropout_p > 0 else _NO_DROPOUT_SEED,
    )


# The dropout seed of every call without dropout (never read): one tensor, not one per call.
_NO_DROPOUT_SEED = torch.zeros((), dtype=torch.int64)


def _dropout_seed_tensor(dropout_seed) -> torch.Tensor:
    """A dropout seed as a one-element int64 tensor: a seed tensor is checked by its
    metadata only (its value is read inside the custom ops, so ``torch.compile`` neither
    guards on it nor breaks), an int becomes a CPU tensor."""
    if isinstance(dropout_seed, torch.Tensor):
        return rng.check_seed_tensor(dropout_seed, "dropout_seed")
    return torch.tensor(rng.to_int64(dropout_seed), dtype=torch.int64, device="cpu")


def check_delta_weight_args(
    seed, b_values, b_blocks, out_features, in_features, r, scaling, dist, a, columns
) -> tuple[int, range]:
    """The int64 seed (0 with a stored A) and the columns of a ``delta_weight`` call
    (arguments in its order), once they are right."""
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(b_values, torch.Tensor) or b_values.dim() != 3:
        got = tuple(b_values.shape) if isinstance(b_values, torch.Tensor) else type(b_values).__name__
        raise ValueError(f"b_values must be a tensor [nnz, bo, br], got {got}")
    block = _check_common(r, tuple(b_values.shape[1:]), scaling, dist)
    check_b_layout(b_values, b_blocks, block)
    if not isinstance(columns, slice) or columns.step not in (None, 1):
        raise ValueError(f"columns must be a slice of step 1, got {columns!r}")
    like = b_values.new_empty(0, dtype=torch.float32)  # a stored A is taken in float32
    seed = _check_seed_or_a(seed, None if a is None else a.float(), r, in_features, like, "b_values")
    return seed, range(*columns.indices(in_features))


MULTI_GRAD_ERROR = (
    "lori_linear_multi (mixed-adapter batches) is inference only and has no gradients: run it under "
    "torch.no_grad() or torch.inference_mode(), with no input requiring grad"
)


def check_lori_linear_multi_args(x, in_features: int, out_features: int, row_adapters, packed):
    """``(row_adapters as a tuple, tokens per row)`` of a ``lori_linear_multi`` call over checked
    ``x`` (``check_base``) and ``packed`` adapters, once they are right. The adapter index of
    each row is checked when the row layout makes its plan (``PackedAdapters.plan``)."""
    if packed.out_features != out_features:
        raise ValueError(f"the adapters were packed for {packed.out_features} outputs, the weight has {out_features}")
    _check_tensor("adapters[0].b_values", packed.adapters[0].b_values, x)  # pack_adapters: one dtype and device
    for k in packed.stored_a:
        a, r = packed.adapters[k].a, packed.adapters[k].r
        if tuple(a.shape) != (r, in_features):
            raise ValueError(f"adapters[{k}].a must have shape [r, in] = [{r}, {in_features}], got {list(a.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or packed.requires_grad):
        raise RuntimeError(MULTI_GRAD_ERROR)
    if isinstance(row_adapters, torch.Tensor):
        if row_adapters.is_floating_point() or row_adapters.is_complex() or row_adapters.dim() != 1:
            raise TypeError(
                f"row_adapters must be a 1-D integer tensor, got {row_adapters.dtype} {list(row_adapters.shape)}"
            )
        row_adapters = row_adapters.tolist()
    rows = tuple(row_adapters)
    if len(rows) != x.shape[0]:
        raise ValueError(f"row_adapters has {len(rows)} entries but x has {x.shape[0]} rows (its first dimension)")
    return rows, math.prod(x.shape[1:-1]) if x.shape[0] else 0


def check_row_adapters(rows: tuple, n_adapters: int) -> None:
    """Refuse ``rows`` unless each is an adapter index in ``[0, n_adapters)`` or -1 (the base)."""
    bad = [a for a in rows if not isinstance(a, numbers.Integral) or isinstance(a, bool) or not -1 <= a < n_adapters]
    if bad:
        raise ValueError(
            f"row_adapters must hold adapter indices in [0, {n_adapters}) or -1 (the base), got {bad[0]!r}"
        )
