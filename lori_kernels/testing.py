"""Measuring helpers for tests and benchmarks: what a computation saves for backward."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["saved_bytes"]


def saved_bytes(fn: Callable[[], object], exclude: tuple = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, leaving out
    those that share storage with a tensor in ``exclude`` (frozen weights, parameters,
    index buffers: memory the model holds anyway)."""
    ignore = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in ignore:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
