"""Validation of one ``lori_linear`` call, shared by every backend.

``check_lori_linear_args`` reads only metadata (shapes, dtypes, devices) and the Python
arguments, so it costs no device synchronisation; it returns the call's non-tensor
arguments (and the dropout seed, which may be a tensor) as a ``LayerSpec``. The content
of ``b_blocks`` (range, order, uniqueness) is checked by ``block_sparse.check_b_blocks``
where the blocks are made or loaded, and by the reference backend on every eager call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lori_kernels import rng
from lori_kernels.block_sparse import check_b_layout, check_block

__all__ = ["LayerSpec", "check_lori_linear_args", "COMPUTE_DTYPES"]

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LayerSpec:
    """The non-tensor arguments of one LoRI layer call, and its dropout seed."""

    seed: int  # uint64
    in_features: int
    out_features: int
    r: int
    block: tuple[int, int]
    scaling: float
    dist: str
    dropout_p: float
    dropout_seed: int | torch.Tensor  # uint64, or a one-element int64 tensor (read by the kernels' ops)

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0


def _check_tensor(name: str, t, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must match")


def check_lori_linear_args(
    x, weight, bias, seed, b_values, b_blocks, *, r, block, scaling, dist, dropout_p, dropout_seed
) -> LayerSpec:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
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
    block = check_block(block, r)
    check_b_layout(b_values, b_blocks, block)
    _check_tensor("b_values", b_values, x)
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if dist not in rng.DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {rng.DISTRIBUTIONS}, got {dist!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return LayerSpec(
        seed=rng.to_uint64(seed),
        in_features=in_features,
        out_features=out_features,
        r=r,
        block=block,
        scaling=float(scaling),
        dist=dist,
        dropout_p=float(dropout_p),
        dropout_seed=_check_dropout_seed(dropout_seed) if dropout_p > 0 else 0,
    )


def _check_dropout_seed(dropout_seed) -> int | torch.Tensor:
    """A dropout seed as a uint64, or a seed tensor checked by its metadata only (its value
    is read inside the custom ops, so ``torch.compile`` neither guards on it nor breaks)."""
    if isinstance(dropout_seed, torch.Tensor):
        return rng.check_seed_tensor(dropout_seed, "dropout_seed")
    return rng.to_uint64(dropout_seed)
