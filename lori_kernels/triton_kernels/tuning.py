"""Launch configurations shared by the Triton kernels, and the dtype check every launcher runs."""

from __future__ import annotations

import functools
import os

import torch
import triton

from lori_kernels import backends


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(options: list[dict], interpreter: dict) -> list[triton.Config]:
    """Autotuning candidates (meta-parameters plus ``num_warps`` and optionally
    ``num_stages``, default 3). The interpreter gets the one small ``interpreter`` config:
    it cannot benchmark and runs programs in Python. ``LORI_TRITON_AUTOTUNE=0`` keeps only
    the first option (no tuning: each new shape compiles once, for tests on a GPU)."""
    if interpreting():
        chosen = [dict(interpreter, num_warps=1)]
    else:
        chosen = options[:1] if os.environ.get("LORI_TRITON_AUTOTUNE", "1") == "0" else options
    launch = ("num_warps", "num_stages")
    return [
        triton.Config(
            {k: v for k, v in o.items() if k not in launch}, num_warps=o["num_warps"], num_stages=o.get("num_stages", 3)
        )
        for o in chosen
    ]


def _run_once(kernel_call, quantiles):
    """The interpreter's benchmarker: runs the kernel once, as timing it would, and times
    nothing (triton 3.3's default would ask a GPU driver for one)."""
    kernel_call()
    return [1.0] * len(quantiles)


def autotune(configs: list[triton.Config], key: list[str], restore_value: list[str] | None = None):
    """``triton.autotune`` over ``configs`` keyed on ``key``. ``restore_value``: the
    arguments a kernel adds into in place, restored after every config tried (else each
    trial run would add into them again)."""
    return triton.autotune(
        configs=configs, key=key, restore_value=restore_value, do_bench=_run_once if interpreting() else None
    )


def autotune_by_case(
    kernel,
    cases: dict[tuple[str, bool], list[dict]],
    key: list[str],
    operand: str,
    interpreter: dict,
    restore_value: list[str] | None = None,
):
    """``kernel`` autotuned over the options of every case, trying at a launch only those of
    its case (Triton's early pruning): ``cases`` maps (kind of ``operand``'s dtype,
    ``"tensor_cores"`` for bfloat16/float16 or ``"float32"``; whether the launch's ``DROPOUT``
    is on) to its options, as ``configs`` takes them, led by the one ``LORI_TRITON_AUTOTUNE=0``
    keeps. ``operand`` is passed by position. Tiles are chosen per case because their
    register need differs: what fits in bfloat16 spills in float32 or beside a dropout mask
    (``make compile-check``)."""
    per_case = {case: configs(options, interpreter) for case, options in cases.items()}
    tuner = autotune([c for candidates in per_case.values() for c in candidates], key, restore_value)(kernel)

    def of_case(candidates, named_args, **kwargs):
        kind = "float32" if named_args[operand].dtype == torch.float32 else "tensor_cores"
        wanted = per_case[kind, bool(kwargs.get("DROPOUT", False))]
        return [c for c in candidates if any(c is w for w in wanted)]

    tuner.early_config_prune = of_case
    return tuner


def check_dtype(op: str, t: torch.Tensor) -> None:
    """Raises where the Triton kernels cannot take ``t``'s dtype on its device
    (``backends.triton_dtype_problem``): a kernel called directly refuses as
    ``lori_linear`` does, rather than compute garbage."""
    problem = backends.triton_dtype_problem(t.device.type, t.dtype)
    if problem is not None:
        raise RuntimeError(f"{op}: {problem}")


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
