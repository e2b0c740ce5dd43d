"""Putting LoRI adapters into a model (any ``nn.Module``, e.g. a Hugging Face causal LM),
taking them out, and reporting what trains."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable

import torch
from torch import nn

from lori.config import ALL_LINEAR, LoRIConfig
from lori.layer import LoRILinear, count_training_forward, is_conv1d, linear_shape, quantized_weight_shapes
from lori_kernels import block_sparse
from lori_kernels.rng import layer_seed

log = logging.getLogger(__name__)

__all__ = [
    "disable_adapters",
    "enable_activation_checkpointing",
    "get_lori_model",
    "inject_layers",
    "lori_layers",
    "print_trainable_parameters",
    "remove_lori",
    "set_dropout_calls",
]


def _is_linear(module: nn.Module) -> bool:
    """What LoRI adapts, as PEFT's "all-linear" selects: an ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _output_head(model: nn.Module) -> nn.Module | None:
    """A Hugging Face model's output embeddings (its LM head), which "all-linear" leaves out."""
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        return get_output() if get_output is not None else None
    except NotImplementedError:
        return None


def _selects(target_modules: tuple[str, ...] | str, name: str) -> bool:
    """PEFT's matching: a string is a regular expression matching the whole module name, a
    list holds names that the module's name equals or ends with after a dot."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _expert_parameters(module: nn.Module) -> list[str]:
    """Names of the 3-D parameters (outside convolutions) in ``module``: MoE experts stored
    fused, as transformers 5 stores Mixtral's and Qwen-MoE's ``experts.gate_up_proj``."""
    return [
        name
        for name, p in module.named_parameters()
        if p.dim() == 3 and not isinstance(module.get_submodule(name.rpartition(".")[0]), nn.modules.conv._ConvNd)
    ]


def _unsupported(name: str, module: nn.Module) -> str:
    """Why the selected ``module`` (not a linear layer) cannot be adapted, in one sentence."""
    what = f"target_modules select {name}, a {type(module).__name__}, but LoRI adapts nn.Linear and Conv1D layers only"
    experts = _expert_parameters(module)
    if experts:
        return (
            f"{what}: its MoE experts are 3-D parameters ({', '.join(experts[:3])}), which PEFT adapts with "
            "target_parameters and LoRI does not; adapt the model's linear layers instead"
        )
    return what


def _targets(model: nn.Module, config: LoRIConfig) -> dict[str, nn.Linear]:
    """The modules ``config.target_modules`` selects, as PEFT selects them; a selected
    module that is not a linear layer is refused, naming it."""
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        selected = {n: m for n, m in model.named_modules() if n and _is_linear(m) and m is not head}
    else:
        selected = {n: m for n, m in model.named_modules() if n and _selects(config.target_modules, n)}
    for name, module in selected.items():
        if not _is_linear(module):
            raise ValueError(_unsupported(name, module))
    if not selected:
        hint = ""
        if config.target_modules != ALL_LINEAR:
            experts = [n for n in _expert_parameters(model) if _selects(config.target_modules, n)]
            if experts:
                hint = (
                    f": {', '.join(experts[:3])} are MoE experts stored as 3-D parameters (PEFT's "
                    "target_parameters), which LoRI does not adapt"
                )
        raise ValueError(f"target_modules {_describe(config.target_modules)} select no nn.Linear of the model{hint}")
    return selected


def _describe(target_modules: tuple[str, ...] | str) -> str:
    if target_modules == ALL_LINEAR:
        return "'all-linear'"
    if isinstance(target_modules, str):
        return f"{target_modules!r} (a regular expression matching whole module names)"
    return str(list(target_modules))


def _check_masks(masks: dict, targets: dict[str, nn.Linear], config: LoRIConfig) -> None:
    unknown = sorted(set(masks) - set(targets))
    if unknown:
        raise ValueError(f"masks name modules that are not adapted: {unknown[:5]} (adapted: {sorted(targets)[:5]}...)")
    missing = sorted(set(targets) - set(masks))
    if missing:
        raise ValueError(f"masks are missing for adapted modules {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, mask in masks.items():
        want = (linear_shape(targets[name])[0], config.r)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != want:
            got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask of {name} must be a bool tensor of shape {list(want)} (out, r), got {got}")


def check_no_adapter(model: nn.Module) -> None:
    if getattr(model, "lori_config", None) is not None:
        raise ValueError("the model already has LoRI adapters; remove_lori(model) first")


def get_lori_model(
    model: nn.Module,
    config: LoRIConfig,
    masks: dict[str, torch.Tensor] | None = None,
    *,
    backend: str = "auto",
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` that ``config.target_modules`` selects (as
    PEFT's ``target_modules``; by default every one but the output head) by a ``LoRILinear``
    and freeze everything else; return the model. ``masks`` (module name -> bool
    ``[out, r]``, as ``extract_masks`` returns) keeps only those blocks of each B (LoRI-S);
    without it B is dense (LoRI-D). Each layer's A comes from
    ``layer_seed(config.seed, name)``. The adapters live on ``device`` (default: each base
    weight's). On a ``meta`` base the adapters are built without data (the masks' kept
    blocks are found where the masks are): their seed, kept blocks and values then come
    with a state dict (``load_state_dict``, or broadcast from rank 0 as ``lori train``
    does); ``device="cpu"`` keeps real adapters over a meta base. MoE experts stored as 3-D
    parameters (transformers 5's Mixtral) are not adapted: they stay frozen, with a
    warning."""
    check_no_adapter(model)
    targets = _targets(model, config)
    experts = _expert_parameters(model)
    if experts:
        log.warning(
            "the model's MoE experts are 3-D parameters (%s ...), which LoRI does not adapt: they stay frozen",
            experts[0],
        )
    if masks is not None:
        _check_masks(masks, targets, config)

    def make_layer(name: str, linear: nn.Linear) -> LoRILinear:
        b_blocks = None
        if masks is not None:
            try:
                # From the mask where it is (a meta base has no data to find kept blocks with); the
                # layer moves the blocks to its device.
                b_blocks = block_sparse.blocks_from_mask(masks[name], config.block)
            except ValueError as e:
                raise ValueError(f"mask of {name}: {e}") from None
        return LoRILinear(
            linear,
            r=config.r,
            alpha=config.alpha,
            seed=layer_seed(config.seed, name),
            block=config.block,
            dist=config.dist,
            dropout=config.dropout,
            b_blocks=b_blocks,
            backend=backend,
            device=device,
        )

    return inject_layers(model, config, targets, make_layer)


def inject_layers(
    model: nn.Module,
    config: LoRIConfig,
    targets: dict[str, nn.Linear],
    make_layer: Callable[[str, nn.Linear], LoRILinear],
) -> nn.Module:
    """Replace each of ``targets`` (module name -> the model's ``nn.Linear``) by
    ``make_layer(name, linear)``, freeze everything else, record ``config`` as the
    model's; return the model. All layers are built before the first is put in, so an
    error leaves the model as it was. The common end of ``get_lori_model``,
    ``import_peft`` and ``merge``.

    The layers share one count of the model's training forwards (``model.dropout_calls``,
    an int64 CPU tensor that a forward pre-hook on the model increments) from which their
    dropout masks are drawn: a forward recomputed by activation checkpointing reruns
    decoder layers, never the model, so it draws the masks of the first pass. The model
    gets PEFT's ``PeftModel`` methods (``lori.peft_api``)."""
    check_no_adapter(model)
    trained = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        layers = {name: make_layer(name, linear) for name, linear in targets.items()}
    except Exception:
        for name, p in model.named_parameters():
            p.requires_grad_(trained[name])
        raise
    model.lori_frozen = trained
    model.requires_grad_(False)
    model.dropout_calls = torch.zeros((), dtype=torch.int64, device="cpu")
    model.lori_count_hook = model.register_forward_pre_hook(count_training_forward)
    for name, layer in layers.items():
        layer.share_dropout_calls(model.dropout_calls)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.lori_config = config
    from lori.peft_api import add_peft_methods  # here: lori.peft_api imports modules that import this one

    add_peft_methods(model)
    return model


def lori_layers(model: nn.Module) -> dict[str, LoRILinear]:
    """The model's ``LoRILinear`` modules by name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRILinear)}


def remove_lori(model: nn.Module) -> nn.Module:
    """Undo ``get_lori_model``: put the base layers back, restore which parameters
    trained and take off the PEFT methods."""
    if getattr(model, "lori_config", None) is None:
        raise ValueError("the model has no LoRI adapters")
    for name, layer in lori_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    for name, p in model.named_parameters():
        p.requires_grad_(model.lori_frozen.get(name, p.requires_grad))
    model.lori_count_hook.remove()
    del model.lori_config, model.lori_frozen, model.lori_count_hook, model.dropout_calls
    from lori.peft_api import remove_peft_methods

    remove_peft_methods(model)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the model as its base (every LoRILinear passes through) inside the block."""
    layers = list(lori_layers(model).values())
    states = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enabled = False
        yield model
    finally:
        for layer, state in zip(layers, states, strict=True):
            layer.enabled = state


def set_dropout_calls(model: nn.Module, calls: int) -> None:
    """Set the count of training forwards that the model's layers draw dropout masks from
    (restoring a run after ``calls`` forwards: the next forward draws the masks it would
    have drawn)."""
    for layer in lori_layers(model).values():
        layer.dropout_calls.fill_(calls)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a Hugging Face model's decoder layers
    (transformers 5 renamed the call); LoRILinear's dropout recomputes the same masks."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Log, like PEFT, the trainable and total parameter counts (a quantized weight by the
    parameters it stands for); return them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    packed = quantized_weight_shapes(model)
    total = sum(math.prod(packed[id(p)]) if id(p) in packed else p.numel() for p in model.parameters())
    log.info(
        "trainable params: %s || all params: %s || trainable%%: %.4f",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return trainable, total
