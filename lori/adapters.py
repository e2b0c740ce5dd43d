"""Several named LoRI adapters in one model, as PEFT's ``load_adapter`` / ``set_adapter`` /
``delete_adapter``: the model's first adapter is each ``LoRILinear``'s own (named
``"default"`` unless loaded under another name), every further one a frozen ``NamedAdapter``
beside it in the layer's ``lori_adapters``. Adding or deleting one never reloads the base
and never touches another adapter's tensors.

- ``add_adapter``: put a checked checkpoint's layers in beside the loaded adapters (what
  ``lori.load_lori(model, path, adapter_name=...)`` calls on a model with adapters);
- ``list_adapters``, ``active_adapter``, ``set_adapter``, ``delete_adapter``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from lori.config import LoRIConfig
from lori.layer import LoRILinear, NamedAdapter
from lori.model import lori_layers, remove_lori

log = logging.getLogger(__name__)

__all__ = ["active_adapter", "add_adapter", "adapted_layers", "delete_adapter", "list_adapters", "set_adapter"]


def adapted_layers(model: nn.Module, unfolded: bool = False) -> dict[str, LoRILinear]:
    """The model's LoRI layers (``lori_layers``); an error if it has none, or (``unfolded``) if
    its adapter is folded into the base weights (``lori.merge_adapter``)."""
    layers = lori_layers(model)
    if not layers:
        raise ValueError("the model has no LoRI adapters")
    if unfolded and any(layer.fold is not None for layer in layers.values()):
        raise ValueError("the model's adapter is folded into its base weights; unmerge_adapter(model) first")
    return layers


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, the first loaded first (PEFT's ``adapter_names``);
    empty without adapters."""
    layer = next(iter(lori_layers(model).values()), None)
    return [] if layer is None else list(layer.named_adapters())


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter that runs (PEFT's ``active_adapter``)."""
    return next(iter(adapted_layers(model).values())).active_adapter


def _check_name(model: nn.Module, name: str) -> None:
    names = list_adapters(model)
    if name not in names:
        raise ValueError(f"the model has no adapter named {name!r}; it has {names}")


def add_adapter(
    model: nn.Module,
    name: str,
    config: LoRIConfig,
    layers: dict[str, dict[str, torch.Tensor]],
    where,
    check: Callable[[], None] | None = None,
) -> nn.Module:
    """Load an adapter beside the model's under ``name`` (not made active: ``set_adapter``):
    ``layers`` maps every adapted module's name to its checked tensors (``seed``,
    ``b_values``, ``b_blocks``, optionally a stored ``a``), as ``lori.checkpoint.read_lori``
    returns them; ``where`` names the adapter in errors; ``check`` runs once the modules are
    known to match (the caller's shape checks). It must adapt exactly the modules the loaded
    adapters adapt; its seed, r and block are its own. Every layer's adapter is built before
    the first is put in: on any error the model is as it was."""
    existing = adapted_layers(model)
    if not isinstance(name, str) or not name:
        raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
    if name in list_adapters(model):
        raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter it first or pick another")
    if set(layers) != set(existing):
        extra, missing = sorted(set(layers) - set(existing)), sorted(set(existing) - set(layers))
        raise ValueError(
            f"{where} adapts other modules than the model's adapters: it adds {extra[:3]} and lacks {missing[:3]}; "
            "adapters of one model must adapt the same modules"
        )
    if check is not None:
        check()
    built = {
        module: NamedAdapter(
            existing[module],
            config,
            seed=t["seed"],
            b_values=t["b_values"],
            b_blocks=t["b_blocks"],
            stored_a=t.get("a"),
        )
        for module, t in layers.items()
    }
    for module, adapter in built.items():
        layer = existing[module]
        if "lori_adapters" not in layer._modules:
            layer.lori_adapters = nn.ModuleDict()
        layer.lori_adapters[name] = adapter
    log.info("added LoRI adapter %r from %s: %d layers", name, where, len(built))
    return model


def set_adapter(model: nn.Module, name: str) -> None:
    """Run adapter ``name`` (PEFT's ``set_adapter``). Refused while an adapter is folded into
    the base weights (``lori.merge_adapter``): ``unmerge_adapter`` first."""
    layers = adapted_layers(model, unfolded=True)
    _check_name(model, name)
    for layer in layers.values():
        layer.active_adapter = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (PEFT's ``delete_adapter``); the others keep their tensors. If
    it was the active one, the first remaining becomes active. Deleting the layers' own
    adapter moves the next one into its place (it becomes the model's ``lori_config`` and
    trains again, as a loaded adapter does); deleting the last one puts the base layers back
    (``lori.remove_lori``)."""
    layers = adapted_layers(model, unfolded=True)
    _check_name(model, name)
    names = list_adapters(model)
    if len(names) == 1:
        remove_lori(model)
        return
    if name == names[0] and getattr(model, "lori_stored", ()):
        raise ValueError(
            f"adapter {name!r} replaced base weights {list(model.lori_stored)[:3]}, which the others need; "
            "it cannot be deleted while others are loaded"
        )
    promoted = next(iter(layers.values())).lori_adapters[names[1]].config
    for layer in layers.values():
        if name == layer.adapter_name:
            _promote(layer, names[1])
        else:
            del layer.lori_adapters[name]
        if not len(layer.lori_adapters):
            del layer.lori_adapters
        if layer.active_adapter == name:
            layer.active_adapter = list(layer.named_adapters())[0]
    if name == names[0]:
        model.lori_config = promoted
    log.info("deleted LoRI adapter %r", name)


def _promote(layer: LoRILinear, name: str) -> None:
    """Make the layer's ``NamedAdapter`` ``name`` its own adapter (its tensors moved, not copied)."""
    adapter = layer.lori_adapters.pop(name)
    layer.seed, layer.b_blocks, layer.stored_a = adapter.seed, adapter.b_blocks, adapter.stored_a
    layer.b_values = nn.Parameter(adapter.b_values.data, requires_grad=True)
    layer.r, layer.alpha, layer.scaling = adapter.r, adapter.alpha, adapter.scaling
    layer.block, layer.dist, layer.layer_seed = adapter.block, adapter.dist, adapter.layer_seed
    layer.dropout, layer.adapter_name = adapter.config.dropout, name
