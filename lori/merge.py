"""Merging LoRI adapters.

- ``merge``: combine adapters (LoRI checkpoints or PEFT adapter directories) into one,
  with PEFT's ``add_weighted_adapter`` semantics: ``cat`` (``ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ``,
  exact) or ``linear`` (``(Σ √(wᵢsᵢ) Bᵢ)(Σ √(wᵢsᵢ) Aᵢ)``, same ranks). When every
  adapter has the same A in every layer (same seeds), both are exactly one LoRI adapter
  with the original A and ``B = Σ cᵢ Bᵢ`` on the union of the kept blocks: as compact as
  its inputs. Otherwise the result keeps its A stored (rank ``Σ rᵢ`` for ``cat``).
- ``merge_adapter`` / ``unmerge_adapter``: fold the model's adapter into the base weights
  (fp32 math, ``isfinite`` checked) and back, bit for bit; ``merge_and_unload`` folds and
  removes the adapters. ``ΔW`` is materialized by ``lori_kernels.delta_weight`` on the
  layer's backend (only the kept blocks are read), a slab of input columns at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import lori_kernels
from lori.checkpoint import CONFIG_FILE, read_lori_updates
from lori.config import LoRIConfig
from lori.errors import CheckpointError
from lori.layer import LoRILinear, is_quantized
from lori.model import lori_layers, remove_lori
from lori.peft_interop import PEFT_CONFIG_FILE, read_peft
from lori.updates import LayerUpdate, install

log = logging.getLogger(__name__)

__all__ = [
    "COMBINATIONS",
    "combine",
    "default_weights",
    "delta_weight",
    "is_sparse",
    "merge",
    "merge_adapter",
    "merge_and_unload",
    "read_adapter",
    "unmerge_adapter",
]

COMBINATIONS = ("cat", "linear")
# The original LoRI merging scripts' weight of each adapter, (LoRI-D, LoRI-S): merge_3_loras.sh
# for three adapters, merge_4_loras.sh for four.
ORIGINAL_WEIGHTS = {3: (0.5, 0.4), 4: (0.4, 0.3)}
_SLAB_ELEMENTS = 1 << 24  # columns of ΔW materialized at once: <= 64 MiB of float32


def read_adapter(path: str | Path, *, base: nn.Module | None = None) -> tuple[LoRIConfig, dict[str, LayerUpdate]]:
    """A LoRI checkpoint or a PEFT adapter directory, as config and updates; with
    ``base``, a LoRI checkpoint must have been trained on that base model (a PEFT
    adapter records no fingerprint: its shapes are checked when it is installed)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return read_lori_updates(path, base=base)
    if (path / PEFT_CONFIG_FILE).is_file():
        return read_peft(path)
    raise CheckpointError(
        f"{path} is neither a LoRI checkpoint ({CONFIG_FILE}) nor a PEFT adapter ({PEFT_CONFIG_FILE})"
    )


def is_sparse(adapter: dict[str, LayerUpdate]) -> bool:
    """Whether an adapter is LoRI-S: its masks drop elements of B, or (a PEFT-format adapter,
    which carries no masks) at least half of its B is exact zeros."""
    total = sum(u.mask.numel() for u in adapter.values())
    kept = sum(int(u.mask.sum()) for u in adapter.values())
    nonzero = sum(int((u.b != 0).sum()) for u in adapter.values())
    return kept < total or 2 * nonzero <= total


def default_weights(adapters: Sequence[dict[str, LayerUpdate]]) -> list[float]:
    """The original LoRI merging scripts' weights: with up to three adapters 0.5 for each
    LoRI-D and 0.4 for each LoRI-S adapter (merge_3_loras.sh), with four or more 0.4 and 0.3
    (merge_4_loras.sh). Which weights and why is logged."""
    dense, sparse = ORIGINAL_WEIGHTS[3 if len(adapters) <= 3 else 4]
    kinds = ["LoRI-S" if is_sparse(adapter) else "LoRI-D" for adapter in adapters]
    weights = [sparse if kind == "LoRI-S" else dense for kind in kinds]
    log.info(
        "merge weights %s: the original LoRI scripts' for %s adapters of kinds %s (LoRI-S: masks, or half of B exact "
        "zeros); pass weights to choose others",
        weights,
        "up to 3" if len(adapters) <= 3 else "4 or more",
        kinds,
    )
    return weights


def _rank(adapter: dict[str, LayerUpdate]) -> int:
    ranks = {u.r for u in adapter.values()}
    if len(ranks) != 1:
        raise ValueError(f"an adapter to merge has layers of different ranks {sorted(ranks)}")
    return ranks.pop()


def _shares_a(adapters: Sequence[dict[str, LayerUpdate]]) -> bool:
    """Whether every layer of every adapter has the same seeded A."""
    first = adapters[0]
    return all(
        set(adapter) == set(first)
        and all(
            u.seed is not None and (u.seed, u.dist, u.r, u.in_features) == (v.seed, v.dist, v.r, v.in_features)
            for u, v in ((adapter[n], first[n]) for n in first)
        )
        for adapter in adapters
    )


def combine(
    adapters: Sequence[dict[str, LayerUpdate]], weights: Sequence[float], combination: str = "cat"
) -> tuple[int, dict[str, LayerUpdate]]:
    """The rank and per-layer updates of the weighted combination of ``adapters``; every
    result has scaling 1 (as PEFT's merged adapters: ``lora_alpha = r``)."""
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"need one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    ranks = [_rank(adapter) for adapter in adapters]
    if combination == "linear" and len(set(ranks)) != 1:
        raise ValueError(f"linear merging needs adapters of one rank, got ranks {ranks} (use cat)")
    shared = _shares_a(adapters)
    names = list(dict.fromkeys(name for adapter in adapters for name in adapter))
    merged = {}
    for name in names:
        terms = [(w, adapter[name]) for w, adapter in zip(weights, adapters, strict=True) if name in adapter]
        first = terms[0][1]
        for _, u in terms:
            if (u.out_features, u.in_features) != (first.out_features, first.in_features):
                raise ValueError(f"{name} has different shapes in the adapters to merge")
        if combination == "cat":
            b_coef = [w * u.scaling for w, u in terms]
            a_coef = [1.0] * len(terms)
        else:
            b_coef = [math.sqrt(abs(w * u.scaling)) for w, u in terms]
            a_coef = [math.copysign(c, w * u.scaling) for c, (w, u) in zip(b_coef, terms, strict=True)]
        common = dict(scaling=1.0, in_features=first.in_features, dist=first.dist)
        if shared or combination == "linear":
            b = sum(c * u.b for c, (_, u) in zip(b_coef, terms, strict=True))
            mask = torch.stack([u.mask for _, u in terms]).any(dim=0)
            if shared:  # one A: cat ΔW = (Σ b_coef B) A, linear ΔW = (Σ a_coef)(Σ b_coef B) A
                factor = sum(a_coef) if combination == "linear" else 1.0
                merged[name] = LayerUpdate(b=b * factor, mask=mask, block=first.block, seed=first.seed, **common)
            else:
                a = sum(c * u.a_matrix() for c, (_, u) in zip(a_coef, terms, strict=True))
                merged[name] = LayerUpdate(b=b, mask=mask, block=first.block, a=a, **common)
            continue
        a_parts, b_parts, mask_parts = [], [], []
        for w, adapter, r in zip(weights, adapters, ranks, strict=True):
            u = adapter.get(name)
            if u is None:
                a_parts.append(torch.zeros(r, first.in_features))
                b_parts.append(torch.zeros(first.out_features, r))
                mask_parts.append(torch.zeros(first.out_features, r, dtype=torch.bool))
            else:
                a_parts.append(u.a_matrix())
                b_parts.append(w * u.scaling * u.b)
                mask_parts.append(u.mask)
        block = (first.block[0], math.gcd(first.block[1], *ranks))
        merged[name] = LayerUpdate(
            b=torch.cat(b_parts, dim=1),
            mask=torch.cat(mask_parts, dim=1),
            block=block,
            a=torch.cat(a_parts),
            **common,
        )
    rank = sum(ranks) if combination == "cat" and not shared else ranks[0]
    return rank, merged


def merge(
    model: nn.Module,
    adapters: Sequence[str | Path],
    *,
    weights: Sequence[float] | None = None,
    combination: str = "cat",
    fold: bool = False,
    check_base: bool = True,
    backend: str = "auto",
) -> nn.Module:
    """Put the weighted combination (``combine``) of the adapters at ``adapters`` (LoRI
    checkpoints or PEFT adapter directories) into ``model``, a base model without
    adapters; ``weights`` default to the original LoRI scripts' (``default_weights``). With
    ``check_base`` every LoRI checkpoint must have been trained on ``model`` (as
    ``load_lori``). With ``fold`` the result is folded into the base weights and the
    adapters removed (``merge_and_unload``). Returns the model."""
    read = [read_adapter(path, base=model if check_base else None) for path in adapters]
    if not read:
        raise ValueError("no adapters to merge")
    updates = [u for _, u in read]
    weights = list(weights) if weights is not None else default_weights(updates)
    rank, merged = combine(updates, weights, combination)
    first_config = read[0][0]
    targets = [config.target_modules for config, _ in read]
    # Lists of names join; "all-linear" or a regular expression cannot, so the merged layers are named.
    if all(isinstance(t, tuple) for t in targets):
        target_modules = tuple(dict.fromkeys(m for t in targets for m in t))
    else:
        target_modules = targets[0] if len(set(targets)) == 1 else tuple(sorted(merged))
    config = dataclasses.replace(
        first_config,
        r=rank,
        alpha=float(rank),
        block=next(iter(merged.values())).block,
        dropout=0.0,
        target_modules=target_modules,
    )
    install(model, config, merged, backend=backend)
    log.info(
        "merged %d adapters (%s, weights %s) into %d layers of rank %d%s",
        len(read),
        combination,
        weights,
        len(merged),
        rank,
        "" if _shares_a(updates) else " with stored A (the adapters' A differ)",
    )
    return merge_and_unload(model) if fold else model


def delta_weight(layer: LoRILinear, columns: slice = slice(None)) -> torch.Tensor:
    """``ΔW[:, columns] = s · B · A[:, columns]`` of a layer in float32, by
    ``lori_kernels.delta_weight`` on the layer's backend (only kept blocks are read)."""
    return lori_kernels.delta_weight(
        None if layer.stored_a is not None else layer.layer_seed,
        layer.full_b_values(),
        layer.b_blocks,
        out_features=layer.out_features,
        in_features=layer.in_features,
        r=layer.r,
        scaling=layer.scaling,
        dist=layer.dist,
        a=layer.stored_a,
        columns=columns,
        backend=layer.backend,
    )


def _slabs(layer: LoRILinear):
    step = max(1, _SLAB_ELEMENTS // max(layer.out_features, 1))
    return [slice(c, min(c + step, layer.in_features)) for c in range(0, layer.in_features, step)]


@dataclasses.dataclass
class _Fold:
    """What unfolding needs besides ΔW: the weight elements (``rows``, ``cols`` of the
    ``[out, in]`` weight) that ``(W + ΔW) - ΔW`` does not round back to, their ``values``,
    and the version of ``b_values`` that was folded."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    b_version: int


def _fold(layer: LoRILinear) -> None:
    weight = layer.base_weight()  # [out, in]: a Conv1D's as a transposed view
    if not weight.is_floating_point():
        raise ValueError(f"cannot fold into a {weight.dtype} weight")
    flat = weight.detach()
    merged = torch.empty_like(flat)
    rows, cols, values = [], [], []
    for slab in _slabs(layer):
        delta = delta_weight(layer, slab)
        w = flat[:, slab]
        m = w.float() + delta
        if not torch.isfinite(m).all():
            raise ValueError("folding gives NaN or Inf")
        merged[:, slab] = m.to(flat.dtype)
        off = (merged[:, slab].float() - delta).to(flat.dtype) != w
        r, c = off.nonzero(as_tuple=True)
        rows.append(r)
        cols.append(c + slab.start)
        values.append(w[r, c])
    with torch.no_grad():
        weight.copy_(merged)
    layer.fold = _Fold(torch.cat(rows), torch.cat(cols), torch.cat(values), layer.b_values._version)


def _unfold(layer: LoRILinear) -> None:
    fold = layer.fold
    if layer.b_values._version != fold.b_version:
        raise ValueError("b_values changed since the adapter was folded: the fold cannot be undone exactly")
    weight = layer.base_weight()
    with torch.no_grad():
        for slab in _slabs(layer):
            w = weight[:, slab]
            w.copy_((w.float() - delta_weight(layer, slab)).to(weight.dtype))
        weight[fold.rows, fold.cols] = fold.values
    layer.fold = None


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every adapter layer into its base weight (``W += s·B·A`` in float32, rounded
    once); the layers then run as their base. Undone exactly by ``unmerge_adapter``. On a
    non-finite result the layers already folded are unfolded and an error names the layer.
    A quantized base weight is refused before anything is folded."""
    layers = lori_layers(model)
    if not layers:
        raise ValueError("the model has no LoRI adapters to fold")
    active = {layer.active_adapter for layer in layers.values()} - {layer.adapter_name for layer in layers.values()}
    if active:
        raise ValueError(
            f"the active adapter {sorted(active)[0]!r} is not the model's first; merge_adapter folds the first "
            "adapter: set_adapter(model, its name) first"
        )
    quantized = [name for name, layer in layers.items() if is_quantized(layer.base_layer)]
    if quantized:
        weight = layers[quantized[0]].base_layer.weight
        raise ValueError(
            f"cannot fold into {quantized[0]}: its base weight is quantized ({type(weight).__name__}), and adding "
            "ΔW to it would quantize the adapter away; keep the adapter unfolded, or load the base unquantized to fold"
        )
    done = []
    for name, layer in layers.items():
        if layer.fold is not None:
            continue
        try:
            _fold(layer)
        except ValueError as e:
            for folded in reversed(done):
                _unfold(folded)
            raise ValueError(f"{name}: {e}; nothing was folded") from None
        done.append(layer)
    log.info("folded %d adapter layers into the base weights", len(done))
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapter``: every base weight back to its bits before folding."""
    for layer in lori_layers(model).values():
        if layer.fold is not None:
            _unfold(layer)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and take the adapter layers out: a plain
    model (``save_pretrained`` writes it like any other)."""
    merge_adapter(model)
    return remove_lori(model)
