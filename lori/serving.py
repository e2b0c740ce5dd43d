"""Mixed-adapter batches: each row of a batch runs its own named adapter (inference), as
PEFT's ``adapter_names=`` does, through ``lori_kernels.lori_linear_multi``: adapters that
share a seed share one shrink, and each adds only its kept blocks.

``adapter_batch(model, names)`` is a context manager: inside it ``model(...)`` and
``model.generate(...)`` give row ``i`` the adapter ``names[i]`` (``None``: the base model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

import lori_kernels
from lori.adapters import adapted_layers, list_adapters
from lori.layer import LoRILinear, is_quantized

__all__ = ["adapter_batch"]


class LayerBatch:
    """One layer's part of a mixed batch: the adapters in use packed once (B cast to the
    base weight's dtype and concatenated), and each row's index among them (-1: none). Called
    by ``LoRILinear.forward`` in place of its own adapter. Over a quantized base layer the
    adapters run alone beside its own forward, in its compute dtype (float32 where a packed
    weight does not tell)."""

    def __init__(self, layer: LoRILinear, used: list[str], row_adapters: tuple[int, ...]):
        adapters = layer.named_adapters()
        self.quantized = is_quantized(layer.base_layer)
        weight = layer.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.dtype = getattr(layer.base_layer, "compute_dtype", None) or dtype
        specs = [_spec(adapters[name], self.dtype) for name in used]
        self.packed = lori_kernels.pack_adapters(specs, layer.out_features) if specs else None
        self.row_adapters = row_adapters
        self._expanded = {1: row_adapters}

    def rows(self, n: int) -> tuple[int, ...]:
        """The adapter of each of ``n`` rows: ``generate`` repeats every row ``k`` times in place
        for ``num_beams`` / ``num_return_sequences`` (``repeat_interleave``), so row ``j`` of a
        batch ``k`` times as large follows row ``j // k``."""
        names = len(self.row_adapters)
        if n % names:
            raise ValueError(
                f"the batch has {n} rows but adapter_batch was given {names} names: one per row (or per "
                "source row of generate's beams and return sequences)"
            )
        k = n // names
        if k not in self._expanded:
            self._expanded[k] = tuple(a for a in self.row_adapters for _ in range(k))
        return self._expanded[k]

    def __call__(self, layer: LoRILinear, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows(x.shape[0])
        if self.packed is None:
            return layer.base_layer(x)
        if self.quantized:
            adapters = lori_kernels.lori_linear_multi(
                x.to(self.dtype), None, None, rows, self.packed, backend=layer.backend, out_features=layer.out_features
            )
            return layer.base_layer(x) + adapters.to(x.dtype)
        weight = layer.base_weight()
        y = lori_kernels.lori_linear_multi(
            x.to(weight.dtype), weight, layer.base_layer.bias, rows, self.packed, backend=layer.backend
        )
        return y.to(x.dtype)


def _spec(adapter, dtype: torch.dtype) -> lori_kernels.AdapterSpec:
    stored = adapter.stored_a is not None
    return lori_kernels.AdapterSpec(
        seed=None if stored else adapter.layer_seed,
        b_values=adapter.b_values.detach().to(dtype),
        b_blocks=adapter.b_blocks,
        r=adapter.r,
        block=adapter.block,
        scaling=adapter.scaling,
        dist=adapter.dist,
        a=adapter.stored_a.to(dtype) if stored else None,
    )


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str | None]):
    """Inside the block, row ``i`` of every batch the model runs uses adapter ``names[i]``
    (a name of ``lori.list_adapters(model)``, or ``None`` for the base model), in
    ``model(...)`` and ``model.generate(...)``: greedy, sampling and beam search, with or
    without a KV cache; a batch ``k`` times as large (``num_beams``, ``num_return_sequences``)
    gives each expanded row its source row's adapter. Each row comes out as the model with
    only its adapter gives it, up to summation order.

    Inference only, like PEFT's ``adapter_names``: the model must be in eval mode, and
    nothing may require grad (``lori_kernels.lori_linear_multi``). Each layer packs the named
    adapters once on entry (their B in the base dtype, concatenated per seed group; on the CPU
    also each seed group's A, r x in, from the first call on); adapters loaded, deleted or
    changed inside the block are not seen."""
    layers = adapted_layers(model, unfolded=True)
    if model.training:
        raise ValueError("adapter_batch is for inference: call model.eval() first")
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise TypeError(f"names must be a non-empty list of adapter names (or None), one per row; got {names!r}")
    loaded = list_adapters(model)
    unknown = sorted({n for n in names if n is not None and n not in loaded}, key=str)
    if unknown:
        raise ValueError(f"adapter_batch names adapters the model does not have: {unknown}; it has {loaded}")
    if any(layer.mixed_batch is not None for layer in layers.values()):
        raise RuntimeError("adapter_batch blocks of one model cannot be nested")
    used = list(dict.fromkeys(n for n in names if n is not None))
    row_adapters = tuple(-1 if n is None else used.index(n) for n in names)
    batches = {name: LayerBatch(layer, used, row_adapters) for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer.mixed_batch = batches[name]
        yield model
    finally:
        for layer in layers.values():
            layer.mixed_batch = None
