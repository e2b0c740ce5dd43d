"""The processes of a run: rank, size and device (starting the process group under
torchrun), FSDP2 sharding of a model, and loading the base model."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["World", "build_on_meta", "decoder_layers", "device_mesh", "load_model", "shard"]


class World:
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


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: those the model names as not to be split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard (no _no_split_modules)")
    return layers


def device_mesh(world: World, mesh: tuple[int, int] | None):
    """FSDP's device mesh: one dimension over every process, or with ``mesh = (replicate,
    shard)`` the 2-D mesh of HSDP (parameters sharded within a group of ``shard``
    processes, replicated across the ``replicate`` groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    if mesh is None:
        return init_device_mesh(world.device.type, (world.size,))
    replicate, shard = mesh
    if replicate * shard != world.size:
        raise ValueError(f"--mesh {replicate}x{shard} needs {replicate * shard} processes, this run has {world.size}")
    return init_device_mesh(world.device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))


def shard(model: torch.nn.Module, mesh, bf16: bool) -> None:
    """``fully_shard`` each decoder layer, then the root, over ``mesh`` (2-D: HSDP)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _dtype_argument(dtype: torch.dtype) -> dict:
    """transformers 5 calls the argument ``dtype``, 4.x ``torch_dtype``."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def load_model(path: str, dtype: torch.dtype):
    """The causal LM at ``path`` (``from_pretrained``) in ``dtype``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **_dtype_argument(dtype))


def build_on_meta(path: str, dtype: torch.dtype):
    """The causal LM of ``path``'s config.json on the ``meta`` device: its structure, no
    weights read, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **_dtype_argument(dtype))
