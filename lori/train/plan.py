"""``lori train --plan``: what one rank of a run holds, worked out before anything is
loaded — the model is built on the ``meta`` device from its ``config.json``, no weights or
data are read.

Per rank, in bytes:

- ``frozen weights``: the base model's shard. FSDP2 shards every parameter along its first
  dimension over the shard group (the whole world, or the ``shard`` dimension of an HSDP
  mesh), padded to a multiple of the group size. With ``quantize_base`` (one process) the
  linear layers it quantizes count as their quantized bytes (``lori.quantize.quantized_weight_bytes``,
  measured on a CPU sample of each width);
- ``trainable b_values``, ``gradients`` (float32, sharded like the weights) and ``AdamW
  state`` (two float32 tensors per parameter);
- ``gathered weights``: what FSDP2 all-gathers at once in the compute dtype: the root's own
  parameters (embeddings, final norm, output layer: kept gathered from forward to
  backward) and two decoder layers (the one running and the one prefetched); none in one
  process, which holds the whole model unsharded;
- ``activations``: what the base model's forward saves for backward, measured by running
  it on ``meta`` tensors for one micro-batch of ``batch_size x max_length`` tokens, plus
  LoRI's ``h`` (tokens x r) per adapted layer; with activation checkpointing, every
  decoder layer's input plus one layer's saved tensors (the one recomputed); attention as
  a fused kernel (flash/memory-efficient SDPA) computes it, without ``length x length``
  probabilities;
- ``logits``: with the chunked loss, two float32 chunks of ``loss_chunk_tokens`` x vocab
  and the gradient of the last hidden states; else the micro-batch's logits in the compute
  dtype, in float32 and their gradient.

Not counted: the CUDA context and allocator fragmentation (leave ~10%), NCCL buffers,
temporary workspaces of kernels. ``tests/test_plan.py`` checks the sharded sizes against
FSDP2 itself at world size 64 under PyTorch's fake process group.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from lori.masks import load_masks
from lori.model import get_lori_model, lori_layers
from lori.quantize import quantization_targets, quantized_weight_bytes
from lori.train.config import TrainConfig
from lori.train.world import build_on_meta, decoder_layers

__all__ = ["MemoryPlan", "memory_plan"]

GIB = 2**30


@dataclasses.dataclass
class MemoryPlan:
    """Bytes one rank holds, by kind (``rows``), for ``world_size`` ranks as ``mesh``."""

    model: str
    world_size: int
    mesh: tuple[int, int]  # (replicate, shard)
    tokens: int  # of one micro-batch
    rows: dict[str, int]
    gpu_memory: float | None = None  # GiB

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory * GIB

    def table(self) -> str:
        """The plan as the lines ``lori train --plan`` prints."""
        replicate, shard = self.mesh
        lines = [
            f"memory plan of one rank: {self.model}, {self.world_size} ranks "
            + (f"(HSDP {replicate} x {shard})" if replicate > 1 else "(FSDP)")
            + f", micro-batch of {self.tokens} tokens",
        ]
        width = max(len(name) for name in self.rows)
        lines += [f"  {name:<{width}}  {value / GIB:10.3f} GiB" for name, value in self.rows.items()]
        lines.append(f"  {'total':<{width}}  {self.total / GIB:10.3f} GiB")
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits() else "does NOT fit"
            lines.append(f"  {verdict} in {self.gpu_memory:g} GiB ({100 * self.total / (self.gpu_memory * GIB):.0f}%)")
        return "\n".join(lines)


def _shard_bytes(t: torch.Tensor, shards: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of one rank's FSDP2 shard of ``t`` (dim 0 split evenly, padded)."""
    size = (dtype or t.dtype).itemsize
    if t.dim() == 0:
        return size
    rows = math.ceil(t.shape[0] / shards)
    return rows * math.prod(t.shape[1:]) * size


def _saved_activations(model: nn.Module, batch_size: int, length: int) -> tuple[int, list[int], list[int]]:
    """Bytes the base model's forward saves for backward on ``meta`` tensors: outside
    the decoder layers, per decoder layer, and each decoder layer's input. Tensors of
    ``length x length`` (attention probabilities and masks) are left out: a fused attention
    kernel (flash or memory-efficient SDPA, what a GPU runs) never stores them."""
    layers = decoder_layers(model)
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    per_layer = [0] * len(layers)
    inputs = [0] * len(layers)
    current = [None]
    outside = [0]

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        attention = t.dim() >= 2 and tuple(t.shape[-2:]) == (length, length)
        if key not in parameters and key not in seen and not attention:
            seen.add(key)
            size = t.untyped_storage().nbytes()
            if current[0] is None:
                outside[0] += size
            else:
                per_layer[current[0]] += size
        return t

    def enter(i):
        def hook(module, args, kwargs):
            current[0] = i
            hidden = args[0] if args else kwargs.get("hidden_states")
            inputs[i] = hidden.numel() * hidden.element_size()

        return hook

    def leave(module, args, output):
        current[0] = None

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave))
    model.requires_grad_(False)  # the base is frozen: its linears save no inputs for weight gradients
    embeddings = model.get_input_embeddings()
    embeddings.weight.requires_grad_(True)  # backward runs through every layer, as with adapters in all of them
    try:
        ids = torch.zeros(batch_size, length, dtype=torch.long, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.get_decoder()(input_ids=ids)
    finally:
        embeddings.weight.requires_grad_(False)
        for handle in handles:
            handle.remove()
    return outside[0], per_layer, inputs


def memory_plan(
    cfg: TrainConfig,
    world_size: int,
    *,
    gpu_memory: float | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> MemoryPlan:
    """The per-rank memory of running ``cfg`` on ``world_size`` ranks (HSDP when
    ``cfg.mesh`` is set), the base in ``compute_dtype`` (bf16: what a GPU run uses)."""
    replicate, shards = cfg.mesh or (1, world_size)
    cfg.check_world_size(world_size)
    if replicate * shards != world_size:
        raise ValueError(f"mesh {replicate}x{shards} needs {replicate * shards} ranks, not {world_size}")
    model = build_on_meta(cfg.model, compute_dtype)
    config = model.config
    quantized = {}  # id(weight) -> its bytes once quantized
    if cfg.quantize_base is not None:
        for _, linear in quantization_targets(model, cfg.quantize_base):
            out_features, in_features = linear.weight.shape
            quantized[id(linear.weight)] = quantized_weight_bytes(
                cfg.quantize_base, out_features, in_features, compute_dtype
            )
    tokens = cfg.batch_size * cfg.max_length
    outside, per_layer, inputs = _saved_activations(model, cfg.batch_size, cfg.max_length)  # the base's, no adapter
    masks = load_masks(cfg.masks) if cfg.masks else None
    # Masks are read (they are small) so the kept blocks are the run's; adapters then live on
    # the CPU, a dense B (no masks) on meta like the base.
    get_lori_model(model, cfg.adapter, masks=masks, device="cpu" if masks else "meta")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(_shard_bytes(p, shards, torch.float32) for p in trainable)

    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() * compute_dtype.itemsize for p in frozen if id(p) not in in_layers)
    layer_bytes = max(sum(p.numel() for p in layer.parameters()) * compute_dtype.itemsize for layer in layers)

    h = sum(tokens * layer.r * compute_dtype.itemsize for layer in lori_layers(model).values())
    if cfg.activation_checkpointing:
        activations = outside + sum(inputs) + max(per_layer) + h
    else:
        activations = outside + sum(per_layer) + h

    vocab, hidden = config.vocab_size, config.hidden_size
    if cfg.loss_chunk_tokens:
        logits = 2 * min(cfg.loss_chunk_tokens, tokens) * vocab * 4 + tokens * hidden * compute_dtype.itemsize
    else:
        logits = tokens * vocab * (compute_dtype.itemsize + 4 + 4)

    rows = {
        "frozen weights (sharded)": sum(quantized.get(id(p)) or _shard_bytes(p, shards) for p in frozen),
        "trainable b_values (fp32, sharded)": trainable_bytes,
        "gradients (fp32, sharded)": trainable_bytes,
        "AdamW state (fp32, sharded)": 2 * trainable_bytes,
        "gathered weights (root + 2 layers)": root + 2 * layer_bytes if world_size > 1 else 0,
        "activations" + (" (checkpointed)" if cfg.activation_checkpointing else ""): activations,
        "logits" + (f" (chunks of {cfg.loss_chunk_tokens})" if cfg.loss_chunk_tokens else ""): logits,
    }
    name = getattr(config, "_name_or_path", "") or Path(cfg.model).name
    return MemoryPlan(name, world_size, (replicate, shards), tokens, rows, gpu_memory)
