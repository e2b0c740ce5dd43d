"""LoRI masks: extraction from trained (LoRI-D) adapters by global top-k over block
magnitudes, and saving/loading them.

A mask is a bool ``[out, r]`` per adapted module, keyed by module name. Block ``(1, 1)``
is the original element-wise LoRI; larger blocks keep whole ``(bo, br)`` blocks, scored
by their L2 norm.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lori.digests import tensors_digest
from lori.errors import CheckpointError
from lori.files import atomic_file
from lori.model import lori_layers
from lori.recipes import MASK_RULES
from lori_kernels import block_sparse

log = logging.getLogger(__name__)

__all__ = ["extract_masks", "load_masks", "save_masks"]

MASKS_FORMAT = "lori-masks"
MASKS_VERSION = "1"


def _block_scores(b: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """L2 norm of every ``block`` of a dense B ``[out, r]``: ``[n_rows, n_cols]``."""
    bo, br = block
    out, r = b.shape
    n_rows = -(-out // bo)
    padded = torch.nn.functional.pad(b, (0, 0, 0, n_rows * bo - out))
    return padded.reshape(n_rows, bo, r // br, br).square().sum(dim=(1, 3)).sqrt()


def extract_masks(
    model: torch.nn.Module, sparsity: float, block: tuple[int, int] | None = None, rule: str = "exact"
) -> dict[str, torch.Tensor]:
    """Masks keeping the largest ``1 - sparsity`` of all blocks of all adapted B (global
    top-k of block L2 norms; for block (1, 1), of |B|). ``block`` defaults to the model's.
    ``rule="exact"``: exactly ``round((1 - sparsity) * n_blocks)`` kept, ties going to the
    earlier layer and block. ``rule="original"`` (the original LoRI code's
    ``extract_mask.py``): the ``k = int((1 - sparsity) * n_blocks)`` largest and every block
    tied with the k-th."""
    layers = lori_layers(model)
    if not layers:
        raise ValueError("the model has no LoRI adapters to extract masks from")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if rule not in MASK_RULES:
        raise ValueError(f"rule must be one of {MASK_RULES}, got {rule!r}")
    first = next(iter(layers.values()))
    block = block_sparse.check_block(block if block is not None else first.block, first.r)
    scores = []
    for layer in layers.values():
        scores.append(_block_scores(layer.b_dense().cpu(), block_sparse.check_block(block, layer.r)))
    flat = torch.cat([s.flatten() for s in scores])
    n_keep = round((1.0 - sparsity) * flat.numel()) if rule == "exact" else int((1.0 - sparsity) * flat.numel())
    if n_keep == 0:
        raise ValueError(
            f"sparsity {sparsity} keeps none of the {flat.numel()} blocks {block}: nothing would train; "
            f"use a sparsity of at most {1 - (0.5 if rule == 'exact' else 1.0) / flat.numel():.6g}"
        )
    if rule == "exact":
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        kept[torch.sort(flat, descending=True, stable=True).indices[:n_keep]] = True
    else:
        kept = flat >= torch.topk(flat, n_keep).values[-1]
        n_keep = int(kept.sum())
    masks, start = {}, 0
    for (name, layer), s in zip(layers.items(), scores, strict=True):
        grid = kept[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
        masks[name] = grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: layer.out_features]
    log.info(
        "masks: kept %d of %d blocks %s (sparsity %.4f) over %d layers",
        n_keep,
        flat.numel(),
        block,
        1 - n_keep / flat.numel(),
        len(layers),
    )
    return masks


def save_masks(masks: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write masks to a safetensors file (atomically: an old file is replaced only by a
    complete new one)."""
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask {name} must be a 2-D bool tensor")
    if not _keeps_something(masks):
        raise ValueError("the masks to save keep no element of B: nothing would train")
    with atomic_file(path) as tmp:
        save_file(
            {k: v.contiguous().cpu() for k, v in masks.items()},
            tmp,
            metadata={"format": MASKS_FORMAT, "version": MASKS_VERSION, "sha256": tensors_digest(masks)},
        )


_PEFT_PREFIX = "base_model.model."
_PEFT_SUFFIXES = (".lora_B.default.weight", ".lora_B.weight", ".lora_B.default", ".lora_B")


def _module_name(key: str) -> str:
    """A module name from a mask key written by PEFT-based code (the original LoRI)."""
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    for suffix in _PEFT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _keeps_something(masks: dict[str, torch.Tensor]) -> bool:
    return any(bool(m.any()) for m in masks.values())


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Masks from ``save_masks``' safetensors file, or from a ``torch.save``d dict of the
    original LoRI code (``.pt``/``.pth``/``.bin``, read with ``weights_only=True``: no code
    runs; PEFT-style keys are reduced to module names; nonzero means kept). Masks that
    keep nothing are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no masks file at {path}")
    if path.suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise CheckpointError(
            f"{path} is not a masks file: expected .safetensors (lori extract-masks) or a torch file of the "
            f"original LoRI code ({', '.join(_TORCH_SUFFIXES)})"
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
            masks = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        if metadata.get("format") != MASKS_FORMAT:
            raise CheckpointError(f"{path} is not a LoRI masks file (format {metadata.get('format')!r})")
        if metadata.get("version") != MASKS_VERSION:
            raise CheckpointError(
                f"{path} has masks format version {metadata.get('version')!r}; this code reads {MASKS_VERSION}"
            )
        if "sha256" not in metadata:
            log.warning("%s predates masks checksums: its content is not verified", path)
        elif metadata["sha256"] != tensors_digest(masks):
            raise CheckpointError(f"{path} does not match its checksum: truncated or corrupted")
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for foreign or unsafe files
            raise CheckpointError(
                f"{path} is neither a safetensors masks file nor a weights-only torch file: {e}"
            ) from None
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()
        ):
            raise CheckpointError(f"{path} must hold a dict of module name -> mask tensor")
        masks = {_module_name(k): v != 0 for k, v in raw.items()}
    for name, mask in masks.items():
        if mask.dim() != 2:
            raise CheckpointError(f"mask {name} in {path} must be 2-D [out, r], got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise CheckpointError(f"mask {name} in {path} must be bool, got {mask.dtype}")
    if not _keeps_something(masks):
        raise CheckpointError(f"the masks in {path} keep no element of B: nothing would train")
    return {k: v.clone() for k, v in masks.items()}
