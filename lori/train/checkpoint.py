"""A run's directory: ``adapter/`` at the end, ``checkpoints/step-N/`` on the way (the
adapter, ``optimizer.safetensors`` and ``trainer_state.json``, bound by checksums), and the
checks that keep a run from spoiling an earlier one."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from lori.checkpoint import (
    ADAPTER_FILES,
    BINDING_KEY,
    CONFIG_FILE,
    AdapterSnapshot,
    check_binding,
    load_lori,
    read_tensors,
)
from lori.digests import json_digest, safetensors_metadata
from lori.errors import CheckpointError, OutputError
from lori.files import check_output_dir, read_json, recover, remove_written, write_directory
from lori.model import set_dropout_calls
from lori.train.config import TrainConfig, changed_resume_fields, resume_fields

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_FILES",
    "check_output",
    "checkpoints",
    "load_checkpoint",
    "read_checkpoint",
    "remove_checkpoint",
    "save_checkpoint",
]

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


CHECKPOINT_FILES = (*ADAPTER_FILES, OPTIMIZER_FILE, STATE_FILE)
ADAPTER_DIR = "adapter"


def checkpoints(output: Path) -> list[Path]:
    """The run's checkpoints, oldest first (a checkpoint whose write a crash interrupted
    after its commit is completed first; one interrupted before is not listed)."""
    root = output / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        recover(p)
        if p.name[5:].isdigit() and (p / STATE_FILE).is_file():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_output(cfg: TrainConfig, output: Path) -> list[Path]:
    """Refuse, before anything is loaded, an output directory the run would spoil: one
    holding an earlier run (unless resuming or overwriting it), or files of others where
    the run writes (``adapter/``, ``checkpoints/step-*``). Returns the checkpoints found."""
    check_output_dir(output, lambda name: True, what="run directory")
    found = checkpoints(output)
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


def save_checkpoint(model, optimizer, scheduler, cfg, world, step, micro_steps, losses, path: Path) -> None:
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
            "config": resume_fields(cfg),
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
        for old in checkpoints(path.parent.parent)[: -cfg.keep_checkpoints]:
            remove_checkpoint(old)
        log.info("checkpoint at step %d -> %s", step, path)
    world.barrier()


def remove_checkpoint(path: Path) -> None:
    if not remove_written(path, CHECKPOINT_FILES):
        log.warning("kept %s: it holds files the run did not write", path)


_ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # as torch.optim.AdamW creates it
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
    data, tensors = read_tensors(optimizer_file, state["optimizer_sha256"], state_file, "training checkpoint")
    unknown = sorted(k for k in tensors if "/" not in k or k.rsplit("/", 1)[1] not in _ADAMW_STATE)
    if unknown:
        raise CheckpointError(f"{optimizer_file} holds {unknown[:3]}, which are not AdamW state")
    if BINDING_KEY not in safetensors_metadata(data):
        raise CheckpointError(f"{optimizer_file} does not record {STATE_FILE}'s digest")
    check_binding(data, {k: v for k, v in state.items() if k != "optimizer_sha256"}, optimizer_file, state_file)
    if read_json(path / CONFIG_FILE, "LoRI adapter").get("adapter_sha256") != state["adapter_sha256"]:
        raise CheckpointError(f"{path}: the adapter files are not the ones {STATE_FILE} was saved with")
    return state, tensors


def load_checkpoint(model, optimizer, scheduler, cfg, world, path: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state, tensors = read_checkpoint(path)
    if state["world_size"] != world.size:
        raise ValueError(
            f"{path} was written by a run of {state['world_size']} processes; resume it with {state['world_size']} "
            f"(not {world.size}): the global batch and the dropout masks depend on it"
        )
    changed = changed_resume_fields(state["config"], cfg)
    if changed:
        raise ValueError(f"cannot resume from {path}: the run's settings changed ({changed})")
    load_lori(model, path)
    osd_state: dict[str, dict[str, torch.Tensor]] = {}
    # In AdamW's own order: set_optimizer_state_dict(full_state_dict=True) pairs a state's
    # values by position on ranks other than 0 (in the file's order, sorted by name, rank 1
    # got exp_avg and exp_avg_sq swapped and diverged on the first resumed step).
    for key in sorted(tensors, key=lambda k: (k.rsplit("/", 1)[0], _ADAMW_STATE.index(k.rsplit("/", 1)[1]))):
        fqn, name = key.rsplit("/", 1)
        osd_state.setdefault(fqn, {})[name] = tensors[key].reshape(()) if name == "step" else tensors[key]
    osd = {"state": osd_state, "param_groups": state["param_groups"]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    set_dropout_calls(model, state["micro_steps"])
    log.info("resumed from %s at step %d", path, state["step"])
    return state
