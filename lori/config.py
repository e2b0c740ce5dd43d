"""``LoRIConfig``: what to adapt and how, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from lori.recipes import recipe
from lori_kernels import rng
from lori_kernels.block_sparse import check_block

__all__ = ["ALL_LINEAR", "LoRIConfig", "DEFAULT_TARGET_MODULES"]

# The default targets, as PEFT's ``target_modules="all-linear"``: every linear layer but the output head.
# Not PEFT's per-model-type defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING): those adapt only
# q_proj and v_proj of Llama, Mistral, Qwen, Gemma and Mixtral and have no entry for Phi-3, where LoRI adapts
# every projection (the LoRI paper's setting and this library's default from the start).
ALL_LINEAR = "all-linear"
# The linear layers of a Llama-family decoder layer: what "all-linear" selects there (the default
# target_modules before it was "all-linear").
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
    target_modules: tuple[str, ...] | str = field(
        default=ALL_LINEAR,
        metadata={
            "help": "The nn.Linear modules to adapt, as PEFT selects them: 'all-linear' (every one but the "
            "output head), a regular expression matching whole module names, or a list of names that module "
            "names end with (after a dot)."
        },
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
        self.target_modules = _check_target_modules(self.target_modules)
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
        if not isinstance(self.target_modules, str):
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


def _check_target_modules(target_modules) -> tuple[str, ...] | str:
    """``target_modules`` normalized: ``ALL_LINEAR`` (any case, or alone in a list, as the
    command line gives it), a regular expression, or a tuple of names."""
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return ALL_LINEAR
        if not target_modules:
            raise ValueError("LoRIConfig.target_modules is empty: nothing would be adapted")
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"LoRIConfig.target_modules {target_modules!r} is not a regular expression: {e}") from None
        return target_modules
    try:
        names = tuple(target_modules)
    except TypeError:
        names = None
    if names is None or not all(isinstance(m, str) and m for m in names):
        raise ValueError(
            f"LoRIConfig.target_modules must be 'all-linear', a regular expression or a list of module names, "
            f"got {target_modules!r}"
        )
    if not names:
        raise ValueError("LoRIConfig.target_modules is empty: nothing would be adapted")
    if len(names) == 1 and names[0].lower() == ALL_LINEAR:
        return ALL_LINEAR
    return names
