"""PEFT LoRA adapters in and out.

``export_peft`` writes an ordinary PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``, A materialized, B dense) that
``peft.PeftModel.from_pretrained`` loads. ``import_peft`` reads one into ``LoRILinear``s
that keep the adapter's A as a stored A, also as the original LoRI code writes them:

- its masks, from a ``torch.save``d masks file or from the ``lora_B.mask`` parameters
  that its trainer registers (and a current PEFT saves with the adapter);
- full weights beside the LoRA weights: ``modules_to_save``, the embeddings PEFT saves
  when the vocabulary was resized for a pad token (``model.embed_tokens.weight``,
  ``lm_head.weight``), the ``base_layer.weight`` of an adapted ``lm_head``. They become the
  adapter's stored weights (``lori.checkpoint.install_adapter``): loaded into the model,
  whose vocabulary is resized to theirs, frozen, and saved with the adapter;
- dropout: the original code configures ``lora_dropout=0.05`` but sets every dropout's
  ``p`` to 0 before training (``disable_dropout``), so an imported adapter trains with
  dropout 0 unless ``dropout`` says otherwise (``dropout=None``: the file's
  ``lora_dropout``).

GPT-2's ``Conv1D`` layers (PEFT's ``fan_in_fan_out``) hold the same A ``[r, in]`` and B
``[out, r]`` as linear ones: exported with ``fan_in_fan_out`` set when the model has them,
imported as they are. Refused, by name: DoRA, per-layer ranks or alphas, trained biases,
LoRA on embedding layers (``lora_embedding_A/B``: LoRI adapts linear layers only). Neither
direction needs ``peft`` installed.
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

from lori.checkpoint import B_DTYPES, base_model_id, install_adapter, stored_weights
from lori.config import LoRIConfig
from lori.digests import json_digest, safetensors_metadata, tensors_digest
from lori.errors import CheckpointError
from lori.files import is_writer, read_json, recover, write_directory
from lori.layer import LoRILinear, is_conv1d
from lori.masks import load_masks
from lori.model import lori_layers
from lori.updates import LayerUpdate

log = logging.getLogger(__name__)

__all__ = ["PEFT_CONFIG_FILE", "PEFT_TENSORS_FILE", "export_peft", "import_peft", "read_peft", "read_peft_adapter"]

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
    blocks), ``lora_alpha`` = alpha, so PEFT computes the same ``scaling · B · A``. Stored
    weights are written as the original LoRI code's files hold them (full weights under
    their names, ``base_layer`` for an adapted module), in the model's dtype: PEFT loads
    them into a base model whose vocabulary has been resized to theirs."""
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
    for name, value in stored_weights(model).items():
        module, _, param = name.rpartition(".")
        key = f"{module}.base_layer.{param}" if module in layers else name
        tensors[f"{_PREFIX}{key}"] = value.contiguous().cpu()
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": base_model_id(model),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_modules(model, list(layers)),
        "bias": "none",
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for layer in layers.values()),
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
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise CheckpointError(f"{where} uses {key} ({what}), which a LoRI adapter cannot hold")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{where} trains biases (bias={cfg['bias']!r}), which a LoRI adapter cannot hold")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(r) is not int or r <= 0 or type(alpha) not in (int, float) or not 0 < alpha < math.inf:
        raise CheckpointError(f"{where} has a bad r or lora_alpha: r={r!r}, lora_alpha={alpha!r}")


_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")
_MASK_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_B(?:\.default)?\.mask")


def _split(tensors: dict[str, torch.Tensor], where: Path):
    """PEFT's tensors by kind: ``{module: {"A": lora_A, "B": lora_B}}``, the original LoRI
    trainer's ``lora_B.mask`` parameters ``{module: mask}`` and the full weights
    ``{parameter name in the base model: tensor}``."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    masks, stored = {}, {}
    for key, value in tensors.items():
        if match := _LORA_KEY.fullmatch(key):
            pairs.setdefault(match[1], {})[match[2]] = value
        elif match := _MASK_KEY.fullmatch(key):
            masks[match[1]] = value
        elif "lora_embedding_" in key:
            raise CheckpointError(
                f"{where} holds {key!r}: LoRA on an embedding layer, which LoRI cannot hold (it adapts nn.Linear "
                "layers only)"
            )
        elif "lora_" in key:
            raise CheckpointError(f"{where} holds {key!r}, which is not a LoRA A or B weight")
        else:
            stored[key.removeprefix(_PREFIX).replace(".base_layer.", ".")] = value
    for name, pair in pairs.items():
        if len(pair) != 2:
            raise CheckpointError(f"{where} has lora_{next(iter(pair))} of {name} without its partner")
    return pairs, masks, stored


def _file_masks(masks: dict[str, torch.Tensor], pairs: dict, where: Path) -> dict[str, torch.Tensor]:
    """The ``lora_B.mask`` parameters as bool masks: one per adapted layer, 0 or 1."""
    if set(masks) != set(pairs):
        missing, extra = sorted(set(pairs) - set(masks)), sorted(set(masks) - set(pairs))
        raise CheckpointError(
            f"{where} has lora_B.mask for some layers only: missing for {missing[:3]}, without lora_B for {extra[:3]}"
        )
    for name, mask in masks.items():
        if not ((mask == 0) | (mask == 1)).all():
            raise CheckpointError(f"{where}: lora_B.mask of {name} holds values other than 0 and 1")
    return {name: mask != 0 for name, mask in masks.items()}


def _check_stored(stored: dict[str, torch.Tensor], cfg: dict, where: Path) -> None:
    for name, value in stored.items():
        if value.dtype not in B_DTYPES or not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: the full weight {name} must be finite float32/bf16/fp16/fp64 values")
    modules = {name.rpartition(".")[0] for name in stored}
    for entry in cfg.get("modules_to_save") or ():
        if not any(m == entry or m.endswith(f".{entry}") for m in modules):
            raise CheckpointError(f"{where} lists {entry!r} in modules_to_save but holds no weight of it")


def read_peft(
    path: str | Path,
    masks: dict[str, torch.Tensor] | str | Path | None = None,
    *,
    block: tuple[int, int] | None = None,
    dropout: float | None = 0.0,
) -> tuple[LoRIConfig, dict[str, LayerUpdate]]:
    """A PEFT LoRA adapter directory as a ``LoRIConfig`` and per-layer updates with stored
    A. ``masks`` (module name -> bool ``[out, r]``, or a masks file: ours or the original
    LoRI's ``torch.save``d dict) marks the elements of B that train, else the file's
    ``lora_B.mask`` parameters do (both given: they must agree); B must be zero outside
    them. Layers get the blocks covering their mask: ``block`` defaults to (1, 1), element
    masks, with masks and to LoRI's default block without. ``dropout`` is the dropout the
    adapter trains with (default 0, as the original LoRI code trains; None: the file's
    ``lora_dropout``). Full weights in the file are not part of the updates: a warning
    names them (``import_peft`` loads them)."""
    config, updates, stored = read_peft_adapter(path, masks, block=block, dropout=dropout)
    if stored:
        log.warning("%s holds the full weights %s, which are not part of its layer updates", path, sorted(stored))
    return config, updates


def read_peft_adapter(
    path: str | Path,
    masks: dict[str, torch.Tensor] | str | Path | None = None,
    *,
    block: tuple[int, int] | None = None,
    dropout: float | None = 0.0,
) -> tuple[LoRIConfig, dict[str, LayerUpdate], dict[str, torch.Tensor]]:
    """``read_peft``'s config and updates, and the adapter's full weights by parameter name
    in the base model (for ``lori.checkpoint.install_adapter``)."""
    path = Path(path)
    config_file = path / PEFT_CONFIG_FILE
    recover(path)
    cfg = read_json(config_file, "PEFT adapter")
    _check_peft_config(cfg, config_file)
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if isinstance(masks, (str, Path)):
        masks = load_masks(masks)
    pairs, file_masks, stored = _split(_read_tensors(path, cfg), path)
    if not pairs:
        raise CheckpointError(f"{path} holds no LoRA weights")
    _check_stored(stored, cfg, path)
    if masks is not None and set(masks) != set(pairs):
        missing, extra = sorted(set(pairs) - set(masks)), sorted(set(masks) - set(pairs))
        raise CheckpointError(f"the masks do not fit {path}: missing for {missing[:3]}, unknown {extra[:3]}")
    if file_masks:
        file_masks = _file_masks(file_masks, pairs, path)
        if masks is not None:
            differ = [n for n in sorted(pairs) if not torch.equal(masks[n].cpu(), file_masks[n].to(masks[n].dtype))]
            if differ:
                raise CheckpointError(f"the masks given differ from {path}'s own lora_B.mask, first for {differ[0]}")
        masks = file_masks
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
    file_dropout = cfg.get("lora_dropout") or 0.0
    if dropout is None:
        dropout = file_dropout
    elif dropout != file_dropout:
        log.info("%s: the adapter trains with dropout %g (its lora_dropout is %g)", path, dropout, file_dropout)
    try:
        config = LoRIConfig(r=r, alpha=scaling * r, target_modules=target_modules, block=block, dropout=dropout)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    return config, updates, stored


def import_peft(
    model: nn.Module,
    path: str | Path,
    masks: dict[str, torch.Tensor] | str | Path | None = None,
    *,
    block: tuple[int, int] | None = None,
    dropout: float | None = 0.0,
    backend: str = "auto",
) -> nn.Module:
    """Load a PEFT LoRA adapter (see ``read_peft``) into a model without adapters, as
    ``LoRILinear``s with stored A, and its full weights as the adapter's stored weights
    (``install_adapter``: the vocabulary resized to theirs); the model is unchanged on
    any error."""
    config, updates, stored = read_peft_adapter(path, masks, block=block, dropout=dropout)
    install_adapter(model, config, updates, stored, where=path, backend=backend)
    log.info("imported %d layers and %d full weights from the PEFT adapter %s", len(updates), len(stored), path)
    return model
