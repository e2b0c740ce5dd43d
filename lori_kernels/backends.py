"""Which implementation runs an op, and saying so.

``available_backends()`` lists the backends of an op that can run on this machine;
``resolve`` turns ``backend="auto"`` into the fastest of those for a device and dtype
and logs the choice, with why each faster backend is off, once per case.

Triton runs on CUDA devices; with ``TRITON_INTERPRET=1`` it also runs CPU tensors in
its interpreter (for tests: it is slow), which ``"auto"`` never picks.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from lori_kernels import _extension

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "TRITON_BACKENDS",
    "available_backends",
    "resolve",
    "triton_dtype_problem",
    "unavailable_reason",
]

# Every backend name the project knows, fastest first (on a GPU, Triton's tensor-core
# kernels before the extension's CUDA-core ones). "triton_epilogue" is the Triton backend
# with Triton's own GEMMs, the adapter in their epilogues: lori_linear only, and never
# picked by "auto" until a GPU benchmark shows it beats "triton".
BACKENDS = ("triton", "triton_epilogue", "cuda_ext", "cpu_ext", "reference")
TRITON_BACKENDS = ("triton", "triton_epilogue")

# The ops with backends, and the compiled op whose kernel tells whether the extension
# covers it on a device.
_EXTENSION_OP = {"lori_linear": "shrink", "generate_a": "generate_a"}
_EXTENSION_DEVICE = {"cuda_ext": "cuda", "cpu_ext": "cpu"}
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_announced: set[tuple] = set()


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_dtype_problem(device_type: str, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot take ``dtype`` on ``device_type``; None if they can.
    The one place that says so: ``unavailable_reason`` and every Triton launcher ask it."""
    if dtype not in _TRITON_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, not {dtype}"
    # triton 3.8's interpreter multiplies the raw bf16 bit patterns in tl.dot (a 16 x 16 dot
    # is off by ~1e10). test_kernel_safety.py fails once Triton fixes it: then drop this.
    if dtype == torch.bfloat16 and device_type == "cpu" and _triton_interpreting():
        return (
            "bfloat16 under the Triton interpreter is not supported because its tl.dot multiplies raw bf16 bits; "
            "use float16/float32 on the CPU or a GPU"
        )
    return None


def unavailable_reason(backend: str, op: str, device_type: str, dtype: torch.dtype | None = None) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device_type`` (and ``dtype``); None if it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}"
    if backend == "reference":
        return None
    if backend in TRITON_BACKENDS:
        if backend == "triton_epilogue" and op != "lori_linear":
            return f"{op} has no 'triton_epilogue' backend; use 'triton'"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device_type != "cuda" and not (device_type == "cpu" and _triton_interpreting()):
            return f"Triton runs on CUDA devices (or on the CPU with TRITON_INTERPRET=1), not {device_type}"
        return None if dtype is None else triton_dtype_problem(device_type, dtype)
    if device_type != _EXTENSION_DEVICE[backend]:
        return f"backend {backend!r} runs on {_EXTENSION_DEVICE[backend]}, not {device_type}"
    error = _extension.load_error()
    if error is not None:
        return error
    if not _extension.has_kernel(_EXTENSION_OP[op], device_type):
        return f"lori_kernels._C was built without {device_type} kernels; rebuild with CUDA_HOME set"
    return None


def available_backends(op: str = "lori_linear") -> list[str]:
    """Backends of ``op`` that can run on this machine (CPU, and CUDA when a GPU is
    present), fastest first, e.g. ``["triton", "reference"]``."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(unavailable_reason(b, op, d) is None for d in device_types)]


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing
def resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` on ``device``: ``backend`` itself if it can (else an
    error that says why), or the fastest that can when ``backend == "auto"``."""
    if backend != "auto":
        reason = unavailable_reason(backend, op, device.type, dtype)
        if reason is None:
            return backend
        raise (ValueError if backend not in BACKENDS else RuntimeError)(reason)
    skipped = []
    for candidate in BACKENDS:
        reason = unavailable_reason(candidate, op, device.type, dtype)
        if reason is None and candidate in TRITON_BACKENDS and device.type == "cpu":
            reason = f"the Triton interpreter is for tests; ask for backend={candidate!r} explicitly"
        if reason is None:
            break
        if _EXTENSION_DEVICE.get(candidate, device.type) == device.type:
            skipped.append(f"{candidate}: {reason}")
    key = (op, device.type, dtype, candidate)
    if key not in _announced:
        _announced.add(key)
        why = f" (faster ones are off: {'; '.join(skipped)})" if skipped else ""
        log.info("%s on %s runs on the %r backend%s", op, device.type, candidate, why)
    return candidate
