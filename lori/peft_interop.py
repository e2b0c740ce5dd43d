"""PEFT LoRA adapters in and out.

``export_peft`` writes an ordinary PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``, A materialized, B dense) that
``peft.PeftModel.from_pretrained`` loads. ``import_peft`` reads one, also those the
original LoRI code trained (with its ``torch.save``d masks), into ``LoRILinear``s that
keep the adapter's A as a stored A. Neither needs ``peft`` installed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from lori.checkpoint import base_model_id
from lori.config import LoRIConfig
from lori.digests import json_digest, safetensors_metadata, tensors_digest
from lori.errors import CheckpointError
from lori.files import is_writer, read_json, recover, write_directory
from lori.layer import LoRILinear
from lori.masks import load_masks
from lori.model import lori_layers
from lori.updates import LayerUpdate, install

log = logging.getLogger(__name__)

__all__ = ["PEFT_CONFIG_FILE", "PEFT_TENSORS_FILE", "export_peft", "import_peft", "read_peft"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_TENSORS_FILE = "adapter_model.safetensors"
PEFT_FILES = (PEFT_CONFIG_FILE, PEFT_TENSORS_FILE)
_PEFT_PICKLE_FILE = "adapter_model.bin"
_TENSORS_KEY, _CONFIG_KEY = "lori_tensors_sha256", "lori_config_sha256"
_PREFIX = "base_model.model."  # PEFT's names: base_model (LoraModel), .model (ours)


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """PEFT ``target_modules`` selecting exactly the adapted linears: their last name
    components when those select nothing else, else the full names."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    selected = {
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, LoRILinear)) and name.rsplit(".", 1)[-1] in suffixes
    }
    return suffixes if selected == set(adapted) else sorted(adapted)


def export_peft(model: nn.Module, path: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write the model's adapter as a PEFT LoRA adapter in the directory ``path`` (only
    PEFT's two files are replaced, crash-safely; a directory holding other files is
    refused): ``lora_A`` = A, ``lora_B`` = B dense (zeros outside the kept
    blocks), ``lora_alpha`` = alpha, so PEFT computes the same ``scaling · B · A``."""
    config = getattr(model, "lori_config", None)
    layers = lori_layers(model)
    if config is None or not layers:
        raise ValueError("the model has no LoRI adapters to export")
    tensors = {}
    for name, layer in layers.items():
        if layer.scaling != config.scaling:
            raise ValueError(f"{name} has scaling {layer.scaling}, the model's config {config.scaling}")
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.a().to(dtype).contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.b_dense().to(dtype).contiguous().cpu()
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": base_model_id(model),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_modules(model, list(layers)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    path = Path(path)
    if is_writer():
        with write_directory(path, PEFT_FILES, what="PEFT adapter") as out:
            save_file(tensors, out.file(PEFT_TENSORS_FILE), metadata=_checksums(tensors, peft_config))
            out.file(PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
        log.info("exported %d layers as a PEFT LoRA adapter -> %s", len(layers), path)
    return path


def _checksums(tensors: dict[str, torch.Tensor], peft_config: dict) -> dict[str, str]:
    """The metadata of an exported adapter_model.safetensors: PEFT's ``format`` and our
    digests of its tensors and of adapter_config.json (PEFT ignores them; ``read_peft``
    checks them when present, so a damaged export is refused)."""
    return {"format": "pt", _TENSORS_KEY: tensors_digest(tensors), _CONFIG_KEY: json_digest(peft_config)}


def _read_tensors(path: Path, cfg: dict) -> dict[str, torch.Tensor]:
    tensors_file = path / PEFT_TENSORS_FILE
    if tensors_file.is_file():
        try:
            data = tensors_file.read_bytes()
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError, OSError) as e:
            raise CheckpointError(f"{tensors_file} is not a readable safetensors file: {e}") from None
        recorded = safetensors_metadata(data)
        if _TENSORS_KEY in recorded:  # exported by this library
            if recorded[_TENSORS_KEY] != tensors_digest(tensors):
                raise CheckpointError(f"{tensors_file} does not match its checksum: truncated or corrupted")
            if recorded.get(_CONFIG_KEY) != json_digest(cfg):
                raise CheckpointError(
                    f"{path / PEFT_CONFIG_FILE} was changed after it was exported (it does not match "
                    f"{PEFT_TENSORS_FILE}'s record of it)"
                )
        return tensors
    if (path / _PEFT_PICKLE_FILE).is_file():
        try:
            tensors = torch.load(path / _PEFT_PICKLE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for foreign or unsafe files
            raise CheckpointError(f"{path / _PEFT_PICKLE_FILE} is not a weights-only torch file: {e}") from None
        if isinstance(tensors, dict) and all(isinstance(v, torch.Tensor) for v in tensors.values()):
            return tensors
        raise CheckpointError(f"{path / _PEFT_PICKLE_FILE} must hold a dict of tensors")
    raise CheckpointError(f"{path} holds no {PEFT_TENSORS_FILE} (or {_PEFT_PICKLE_FILE})")


def _check_peft_config(cfg, where: Path) -> None:
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        found = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise CheckpointError(f"{where} is not a PEFT LoRA adapter config (peft_type {found!r})")
    unsupported = {
        "use_dora": "DoRA magnitudes",
        "rank_pattern": "per-layer ranks",
        "alpha_pattern": "per-layer alphas",
        "modules_to_save": "fully trained modules",
        "fan_in_fan_out": "Conv1D (fan_in_fan_out) layers",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise CheckpointError(f"{where} uses {key} ({what}), which a LoRI adapter cannot hold")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{where} trains biases (bias={cfg['bias']!r}), which a LoRI adapter cannot hold")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(r) is not int or r <= 0 or type(alpha) not in (int, float) or not 0 < alpha < math.inf:
        raise CheckpointError(f"{where} has a bad r or lora_alpha: r={r!r}, lora_alpha={alpha!r}")


_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")


def _pairs(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"A": lora_A, "B": lora_B}}`` from PEFT's tensor names."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise CheckpointError(f"{where} holds {key!r}, which is not a LoRA A or B weight")
        pairs.setdefault(match[1], {})[match[2]] = value
    for name, pair in pairs.items():
        if len(pair) != 2:
            raise CheckpointError(f"{where} has lora_{next(iter(pair))} of {name} without its partner")
    return pairs


def read_peft(
    path: str | Path,
    masks: dict[str, torch.Tensor] | str | Path | None = None,
    *,
    block: tuple[int, int] | None = None,
) -> tuple[LoRIConfig, dict[str, LayerUpdate]]:
    """A PEFT LoRA adapter directory as a ``LoRIConfig`` and per-layer updates with
    stored A. ``masks`` (module name -> bool ``[out, r]``, or a masks file: ours or the
    original LoRI's ``torch.save``d dict) marks the elements of B that train; B must be
    zero outside them. Layers get the blocks covering their mask: ``block`` defaults to
    (1, 1), element masks, with masks and to LoRI's default block without."""
    path = Path(path)
    config_file = path / PEFT_CONFIG_FILE
    recover(path)
    cfg = read_json(config_file, "PEFT adapter")
    _check_peft_config(cfg, config_file)
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if isinstance(masks, (str, Path)):
        masks = load_masks(masks)
    pairs = _pairs(_read_tensors(path, cfg), path)
    if not pairs:
        raise CheckpointError(f"{path} holds no LoRA weights")
    if masks is not None and set(masks) != set(pairs):
        missing, extra = sorted(set(pairs) - set(masks)), sorted(set(masks) - set(pairs))
        raise CheckpointError(f"the masks do not fit {path}: missing for {missing[:3]}, unknown {extra[:3]}")
    block = block if block is not None else ((1, 1) if masks is not None else (32, min(r, 32)))
    updates = {}
    for name, pair in sorted(pairs.items()):
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(
                f"{path}: {name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit r={r} "
                "([r, in] and [out, r])"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise CheckpointError(f"{path}: {name}: LoRA weights must be floating point, got {a.dtype} and {b.dtype}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CheckpointError(f"{path}: {name}: LoRA weights hold NaN or Inf")
        b = b.float()
        mask = torch.ones_like(b, dtype=torch.bool) if masks is None else masks[name]
        if mask.shape != b.shape:
            raise CheckpointError(f"{path}: mask of {name} has shape {list(mask.shape)}, lora_B {list(b.shape)}")
        outside = (b != 0) & ~mask
        if outside.any():
            raise CheckpointError(
                f"{path}: {name}: lora_B has {int(outside.sum())} nonzero values outside its mask; the mask does not "
                "belong to this adapter"
            )
        updates[name] = LayerUpdate(
            b=b, mask=mask, scaling=scaling, in_features=a.shape[1], block=block, a=a.float().contiguous()
        )
    target_modules = cfg.get("target_modules")
    if not isinstance(target_modules, list) or not target_modules:
        target_modules = sorted({name.rsplit(".", 1)[-1] for name in updates})
    try:
        config = LoRIConfig(
            r=r, alpha=scaling * r, target_modules=target_modules, block=block, dropout=cfg.get("lora_dropout") or 0.0
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    return config, updates


def import_peft(
    model: nn.Module,
    path: str | Path,
    masks: dict[str, torch.Tensor] | str | Path | None = None,
    *,
    block: tuple[int, int] | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Load a PEFT LoRA adapter (see ``read_peft``) into a model without adapters, as
    ``LoRILinear``s with stored A; the model is unchanged on any error."""
    config, updates = read_peft(path, masks, block=block)
    install(model, config, updates, backend=backend)
    log.info("imported %d layers from the PEFT adapter %s", len(updates), path)
    return model
