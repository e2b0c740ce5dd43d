"""PEFT's ``PeftModel`` methods on a model with LoRI adapters, so that code written for PEFT
runs with its adapter lines changed (``get_peft_model`` -> ``lori.get_lori_model``,
``LoraConfig`` -> ``lori.LoRIConfig``, ``PeftModel.from_pretrained`` -> ``lori.load_lori``).

``lori.model.inject_layers`` binds the methods to every model it gives adapters
(``get_lori_model``, ``load_lori`` into a base, ``import_peft``, ``merge``) as attributes of
that one model; ``remove_lori`` (so also ``unload`` and ``merge_and_unload``) takes them off
again, and the model saves with its own ``save_pretrained`` once more. Nothing of
transformers or of the model's class is changed. Each method is one call of the library's
function of the same job:

    model.print_trainable_parameters()   lori.print_trainable_parameters(model)
    model.save_pretrained(dir)           lori.save_lori(model, dir), beside other files
    model.merge_adapter()                lori.merge_adapter(model)
    model.unmerge_adapter()              lori.unmerge_adapter(model)
    model.merge_and_unload()             lori.merge_and_unload(model)
    model.unload()                       lori.remove_lori(model)
    with model.disable_adapter(): ...    with lori.disable_adapters(model): ...

Methods rather than a wrapper around the model (PEFT's ``PeftModel``): the model stays what
it was (its class, its parameter and module names, so adapter files and masks name layers
as before), and transformers' ``Trainer``, which writes checkpoints through
``model.save_pretrained``, writes the compact adapter instead of the base weights.
A bound method does not survive pickling the whole model (``torch.save(model)``): save the
adapter instead.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
from torch import nn

from lori.adapters import delete_adapter, set_adapter
from lori.checkpoint import load_lori, save_lori
from lori.merge import merge_adapter, merge_and_unload, unmerge_adapter
from lori.model import disable_adapters, print_trainable_parameters, remove_lori

__all__ = ["PEFT_METHODS", "add_peft_methods", "remove_peft_methods", "save_pretrained"]


def save_pretrained(
    model: nn.Module,
    save_directory: str | Path,
    *,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """``PeftModel.save_pretrained``: the model's compact adapter (``save_lori``'s two files,
    ``b_values`` in ``dtype``) written into ``save_directory`` beside whatever else it holds,
    as PEFT writes there: a ``Trainer`` puts its checkpoints, tokenizer and arguments in the
    same directory. An earlier adapter's two files are replaced, crash-safely; nothing else
    is touched. ``is_main_process=False`` (a Trainer's other processes) writes nothing.
    Returns the directory."""
    if state_dict is not None:
        raise ValueError(
            "save_pretrained of a LoRI model writes its adapter from the model itself; it takes no state_dict"
        )
    if not is_main_process:
        return Path(save_directory)
    return save_lori(model, save_directory, dtype=dtype, keep_others=True)


def load_adapter(model: nn.Module, model_id: str | Path, adapter_name: str, **kwargs) -> nn.Module:
    """``PeftModel.load_adapter``: the LoRI adapter at ``model_id`` beside the loaded ones,
    as ``adapter_name`` (``load_lori``; ``set_adapter`` runs it). PEFT's other options
    (``is_trainable``, ``torch_device``, ...) are not taken."""
    if kwargs:
        raise TypeError(f"load_adapter of a LoRI model takes no {sorted(kwargs)}")
    return load_lori(model, model_id, adapter_name=adapter_name)


# PeftModel's method name -> the function it calls with the model first.
PEFT_METHODS = {
    "print_trainable_parameters": print_trainable_parameters,
    "save_pretrained": save_pretrained,
    "merge_adapter": merge_adapter,
    "unmerge_adapter": unmerge_adapter,
    "merge_and_unload": merge_and_unload,
    "unload": remove_lori,
    "disable_adapter": disable_adapters,
    "load_adapter": load_adapter,
    "set_adapter": set_adapter,
    "delete_adapter": delete_adapter,
}


def add_peft_methods(model: nn.Module) -> None:
    """Bind ``PEFT_METHODS`` to ``model`` (this one object, not its class)."""
    for name, function in PEFT_METHODS.items():
        setattr(model, name, types.MethodType(function, model))


def remove_peft_methods(model: nn.Module) -> None:
    """Take off what ``add_peft_methods`` bound: the class's own methods show again."""
    for name in PEFT_METHODS:
        model.__dict__.pop(name, None)
