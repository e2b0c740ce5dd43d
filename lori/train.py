"""Training LoRI adapters (LoRI-D, or LoRI-S with masks), single process or FSDP2.

The same code runs alone or under ``torchrun``/``accelerate launch``: with a world size
above one it shards the model with ``torch.distributed.fsdp.fully_shard`` (each decoder
layer, then the root; gloo on CPU, NCCL on GPUs). Only the compact ``b_values`` train, so
gradients and AdamW state are proportional to the kept blocks.

A run is reproducible and resumable: the data order comes from a seed, the loss of a
step is the sum over every response token of the global batch divided by their count
(the same with any number of processes), and checkpoints hold the adapter, the optimizer
state (safetensors), the schedule and the dropout counts, so a restarted run continues
the same loss curve.

Nothing is lost: every option is checked before anything is loaded; a new run refuses an
output directory holding an earlier run (``resume`` continues it, ``overwrite_output``
starts over); checkpoints are written crash-safely with checksums that bind their files
together (``trainer_state.json`` names the optimizer file's and the adapter's SHA-256,
the optimizer file records the state's digest); a non-finite loss or gradient norm stops
the run before the update that would spoil the adapter, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from tqdm.auto import tqdm

from lori.checkpoint import (
    ADAPTER_FILES,
    BINDING_KEY,
    CONFIG_FILE,
    AdapterSnapshot,
    check_binding,
    load_lori,
    save_lori,
)
from lori.config import DEFAULT_TARGET_MODULES, LoRIConfig
from lori.continual import stack_adapter
from lori.data import IGNORE_INDEX, collate, load_examples, tokenize_example
from lori.digests import json_digest, safetensors_metadata
from lori.errors import CheckpointError, OutputError, TrainingError
from lori.files import check_output_dir, read_json, recover, remove_written, write_directory
from lori.masks import load_masks
from lori.model import enable_activation_checkpointing, get_lori_model, print_trainable_parameters, set_dropout_calls
from lori_kernels.backends import BACKENDS

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "read_checkpoint", "train"]

# The original LoRI recipe's learning rates at r 32: LoRI-D (dense B) and LoRI-S (masked B).
LR_LORI_D, LR_LORI_S = 5e-5, 5e-4


@dataclass
class TrainConfig:
    """One training run. ``lr=None`` takes the LoRI recipe's rate for the stage."""

    model: str = field(metadata={"help": "Local directory of the base model (Hugging Face format)."})
    data: str = field(metadata={"help": "Local .json/.jsonl/.parquet file with prompt/response fields."})
    output: str = field(metadata={"help": "Run directory: adapter/ at the end, checkpoints/ on the way."})
    masks: str | None = field(default=None, metadata={"help": "Masks file: train LoRI-S (B restarts from zero)."})
    init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Continual learning: start from this LoRI adapter (its seeds, r and block); with --masks only "
            "the masks' blocks train and every other block stays bit-identical."
        },
    )
    r: int = field(default=32, metadata={"help": "Adapter rank."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2r)."})
    block: tuple[int, int] | None = field(
        default=None, metadata={"help": "Block (bo, br) of B (default (32, min(r, 32)))."}
    )
    dist: str = field(default="uniform", metadata={"help": "Distribution of A."})
    seed: int = field(default=0, metadata={"help": "Model-wide adapter seed (A of every layer)."})
    dropout: float = field(default=0.0, metadata={"help": "Adapter input dropout."})
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES, metadata={"help": "Adapted modules."})
    lr: float | None = field(
        default=None, metadata={"help": f"Peak learning rate (default {LR_LORI_D} D, {LR_LORI_S} S)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    schedule: str = field(default="cosine", metadata={"help": "'constant' or 'cosine' after warm-up."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of steps of linear warm-up."})
    epochs: int = field(default=1, metadata={"help": "Passes over the data."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Examples per process per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_length: int = field(default=512, metadata={"help": "Tokens kept per example."})
    clip_grad: float | None = field(default=1.0, metadata={"help": "Gradient-norm clip (None: off)."})
    clip_mode: str = field(default="global", metadata={"help": "'global' (one norm) or 'per_tensor'."})
    precision: str = field(default="auto", metadata={"help": "'fp32', 'bf16', or 'auto' (bf16 on GPU)."})
    activation_checkpointing: bool = field(default=False, metadata={"help": "Recompute decoder layers."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: no checkpoints)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many of the latest checkpoints to keep."})
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint in output."})
    overwrite_output: bool = field(
        default=False,
        metadata={"help": "Start over in an output directory that holds an earlier run (its checkpoints are deleted)."},
    )
    log_every: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the data order."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    backend: str = field(default="auto", metadata={"help": "lori_linear backend."})

    def __post_init__(self):
        """Every setting checked before anything is loaded (paths are checked by ``train``)."""
        for name in ("model", "data", "output"):
            _require(self, name, lambda v: isinstance(v, str) and v, "a non-empty path")
        choices = {"schedule": ("constant", "cosine"), "clip_mode": ("global", "per_tensor")}
        choices["precision"] = ("auto", "fp32", "bf16")
        choices["backend"] = ("auto", *BACKENDS)
        for name, allowed in choices.items():
            _require(self, name, lambda v, allowed=allowed: v in allowed, f"one of {allowed}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "keep_checkpoints", "log_every"):
            _require(self, name, lambda v: _is_int(v) and v >= 1, "at least 1")
        _require(self, "max_steps", lambda v: v is None or _is_int(v) and v >= 1, "at least 1")
        _require(self, "save_every", lambda v: _is_int(v) and v >= 0, "at least 0 (0: no checkpoints)")
        _require(self, "data_seed", lambda v: _is_int(v) and 0 <= v < 2**62, "an integer in [0, 2^62)")
        _require(self, "lr", lambda v: v is None or _is_finite(v) and v > 0, "a positive finite number")
        _require(self, "clip_grad", lambda v: v is None or _is_finite(v) and v > 0, "positive and finite, or None")
        _require(self, "weight_decay", lambda v: _is_finite(v) and v >= 0, "a finite number >= 0")
        _require(self, "warmup_ratio", lambda v: _is_finite(v) and 0 <= v < 1, "in [0, 1)")
        for name in ("activation_checkpointing", "resume", "overwrite_output", "progress"):
            _require(self, name, lambda v: isinstance(v, bool), "True or False")
        if self.resume and self.overwrite_output:
            raise ValueError("resume and overwrite_output exclude each other: continue the run, or start over")
        self.lori_config()  # r, alpha, block, dist, seed, dropout, target_modules

    def lori_config(self) -> LoRIConfig:
        return LoRIConfig(
            r=self.r,
            alpha=self.alpha,
            target_modules=self.target_modules,
            block=self.block,
            dist=self.dist,
            seed=self.seed,
            dropout=self.dropout,
        )

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


class _World:
    """Rank, size and device of this process; starts the process group under torchrun."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        self.started = False
        if self.size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def close(self):
        if self.started:
            dist.destroy_process_group()


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: those the model names as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard (no _no_split_modules)")
    return layers


def _shard(model: torch.nn.Module, world: _World, bf16: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _load_model(model_cls, path: str, dtype: torch.dtype):
    """``from_pretrained`` in ``dtype`` (transformers 5 calls the argument ``dtype``, 4.x
    ``torch_dtype``)."""
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return model_cls.from_pretrained(path, **{key: dtype})


def _lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken on (labels are predicted one position ahead)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _clip(params: list[torch.Tensor], max_norm: float | None, mode: str) -> float:
    """Clip the gradients (one global norm, or each tensor's; ``None``: no clipping) and
    return their global norm before clipping (a collective under FSDP)."""
    groups = [params] if mode == "global" or max_norm is None else [[p] for p in params]
    norms = [torch.nn.utils.clip_grad_norm_(group, math.inf if max_norm is None else max_norm) for group in groups]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    return math.sqrt(sum(float(n) ** 2 for n in norms))


# --- checkpoints -----------------------------------------------------------------------

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


CHECKPOINT_FILES = (*ADAPTER_FILES, OPTIMIZER_FILE, STATE_FILE)
ADAPTER_DIR = "adapter"


def _checkpoints(output: Path) -> list[Path]:
    """The run's checkpoints, oldest first (a checkpoint whose write a crash interrupted
    after its commit is completed first; one interrupted before is not listed)."""
    root = output / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        recover(p)
        if p.name[5:].isdigit() and (p / STATE_FILE).is_file():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def _check_output(cfg: TrainConfig, output: Path) -> list[Path]:
    """Refuse, before anything is loaded, an output directory the run would spoil: one
    holding an earlier run (unless resuming or overwriting it), or files of others where
    the run writes (``adapter/``, ``checkpoints/step-*``). Returns the checkpoints found."""
    check_output_dir(output, lambda name: True, what="run directory")
    found = _checkpoints(output)
    finished = (output / ADAPTER_DIR / CONFIG_FILE).is_file()
    if (found or finished) and not (cfg.resume or cfg.overwrite_output):
        held = f"checkpoints up to {found[-1].name}" if found else f"a finished run's {ADAPTER_DIR}/"
        raise OutputError(
            f"{output} holds an earlier run ({held}); pass --resume to continue it or --overwrite-output to start over"
        )
    if cfg.resume and finished and not found:
        raise OutputError(
            f"{output} holds a finished run and no checkpoint to resume from; pass --overwrite-output to train again"
        )
    check_output_dir(output / ADAPTER_DIR, ADAPTER_FILES, what="LoRI adapter")
    for step in (output / "checkpoints").glob("step-*"):
        check_output_dir(step, CHECKPOINT_FILES, what="training checkpoint")
    return found


def _resume_fields(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the run it continues."""
    keep = (
        "model",
        "data",
        "masks",
        "init_adapter",
        "r",
        "alpha",
        "block",
        "dist",
        "seed",
        "dropout",
        "target_modules",
        "lr",
        "weight_decay",
        "schedule",
        "warmup_ratio",
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "max_length",
        "data_seed",
    )
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps({k: d[k] for k in keep}))


def _save_checkpoint(model, optimizer, scheduler, cfg, world, step, micro_steps, losses, path: Path) -> None:
    """Adapter, optimizer state and run state under ``path`` (collective; rank 0 writes),
    then the oldest checkpoints beyond ``keep_checkpoints`` removed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    adapter = AdapterSnapshot(model)
    if world.main:
        tensors = {
            f"{fqn}/{key}": v.detach().reshape(-1) if v.dim() == 0 else v.detach().contiguous()
            for fqn, entry in osd["state"].items()
            for key, v in entry.items()
            if torch.is_tensor(v)
        }
        state = {
            "step": step,
            "micro_steps": micro_steps,
            "world_size": world.size,
            "losses": losses,
            "scheduler": scheduler.state_dict(),
            "config": _resume_fields(cfg),
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
                for g in osd["param_groups"]
            ],
        }
        with write_directory(path, CHECKPOINT_FILES, what="training checkpoint") as out:
            state["adapter_sha256"] = adapter.write(out)
            optimizer_file = out.file(OPTIMIZER_FILE)
            save_file(tensors, optimizer_file, metadata={BINDING_KEY: json_digest(state)})
            state["optimizer_sha256"] = hashlib.sha256(optimizer_file.read_bytes()).hexdigest()
            out.file(STATE_FILE).write_text(json.dumps(state, indent=1))
        for old in _checkpoints(path.parent.parent)[: -cfg.keep_checkpoints]:
            _remove_checkpoint(old)
        log.info("checkpoint at step %d -> %s", step, path)
    world.barrier()


def _remove_checkpoint(path: Path) -> None:
    if not remove_written(path, CHECKPOINT_FILES):
        log.warning("kept %s: it holds files the run did not write", path)


_STATE_KINDS = {
    "step": int,
    "micro_steps": int,
    "world_size": int,
    "losses": list,
    "scheduler": dict,
    "config": dict,
    "param_groups": list,
    "adapter_sha256": str,
    "optimizer_sha256": str,
}


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A training checkpoint's run state and optimizer tensors, checked against each other
    and against the adapter's config (every file is covered by a checksum; the adapter
    itself is checked by ``load_lori``)."""
    path = Path(path)
    recover(path)
    state_file, optimizer_file = path / STATE_FILE, path / OPTIMIZER_FILE
    state = read_json(state_file, "training checkpoint")
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} is not a training checkpoint's state (a JSON object is needed)")
    for key, kind in _STATE_KINDS.items():
        if type(state.get(key)) is not kind:
            raise CheckpointError(f"{state_file}: {key!r} is missing or not a {kind.__name__}")
    try:
        data = optimizer_file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {optimizer_file}: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() != state["optimizer_sha256"]:
        raise CheckpointError(f"{optimizer_file} does not match the checksum in {STATE_FILE}: truncated or corrupted")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{optimizer_file} is not a readable safetensors file: {e}") from None
    if BINDING_KEY not in safetensors_metadata(data):
        raise CheckpointError(f"{optimizer_file} does not record {STATE_FILE}'s digest")
    check_binding(data, {k: v for k, v in state.items() if k != "optimizer_sha256"}, optimizer_file, state_file)
    if read_json(path / CONFIG_FILE, "LoRI adapter").get("adapter_sha256") != state["adapter_sha256"]:
        raise CheckpointError(f"{path}: the adapter files are not the ones {STATE_FILE} was saved with")
    return state, tensors


def _load_checkpoint(model, optimizer, scheduler, cfg, world, path: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state, tensors = read_checkpoint(path)
    if state["world_size"] != world.size:
        raise ValueError(
            f"{path} was written by a run of {state['world_size']} processes; resume it with {state['world_size']} "
            f"(not {world.size}): the global batch and the dropout masks depend on it"
        )
    if state["config"] != _resume_fields(cfg):
        changed = sorted(k for k in state["config"] if state["config"][k] != _resume_fields(cfg).get(k))
        raise ValueError(f"cannot resume from {path}: the run's settings changed ({changed})")
    load_lori(model, path)
    osd_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        fqn, name = key.rsplit("/", 1)
        osd_state.setdefault(fqn, {})[name] = value.reshape(()) if name == "step" else value
    osd = {"state": osd_state, "param_groups": state["param_groups"]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    set_dropout_calls(model, state["micro_steps"])
    log.info("resumed from %s at step %d", path, state["step"])
    return state


# --- the run ---------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg``; return ``{"losses": [loss per step], "adapter": path, "steps": n}``.
    Under torchrun every process calls it."""
    world = _World()
    try:
        return _train(cfg, world)
    finally:
        world.close()


def _check_inputs(cfg: TrainConfig) -> None:
    """The paths a run reads exist (checked before anything is loaded)."""
    if not (Path(cfg.model) / "config.json").is_file():
        raise FileNotFoundError(f"no model directory at {cfg.model} (a local Hugging Face model with config.json)")
    for name in ("data", "masks"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_file():
            raise FileNotFoundError(f"no {name} file at {getattr(cfg, name)}")
    if cfg.init_adapter and not Path(cfg.init_adapter).is_dir():
        raise FileNotFoundError(f"no adapter directory at {cfg.init_adapter}")


def _train(cfg: TrainConfig, world: _World) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(cfg.output)
    _check_inputs(cfg)
    found = _check_output(cfg, output)
    if cfg.overwrite_output and world.main:
        for old in found:
            _remove_checkpoint(old)
    world.barrier()
    found = found if cfg.resume else []
    torch.manual_seed(cfg.seed)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and world.device.type == "cuda")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = _load_model(AutoModelForCausalLM, cfg.model, torch.bfloat16 if bf16 else torch.float32)
    model.to(world.device)
    masks = load_masks(cfg.masks) if cfg.masks else None
    frozen = None
    if cfg.init_adapter:
        frozen = stack_adapter(model, cfg.init_adapter, masks, dropout=cfg.dropout, backend=cfg.backend)
    else:
        get_lori_model(model, cfg.lori_config(), masks=masks, backend=cfg.backend)
    if world.main:
        print_trainable_parameters(model)
        log.info("base weights in %s, adapter in float32", str(next(model.parameters()).dtype).removeprefix("torch."))
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if world.size > 1:
        _shard(model, world, bf16)
        if frozen is not None:
            frozen.shard_like_parameters()
    model.train()

    examples = [tokenize_example(tokenizer, e, cfg.max_length) for e in load_examples(cfg.data)]
    per_step = cfg.batch_size * world.size * cfg.grad_accum
    steps_per_epoch = len(examples) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples are fewer than one optimizer step's {per_step}")
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    params = [p for p in model.parameters() if p.requires_grad]
    if sum(p.numel() for p in params) == 0:
        raise ValueError("nothing to train: the adapter keeps no block of B (are the masks empty?)")
    optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr(), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, round(cfg.warmup_ratio * total), cfg.schedule)
    )

    start, losses, last_checkpoint = 0, [], None
    if found:
        state = _load_checkpoint(model, optimizer, scheduler, cfg, world, found[-1])
        start, losses, last_checkpoint = state["step"], state["losses"], found[-1]
    elif cfg.resume and world.main:
        log.info("no checkpoint in %s: starting from step 0", output)

    def micro_batches(step: int):
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.data_seed + epoch))
        chosen = order[index * per_step : (index + 1) * per_step].tolist()
        for a in range(cfg.grad_accum):
            first = (a * world.size + world.rank) * cfg.batch_size
            yield collate([examples[i] for i in chosen[first : first + cfg.batch_size]], pad_id)

    bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not (cfg.progress and world.main))
    for step in bar:
        batches = [{k: v.to(world.device) for k, v in b.items()} for b in micro_batches(step)]
        tokens = world.all_sum(sum(_response_tokens(b) for b in batches))
        if tokens == 0:
            raise ValueError(
                f"step {step + 1} has no response tokens: is max_length ({cfg.max_length}) shorter than the prompts?"
            )
        step_loss = 0.0
        for a, batch in enumerate(batches):
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(a == len(batches) - 1)
            loss_sum = _loss_sum(model, batch)
            (loss_sum * (world.size / tokens)).backward()
            step_loss += loss_sum.item()
        if frozen is not None:
            frozen.mask_grads()
        loss = world.all_sum(step_loss) / tokens
        grad_norm = _clip(params, cfg.clip_grad, cfg.clip_mode)
        done = step + 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingError(
                f"step {done}: loss {loss:g}, gradient norm {grad_norm:g}: training diverged (a lower --lr?); "
                f"stopped before the update, nothing saved; the last good checkpoint is {last_checkpoint or 'none'}"
            )
        optimizer.step()
        if frozen is not None:
            frozen.restore()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if world.main and (done % cfg.log_every == 0 or done == total):
            log.info(
                "step %d/%d loss %.4f grad norm %.3g lr %.3g", done, total, loss, grad_norm, scheduler.get_last_lr()[0]
            )
        if cfg.save_every and done % cfg.save_every == 0 and done < total:
            last_checkpoint = output / "checkpoints" / f"step-{done:07d}"
            _save_checkpoint(
                model,
                optimizer,
                scheduler,
                cfg,
                world,
                done,
                done * cfg.grad_accum,
                losses,
                last_checkpoint,
            )
    adapter = save_lori(model, output / ADAPTER_DIR)
    world.barrier()
    return {"losses": losses, "adapter": str(adapter), "steps": total}
