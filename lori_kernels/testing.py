"""Measuring helpers for tests and benchmarks: what a computation saves for backward, and
the memory a (quantized) tensor holds."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["plain_tensors", "saved_bytes", "storage_bytes"]


def saved_bytes(fn: Callable[[], object], exclude: tuple = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, leaving out
    those that share storage with a tensor in ``exclude`` (frozen weights, parameters,
    index buffers: memory the model holds anyway); quantized tensors by ``plain_tensors``."""
    ignore = {p.untyped_storage().data_ptr() for t in exclude if t is not None for p in plain_tensors(t)}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        for p in plain_tensors(t):
            if p.untyped_storage().data_ptr() not in ignore:
                total += p.numel() * p.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s data: ``t`` itself, or what a tensor subclass wraps
    (torchao's quantized tensors, recursively); with the tensors bitsandbytes keeps beside a
    quantized weight (``Params4bit.quant_state`` and its nested ``state2``, ``Int8Params.SCB``)."""
    if is_traceable_wrapper_subclass(t):
        return [x for name in t.__tensor_flatten__()[0] for x in plain_tensors(getattr(t, name))]
    found = [t, *(v for v in vars(t).values() if isinstance(v, torch.Tensor))]
    state = getattr(t, "quant_state", None)
    while state is not None:
        found += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
        state = getattr(state, "state2", None)
    return found


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages under ``tensors`` (quantized ones by ``plain_tensors``):
    views and aliases count once."""
    storages = {}
    for t in tensors:
        for plain in plain_tensors(t) if t is not None else ():
            storage = plain.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
    return sum(storages.values())
