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
from lori.files import atomic_dir, is_writer
from lori.layer import LoRILinear
from lori.masks import load_masks
from lori.model import lori_layers
from lori.updates import LayerUpdate, install

log = logging.getLogger(__name__)

__all__ = ["PEFT_CONFIG_FILE", "PEFT_TENSORS_FILE", "export_peft", "import_peft", "read_peft"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_TENSORS_FILE = "adapter_model.safetensors"
_PEFT_PICKLE_FILE = "adapter_model.bin"
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
    """Write the model's adapter as a PEFT LoRA adapter in the directory ``path``
    (replaced atomically): ``lora_A`` = A, ``lora_B`` = B dense (zeros outside the kept
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
        with atomic_dir(path) as tmp:
            save_file(tensors, tmp / PEFT_TENSORS_FILE, metadata={"format": "pt"})
            (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
        log.info("exported %d layers as a PEFT LoRA adapter -> %s", len(layers), path)
    return path


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / PEFT_TENSORS_FILE).is_file():
        try:
            return load((path / PEFT_TENSORS_FILE).read_bytes())
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path / PEFT_TENSORS_FILE} is not a readable safetensors file: {e}") from None
    if (path / _PEFT_PICKLE_FILE).is_file():
        try:
            tensors = torch.load(path / _PEFT_PICKLE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for foreign or unsafe files
            raise ValueError(f"{path / _PEFT_PICKLE_FILE} is not a weights-only torch file: {e}") from None
        if isinstance(tensors, dict) and all(isinstance(v, torch.Tensor) for v in tensors.values()):
            return tensors
        raise ValueError(f"{path / _PEFT_PICKLE_FILE} must hold a dict of tensors")
    raise ValueError(f"{path} holds no {PEFT_TENSORS_FILE} (or {_PEFT_PICKLE_FILE})")


def _check_peft_config(cfg, where: Path) -> None:
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        found = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise ValueError(f"{where} is not a PEFT LoRA adapter config (peft_type {found!r})")
    unsupported = {
        "use_dora": "DoRA magnitudes",
        "rank_pattern": "per-layer ranks",
        "alpha_pattern": "per-layer alphas",
        "modules_to_save": "fully trained modules",
        "fan_in_fan_out": "Conv1D (fan_in_fan_out) layers",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise ValueError(f"{where} uses {key} ({what}), which a LoRI adapter cannot hold")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{where} trains biases (bias={cfg['bias']!r}), which a LoRI adapter cannot hold")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{where} has a bad r or lora_alpha: r={r!r}, lora_alpha={alpha!r}")


_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")


def _pairs(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"A": lora_A, "B": lora_B}}`` from PEFT's tensor names."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{where} holds {key!r}, which is not a LoRA A or B weight")
        pairs.setdefault(match[1], {})[match[2]] = value
    for name, pair in pairs.items():
        if len(pair) != 2:
            raise ValueError(f"{where} has lora_{next(iter(pair))} of {name} without its partner")
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
    if not config_file.is_file():
        raise ValueError(f"{path} is not a PEFT adapter: {PEFT_CONFIG_FILE} is missing")
    try:
        cfg = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    _check_peft_config(cfg, config_file)
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if isinstance(masks, (str, Path)):
        masks = load_masks(masks)
    pairs = _pairs(_read_tensors(path), path)
    if not pairs:
        raise ValueError(f"{path} holds no LoRA weights")
    if masks is not None and set(masks) != set(pairs):
        missing, extra = sorted(set(pairs) - set(masks)), sorted(set(masks) - set(pairs))
        raise ValueError(f"the masks do not fit {path}: missing for {missing[:3]}, unknown {extra[:3]}")
    block = block if block is not None else ((1, 1) if masks is not None else (32, min(r, 32)))
    updates = {}
    for name, pair in sorted(pairs.items()):
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"{name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit r={r} ([r, in] and [out, r])"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"{name}: LoRA weights must be floating point, got {a.dtype} and {b.dtype}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{name}: LoRA weights hold NaN or Inf")
        b = b.float()
        mask = torch.ones_like(b, dtype=torch.bool) if masks is None else masks[name]
        if mask.shape != b.shape:
            raise ValueError(f"mask of {name} has shape {list(mask.shape)}, lora_B {list(b.shape)}")
        outside = (b != 0) & ~mask
        if outside.any():
            raise ValueError(
                f"{name}: lora_B has {int(outside.sum())} nonzero values outside its mask; the mask does not "
                "belong to this adapter"
            )
        updates[name] = LayerUpdate(
            b=b, mask=mask, scaling=scaling, in_features=a.shape[1], block=block, a=a.float().contiguous()
        )
    target_modules = cfg.get("target_modules")
    if not isinstance(target_modules, list) or not target_modules:
        target_modules = sorted({name.rsplit(".", 1)[-1] for name in updates})
    config = LoRIConfig(
        r=r,
        alpha=scaling * r,
        target_modules=target_modules,
        block=block,
        dropout=float(cfg.get("lora_dropout") or 0.0),
    )
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
