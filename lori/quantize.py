"""A quantized frozen base, as QLoRA trains over: ``quantize_base(model, kind)`` quantizes a
model's linear layers (every ``nn.Linear`` but the output head, as "all-linear" selects) in
place, before or after ``get_lori_model``. LoRI layers over them run the base layer's own
forward and the adapter beside it (``LoRILinear``, ``lori.layer.is_quantized``).

Kinds (weight-only: activations stay in the model's dtype; each runs on the CPU):

- ``int8``: torchao's ``Int8WeightOnlyConfig`` (int8 per output channel);
- ``int4``: torchao's ``IntxWeightOnlyConfig(torch.int4)``, groups of ``group_size`` along the
  input (torchao's CPU layout keeps each int4 value in a byte: its memory is int8's; the packed
  int4 layouts need a GPU);
- ``nf4``: torchao's ``NF4Tensor`` (QLoRA's 4-bit NormalFloat, two values per byte, blocks of
  ``group_size`` with double-quantized scales);
- ``bnb_nf4``, ``bnb_int8``: bitsandbytes' ``Linear4bit`` (NF4, blocks of ``group_size``) and ``Linear8bitLt``
  (LLM.int8, which also quantizes the activations).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import nn

from lori.model import _output_head

__all__ = ["QUANTIZED_KINDS", "quantize_base", "quantized_weight_bytes", "quantization_targets"]

log = logging.getLogger(__name__)

QUANTIZED_KINDS = ("int8", "int4", "nf4", "bnb_nf4", "bnb_int8")


def quantize_base(model: nn.Module, kind: str, *, group_size: int = 64) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` but its output head, in place, to ``kind``
    (one of ``QUANTIZED_KINDS``; ``group_size``: the int4 groups and the NF4 blocks along
    the input, torchao's and bitsandbytes'). Layers already quantized, and LoRI's adapters,
    are left as they are. Returns ``model``."""
    targets = quantization_targets(model, kind, group_size)  # checked before any layer changes
    for name, linear in targets:
        linear.requires_grad_(False)
        if kind.startswith("bnb_"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _bitsandbytes(linear, kind, group_size))
        else:
            _torchao(linear, kind, group_size)
    log.info("quantized %d linear layers to %s", len(targets), kind)
    return model


def quantization_targets(model: nn.Module, kind: str, group_size: int = 64) -> list[tuple[str, nn.Linear]]:
    """``(name, layer)`` of every linear layer ``quantize_base(model, kind, group_size=...)``
    quantizes: each ``nn.Linear`` but the output head whose weight is a plain parameter (also
    on the ``meta`` device). Raises, naming the layer, where ``kind`` groups the input and a
    layer's width is not a multiple of ``group_size``."""
    if kind not in QUANTIZED_KINDS:
        raise ValueError(f"kind must be one of {QUANTIZED_KINDS}, got {kind!r}")
    head = _output_head(model)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head and type(module.weight) is nn.Parameter
    ]
    grouped = kind in ("int4", "nf4", "bnb_nf4")
    misfit = next((name for name, linear in targets if grouped and linear.in_features % group_size), None)
    if misfit is not None:
        inputs = model.get_submodule(misfit).in_features
        raise ValueError(
            f"{misfit} has {inputs} inputs, not a multiple of group_size {group_size}; nothing was quantized"
        )
    return targets


SAMPLE_ROWS = 256  # rows of the layer quantized_weight_bytes measures


def quantized_weight_bytes(
    kind: str, out_features: int, in_features: int, dtype: torch.dtype, group_size: int = 64
) -> int:
    """Bytes an ``[out_features, in_features]`` weight of ``dtype`` holds once ``quantize_base``
    quantizes it to ``kind`` (its data, scales and the rest: ``lori_kernels.testing.plain_tensors``),
    for ``lori train --plan``: measured on the CPU on a layer of ``SAMPLE_ROWS`` rows of the same
    width, quantized by the same code, and scaled to ``out_features`` rows (every kind keeps its
    scales per row or per group of a row)."""
    return round(_bytes_per_row(kind, in_features, dtype, group_size) * out_features)


@functools.cache
def _bytes_per_row(kind: str, in_features: int, dtype: torch.dtype, group_size: int) -> float:
    from lori_kernels.testing import plain_tensors, storage_bytes

    sample = nn.Linear(in_features, SAMPLE_ROWS, bias=False, dtype=dtype)
    holder = nn.Sequential(sample)
    quantize_base(holder, kind, group_size=group_size)
    weight = holder[0].weight
    return storage_bytes(plain_tensors(weight)) / SAMPLE_ROWS


def _torchao(linear: nn.Linear, kind: str, group_size: int) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_, to_nf4
    from torchao.quantization.granularity import PerGroup

    if kind == "nf4":
        blocks = linear.weight.numel() // group_size
        weight = to_nf4(linear.weight.detach(), group_size, math.gcd(blocks, 256))
        linear.weight = nn.Parameter(weight, requires_grad=False)
        return
    config = Int8WeightOnlyConfig() if kind == "int8" else IntxWeightOnlyConfig(torch.int4, PerGroup(group_size))
    quantize_(linear, config, filter_fn=None)


def _bitsandbytes(linear: nn.Linear, kind: str, group_size: int) -> nn.Linear:
    import bitsandbytes as bnb

    weight, device = linear.weight.detach(), linear.weight.device
    bias = linear.bias is not None
    if kind == "bnb_nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias, compute_dtype=weight.dtype, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=group_size)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes when the weight moves to its device
