"""``LoRIConfig``: what to adapt and how, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from lori.recipes import recipe
from lori_kernels import rng
from lori_kernels.block_sparse import check_block

__all__ = ["LoRIConfig", "DEFAULT_TARGET_MODULES"]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRIConfig:
    """Hyperparameters of a LoRI adapter: the library's defaults (``from_recipe("paper")``
    gives the original LoRI code's: element masks)."""

    r: int = field(default=32, metadata={"help": "Rank of the adapter (rows of the frozen A)."})
    alpha: float | None = field(
        default=None,
        metadata={"help": "LoRA alpha; the update is scaled by alpha / r. Default: 2 * r."},
    )
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={"help": "Names (last component) of the nn.Linear modules to adapt."},
    )
    block: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "Block (bo, br) of the sparse B; br divides r. (1, 1) is an element mask. "
            "Default: (32, min(r, 32))."
        },
    )
    dist: str = field(
        default="uniform",
        metadata={"help": "Distribution of A: 'uniform' (PEFT's kaiming init) or 'rademacher'."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Model-wide 64-bit seed; each layer's A comes from it and its name."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    sparsity: float = field(
        default=0.9,
        metadata={"help": "Fraction of B's blocks dropped by mask extraction, in [0, 1)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRIConfig.r must be a positive int, got {self.r!r}")
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRIConfig.alpha must be a positive finite number, got {self.alpha!r}")
        if isinstance(self.target_modules, str) or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"LoRIConfig.target_modules must be a list of module names, got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("LoRIConfig.target_modules is empty: nothing would be adapted")
        if self.block is None:
            self.block = (32, min(self.r, 32))
        try:
            self.block = check_block(self.block, self.r)
        except ValueError as e:
            raise ValueError(f"LoRIConfig.block: {e}") from None
        if self.dist not in rng.DISTRIBUTIONS:
            raise ValueError(f"LoRIConfig.dist must be one of {rng.DISTRIBUTIONS}, got {self.dist!r}")
        try:
            self.seed = rng.to_uint64(self.seed)
        except (TypeError, ValueError) as e:
            raise ValueError(f"LoRIConfig.seed: {e}") from None
        for name in ("dropout", "sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"LoRIConfig.{name} must be in [0, 1), got {value!r}")

    @classmethod
    def from_recipe(cls, name: str, **fields) -> LoRIConfig:
        """A config with recipe ``name``'s defaults (``lori.recipes``: ``"paper"`` is the
        original LoRI code's, element masks) under ``fields``."""
        return cls(**{**recipe(name)["adapter"], **fields})

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor on the adapter's output."""
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["block"] = list(self.block)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoRIConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRIConfig fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        if d.get("block") is not None:
            d["block"] = tuple(d["block"])
        return cls(**d)
