"""Continual learning: a new task trained on top of a loaded adapter (the LoRI paper's
safety adapter first, then a task under its LoRI-D mask).

The model's adapter starts as the loaded one, widened to the union of its kept blocks
and the task's mask; only the mask's blocks train. The other blocks keep their loaded
values bit for bit: their gradients are zeroed before clipping and the optimizer step
(so the global norm sees only trained blocks) and their values are written back after it
(weight decay would otherwise shrink them). Works under FSDP2: the per-block tensors are
distributed like the sharded ``b_values``.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from lori.checkpoint import install_adapter, read_lori_adapter
from lori.model import lori_layers
from lori_kernels import block_sparse

log = logging.getLogger(__name__)

__all__ = ["FrozenBlocks", "stack_adapter"]


class FrozenBlocks:
    """The blocks of each layer's ``b_values`` that must not change while the others
    train: call ``mask_grads`` after backward and ``restore`` after the optimizer step."""

    def __init__(self, model: nn.Module, trainable: dict[str, torch.Tensor]):
        self.layers = lori_layers(model)
        self.trainable = {}  # name -> float [nnz, 1, 1]: 1 trains, 0 stays
        self.values = {}  # name -> the values the frozen blocks keep
        for name, keep in trainable.items():
            layer = self.layers[name]
            self.trainable[name] = keep.to(layer.b_values.device, torch.float32).reshape(-1, 1, 1)
            self.values[name] = layer.full_b_values().clone()

    def shard_like_parameters(self) -> None:
        """After FSDP sharded the model: distribute the per-block tensors like each
        layer's ``b_values``."""
        from torch.distributed.tensor import distribute_tensor

        for name, layer in self.layers.items():
            p = layer.b_values
            if hasattr(p, "device_mesh"):
                trainable = self.trainable[name].expand(p.shape).contiguous()
                self.trainable[name] = distribute_tensor(trainable, p.device_mesh, p.placements)
                self.values[name] = distribute_tensor(self.values[name].to(p.dtype), p.device_mesh, p.placements)

    def mask_grads(self) -> None:
        for name, layer in self.layers.items():
            if layer.b_values.grad is not None:
                layer.b_values.grad.mul_(self.trainable[name])

    @torch.no_grad()
    def restore(self) -> None:
        for name, layer in self.layers.items():
            p = layer.b_values
            p.copy_(torch.where(self.trainable[name].expand_as(p) > 0, p, self.values[name]))


def stack_adapter(
    model: nn.Module,
    init_adapter: str,
    masks: dict[str, torch.Tensor] | None,
    *,
    dropout: float = 0.0,
    backend: str = "auto",
    device: torch.device | str | None = None,
) -> FrozenBlocks:
    """Give ``model`` (without adapters) the adapter at ``init_adapter`` (its seeds, r,
    block), widened by ``masks`` (module name -> bool ``[out, r]`` of whole blocks): the
    masks' blocks train, starting from the loaded values (zero where the adapter had no
    block); every other block is frozen. Without masks every block trains. Returns the
    frozen blocks' keeper for the training loop. The adapter must have been trained on
    ``model``; its tensors live on ``device`` (default: the base weights'). Full weights the
    adapter stores (an imported adapter's resized embeddings) come with it, as in
    ``load_lori``, and stay frozen."""
    config, updates, stored = read_lori_adapter(init_adapter, base=model)
    config = dataclasses.replace(config, dropout=dropout)
    if masks is not None and set(masks) != set(updates):
        missing, extra = sorted(set(updates) - set(masks)), sorted(set(masks) - set(updates))
        raise ValueError(f"the masks do not fit {init_adapter}: missing for {missing[:3]}, unknown {extra[:3]}")
    task_blocks = {}
    for name, u in updates.items():
        if masks is None:
            continue
        mask = masks[name]
        if tuple(mask.shape) != tuple(u.mask.shape):
            raise ValueError(f"mask of {name} has shape {list(mask.shape)}, the adapter's B {list(u.mask.shape)}")
        try:
            task_blocks[name] = block_sparse.blocks_from_mask(mask, u.block)
        except ValueError as e:
            raise ValueError(f"mask of {name}: {e} (the adapter's block is {u.block})") from None
        updates[name] = dataclasses.replace(u, mask=u.mask | mask)
    install_adapter(model, config, updates, stored, where=init_adapter, backend=backend, device=device)
    trainable = {}
    for name, layer in lori_layers(model).items():
        blocks = layer.b_blocks.cpu()
        if masks is None:
            trainable[name] = torch.ones(blocks.shape[0], dtype=torch.bool)
        else:
            trainable[name] = (blocks[:, None, :] == task_blocks[name][None, :, :]).all(-1).any(-1)
    n_train = sum(int(t.sum()) for t in trainable.values())
    n_all = sum(t.numel() for t in trainable.values())
    log.info("continual: %d of %d blocks train, the other %d keep %s", n_train, n_all, n_all - n_train, init_adapter)
    return FrozenBlocks(model, trainable)
