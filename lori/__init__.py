"""LoRI training library on ``lori_kernels.lori_linear``: configuration, ``LoRILinear``
and its injection into Hugging Face models, masks, training, checkpoints, the CLI."""

from lori.adapters import active_adapter, delete_adapter, list_adapters, set_adapter
from lori.checkpoint import load_lori, save_lori
from lori.config import DEFAULT_TARGET_MODULES, LoRIConfig
from lori.errors import CheckpointError, LoRIError, OutputError, TrainingError
from lori.layer import LoRILinear
from lori.masks import extract_masks, load_masks, save_masks
from lori.merge import merge, merge_adapter, merge_and_unload, unmerge_adapter
from lori.model import (
    disable_adapters,
    enable_activation_checkpointing,
    get_lori_model,
    lori_layers,
    print_trainable_parameters,
    remove_lori,
    set_dropout_calls,
)
from lori.peft_interop import export_peft, import_peft
from lori.quantize import QUANTIZED_KINDS, quantize_base
from lori.serving import adapter_batch

__all__ = [
    "CheckpointError",
    "DEFAULT_TARGET_MODULES",
    "LoRIConfig",
    "LoRIError",
    "LoRILinear",
    "OutputError",
    "QUANTIZED_KINDS",
    "TrainingError",
    "active_adapter",
    "adapter_batch",
    "delete_adapter",
    "disable_adapters",
    "enable_activation_checkpointing",
    "export_peft",
    "extract_masks",
    "get_lori_model",
    "import_peft",
    "list_adapters",
    "load_lori",
    "load_masks",
    "lori_layers",
    "merge",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "quantize_base",
    "remove_lori",
    "save_lori",
    "save_masks",
    "set_adapter",
    "set_dropout_calls",
    "unmerge_adapter",
]
