"""Launch configurations shared by the Triton kernels."""

from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(options: list[dict], interpreter: dict) -> list[triton.Config]:
    """Autotuning candidates (meta-parameters plus ``num_warps`` and optionally
    ``num_stages``, default 3). The interpreter gets the one small ``interpreter`` config:
    it cannot benchmark and runs programs in Python."""
    chosen = [dict(interpreter, num_warps=1)] if interpreting() else options
    launch = ("num_warps", "num_stages")
    return [
        triton.Config(
            {k: v for k, v in o.items() if k not in launch}, num_warps=o["num_warps"], num_stages=o.get("num_stages", 3)
        )
        for o in chosen
    ]


def _no_benchmark(*args, **kwargs):
    raise RuntimeError("the Triton interpreter has one config per kernel: nothing to benchmark")


def autotune(configs: list[triton.Config], key: list[str]):
    """``triton.autotune`` over ``configs`` keyed on ``key``. Under the interpreter (one
    config, never timed) it sets up no benchmarker, which triton 3.3 would ask a GPU driver
    for."""
    return triton.autotune(configs=configs, key=key, do_bench=_no_benchmark if interpreting() else None)


def tile(n: int) -> int:
    """A tile side covering ``n`` (a rank or a block side): a power of two, at least 16
    (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in IEEE fp32 like torch's default matmul (not TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def processor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
