"""``TrainConfig``: one training run, validated on construction (before anything loads)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from lori.config import LoRIConfig
from lori.quantize import QUANTIZED_KINDS
from lori.recipes import recipe
from lori_kernels.backends import BACKENDS

__all__ = ["LR_LORI_D", "LR_LORI_S", "TrainConfig", "changed_resume_fields", "resume_fields"]

RESUME = {"resume": True}  # field metadata: must not change when a run resumes

# The original LoRI recipe's learning rates at r 32: LoRI-D (dense B) and LoRI-S (masked B).
LR_LORI_D, LR_LORI_S = 5e-5, 5e-4


@dataclass
class TrainConfig:
    """One training run: the adapter's ``LoRIConfig`` and how to train it. ``lr=None`` takes
    the LoRI recipe's rate for the stage. Fields marked ``resume`` in their metadata must
    be the same when a run resumes (``resume_fields``)."""

    model: str = field(metadata={"help": "Local directory of the base model (Hugging Face format).", **RESUME})
    data: str = field(metadata={"help": "Local .json/.jsonl/.parquet file with prompt/response fields.", **RESUME})
    output: str = field(metadata={"help": "Run directory: adapter/ at the end, checkpoints/ on the way."})
    masks: str | None = field(
        default=None, metadata={"help": "Masks file: train LoRI-S (B restarts from zero).", **RESUME}
    )
    init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Continual learning: start from this LoRI adapter (its seeds, r and block); with --masks only "
            "the masks' blocks train and every other block stays bit-identical.",
            **RESUME,
        },
    )
    adapter: LoRIConfig = field(
        default_factory=LoRIConfig,
        metadata={"help": "The adapter: rank, alpha, block, dist of A, seed, dropout, target modules.", **RESUME},
    )
    lr: float | None = field(
        default=None, metadata={"help": f"Peak learning rate (default {LR_LORI_D} D, {LR_LORI_S} S).", **RESUME}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay.", **RESUME})
    schedule: str = field(default="cosine", metadata={"help": "'constant' or 'cosine' after warm-up.", **RESUME})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of steps of linear warm-up.", **RESUME})
    epochs: int = field(default=1, metadata={"help": "Passes over the data.", **RESUME})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps.", **RESUME})
    batch_size: int = field(default=8, metadata={"help": "Examples per process per micro-batch.", **RESUME})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step.", **RESUME})
    max_length: int = field(default=512, metadata={"help": "Tokens kept per example.", **RESUME})
    loss_normalization: str = field(
        default="token",
        metadata={
            "help": "'token': a step's loss is the mean over the response tokens of its global batch; 'sequence': "
            "each sequence's summed response-token loss, averaged over its sequences (the original LoRI code's).",
            **RESUME,
        },
    )
    loss_chunk_tokens: int = field(
        default=1024,
        metadata={
            "help": "Tokens whose logits exist at once: the loss is computed from the last hidden states in chunks, "
            "never materialising a micro-batch's full logits (0: from the full logits). Same loss either way."
        },
    )
    clip_grad: float | None = field(default=1.0, metadata={"help": "Gradient-norm clip (None: off)."})
    clip_mode: str = field(default="global", metadata={"help": "'global' (one norm) or 'per_tensor'."})
    precision: str = field(default="auto", metadata={"help": "'fp32', 'bf16', or 'auto' (bf16 on GPU)."})
    quantize_base: str | None = field(
        default=None,
        metadata={
            "help": f"Quantize the base's linear layers (not the output head) before adapting, QLoRA-style: one of "
            f"{', '.join(QUANTIZED_KINDS)} (lori.quantize_base); one process only.",
            **RESUME,
        },
    )
    activation_checkpointing: bool = field(default=False, metadata={"help": "Recompute decoder layers."})
    mesh: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "HSDP: 'replicate x shard' processes (e.g. 8x8: a replica per node of 8 GPUs, sharded within "
            "it); default: FSDP, every process one shard.",
            **RESUME,
        },
    )
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: no checkpoints)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many of the latest checkpoints to keep."})
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint in output."})
    overwrite_output: bool = field(
        default=False,
        metadata={"help": "Start over in an output directory that holds an earlier run (its checkpoints are deleted)."},
    )
    log_every: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the data order.", **RESUME})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    backend: str = field(default="auto", metadata={"help": "lori_linear backend."})

    def __post_init__(self):
        """Every setting checked before anything is loaded (paths are checked by ``train``)."""
        for name in ("model", "data", "output"):
            _require(self, name, lambda v: isinstance(v, str) and v, "a non-empty path")
        choices = {"schedule": ("constant", "cosine"), "clip_mode": ("global", "per_tensor")}
        choices["precision"] = ("auto", "fp32", "bf16")
        choices["loss_normalization"] = ("token", "sequence")
        choices["backend"] = ("auto", *BACKENDS)
        choices["quantize_base"] = (None, *QUANTIZED_KINDS)
        for name, allowed in choices.items():
            _require(self, name, lambda v, allowed=allowed: v in allowed, f"one of {allowed}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "keep_checkpoints", "log_every"):
            _require(self, name, lambda v: _is_int(v) and v >= 1, "at least 1")
        _require(self, "max_steps", lambda v: v is None or _is_int(v) and v >= 1, "at least 1")
        _require(self, "save_every", lambda v: _is_int(v) and v >= 0, "at least 0 (0: no checkpoints)")
        _require(self, "loss_chunk_tokens", lambda v: _is_int(v) and v >= 0, "at least 0 (0: the full logits)")
        _require(self, "data_seed", lambda v: _is_int(v) and 0 <= v < 2**62, "an integer in [0, 2^62)")
        _require(self, "lr", lambda v: v is None or _is_finite(v) and v > 0, "a positive finite number")
        _require(self, "clip_grad", lambda v: v is None or _is_finite(v) and v > 0, "positive and finite, or None")
        _require(self, "weight_decay", lambda v: _is_finite(v) and v >= 0, "a finite number >= 0")
        _require(self, "warmup_ratio", lambda v: _is_finite(v) and 0 <= v < 1, "in [0, 1)")
        for name in ("activation_checkpointing", "resume", "overwrite_output", "progress"):
            _require(self, name, lambda v: isinstance(v, bool), "True or False")
        _require(
            self,
            "mesh",
            lambda v: v is None or (isinstance(v, tuple) and len(v) == 2 and all(_is_int(n) and n >= 1 for n in v)),
            "None or (replicate, shard), two integers >= 1",
        )
        if self.resume and self.overwrite_output:
            raise ValueError("resume and overwrite_output exclude each other: continue the run, or start over")
        if not isinstance(self.adapter, LoRIConfig):
            raise TypeError(f"adapter must be a LoRIConfig, got {type(self.adapter).__name__}")

    def check_world_size(self, world_size: int) -> None:
        """Refuses a run of ``world_size`` processes that these settings cannot make: a quantized
        base runs in one process (FSDP2 does not shard quantized weights here)."""
        if self.quantize_base is not None and world_size > 1:
            raise ValueError(
                f"quantize_base runs in one process; {world_size} processes would shard quantized weights with FSDP2, "
                "which is not supported: train on one GPU, or leave the base unquantized"
            )

    @classmethod
    def from_recipe(cls, name: str, *, adapter: dict | None = None, **fields) -> TrainConfig:
        """A run with recipe ``name``'s defaults (``lori.recipes``; ``"paper"`` reproduces the
        original LoRI code's LoRI-D and LoRI-S) under ``fields`` and the ``adapter``'s
        LoRIConfig fields."""
        preset = recipe(name)
        return cls(adapter=LoRIConfig.from_recipe(name, **(adapter or {})), **{**preset["train"], **fields})

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (LR_LORI_S if self.masks else LR_LORI_D)


def _require(cfg, name: str, ok, want: str) -> None:
    value = getattr(cfg, name)
    if not ok(value):
        raise ValueError(f"{name} must be {want}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resume_fields(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the run it continues (the fields marked
    ``resume``), as JSON values."""
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps({f.name: d[f.name] for f in dataclasses.fields(cfg) if f.metadata.get("resume")}))


def changed_resume_fields(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that differ from ``saved`` (a checkpoint's ``resume_fields``); a
    setting the checkpoint does not record (it was written before the setting existed) counts
    as its default."""
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(TrainConfig)
        if f.metadata.get("resume") and f.default is not dataclasses.MISSING
    }
    now, then = resume_fields(cfg), {**json.loads(json.dumps(defaults)), **saved}
    return sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
