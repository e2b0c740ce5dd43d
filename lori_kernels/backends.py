"""The backend table, and which backend runs an op.

A backend is one row of ``TABLE``: its name, the devices and dtypes it runs, the public ops
it serves and where its kernels are (a ``LayerKernels``, imported on first use by
``kernels``); ``fused.LAYERS`` registers the fused layer of every row. A new backend is one
row and a module holding its kernels. ``available_backends()`` lists the backends of an op
that can run here; ``resolve`` turns ``backend="auto"`` into the fastest of those for a device
and dtype and logs the choice, with why each faster backend is off, once per case (cached).
Triton runs on CUDA devices; with ``TRITON_INTERPRET=1`` also on CPU tensors, in its
interpreter (for tests: it is slow), which ``"auto"`` never picks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from lori_kernels import _extension
from lori_kernels.checks import COMPUTE_DTYPES

log = logging.getLogger(__name__)


class LayerKernels(NamedTuple):
    """The kernels of a backend. Tensors are contiguous; seeds are int64 (the uint64 seed in
    two's complement); B is ``b_values`` [nnz, bo, br] at sorted ``b_blocks``. Each has a
    ``*_ref`` twin in plain torch in ``lori_kernels.reference``."""

    shrink: Callable  # (x, seed, r, dist, dropout_p, dropout_seed) -> h = (x * D) @ A.T [M, r]
    shrink_backward: Callable  # (g, seed, d_in, dist, dropout_p, dropout_seed) -> (g @ A) * D [M, d_in]
    expand_: Callable  # (y, h, b_values, b_blocks, scaling): y += scaling * h @ B.T
    expand_backward: Callable  # (dy, b_values, b_blocks, r, scaling) -> g = scaling * dy @ B [M, r]
    sddmm: Callable  # (dy, h, b_blocks, bo, br, scaling) -> db_values = scaling * dy.T @ h [nnz, bo, br]
    generate_a: Callable  # (seed, d_in, row0, rows, col0, cols, *, dist, device) -> float32 A tile
    # The segmented expand of mixed-adapter batches (lori_linear_multi):
    # (y, h, rows, seg_ptr, longest, b_values, b_blocks, row_ptr, scaling): y[rows[i]] += scaling[s] * h[i] @ B_s.T
    expand_segments_: Callable
    # Optional GEMMs with the adapter in the epilogue (None: torch's GEMMs, with expand_ after
    # the forward one and shrink_backward's output as the backward one's accumulator).
    linear_expand: Callable | None = None  # (x, weight, bias, h, b_values, b_blocks, scaling) -> y
    linear_shrink_backward: Callable | None = None  # (dy, weight, g, seed, dist, dropout_p, dropout_seed) -> dx
    # Optional forward GEMM that computes h from the x tiles it reads (None: shrink, then the GEMM):
    # (x, weight, bias, seed, r, dist, dropout_p, dropout_seed) -> (y = x @ W.T + b, h = (x * D) @ A.T)
    linear_shrink: Callable | None = None
    # The device types where shrink is generate_a, then torch's matmul of x with A.T (None: every
    # device), so that a kept A gives its h bit for bit (lori_linear_multi keeps one per pack).
    matmul_shrink_on: tuple[str, ...] | None = ()


OPS = ("lori_linear", "generate_a", "delta_weight", "lori_linear_multi")  # the public ops a backend may serve


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: a row of ``TABLE``."""

    name: str
    kernels: str  # "module:attribute" of its LayerKernels, imported on first use
    device_types: tuple[str, ...] | None  # None: every device torch runs on
    dtypes: tuple[torch.dtype, ...]  # of lori_linear's x
    runtime: str = "torch"  # what it needs besides torch: "triton", or "extension" (lori_kernels._C)
    ops: tuple[str, ...] = OPS
    checks_b_blocks: bool = False  # lori_linear reads b_blocks (range, order) on every eager call


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Fastest first (on a GPU, Triton's tensor-core kernels before the extension's CUDA-core ones).
# "triton_epilogue" is the Triton backend with Triton's own GEMMs, the adapter in their
# epilogues; "auto" never picks it ("triton" comes first) until a GPU benchmark shows it beats
# "triton".
TABLE = (
    Backend("triton", "lori_kernels.triton_kernels:KERNELS", ("cuda",), _TRITON_DTYPES, runtime="triton"),
    Backend(
        "triton_epilogue",
        "lori_kernels.triton_kernels:EPILOGUE_KERNELS",
        ("cuda",),
        _TRITON_DTYPES,
        runtime="triton",
        ops=("lori_linear", "delta_weight"),
    ),
    Backend("cuda_ext", "lori_kernels._extension_ops:KERNELS", ("cuda",), COMPUTE_DTYPES, runtime="extension"),
    Backend("cpu_ext", "lori_kernels._extension_ops:KERNELS", ("cpu",), COMPUTE_DTYPES, runtime="extension"),
    Backend("reference", "lori_kernels.reference:KERNELS", None, COMPUTE_DTYPES, checks_b_blocks=True),
)
BACKENDS = tuple(row.name for row in TABLE)
TRITON_BACKENDS = tuple(row.name for row in TABLE if row.runtime == "triton")
_ROWS = {row.name: row for row in TABLE}


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_dtype_problem(device_type: str, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot take ``dtype`` on ``device_type``; None if they can.
    The one place that says so: ``unavailable_reason`` and every Triton launcher ask it."""
    if dtype not in _TRITON_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, not {dtype}"
    # Under the interpreter, a dtype whose 16 x 16 tl.dot comes out wrong (triton 3.8: bfloat16,
    # whose raw bit patterns it multiplies) is refused; the probe runs once per process.
    if device_type == "cpu" and _triton_interpreting():
        from lori_kernels.triton_kernels.gemm import interpreter_dot_is_right

        if not interpreter_dot_is_right(dtype):
            import triton

            name = str(dtype).removeprefix("torch.")
            return (
                f"{name} under the Triton interpreter is not supported because its tl.dot gets a 16 x 16 {name} "
                f"product wrong (triton {triton.__version__}); use float32 on the CPU or a GPU"
            )
    return None


def unavailable_reason(backend: str, op: str, device_type: str, dtype: torch.dtype | None = None) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device_type`` (and ``dtype``); None if it can."""
    row = _ROWS.get(backend)
    if row is None:
        return f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}"
    if op not in row.ops:
        serving = [repr(r.name) for r in TABLE if op in r.ops]
        return f"{op} has no {backend!r} backend; use {', '.join(serving[:-1])} or {serving[-1]}"
    if row.runtime == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if device_type not in row.device_types and not (device_type == "cpu" and _triton_interpreting()):
            return f"Triton runs on CUDA devices (or on the CPU with TRITON_INTERPRET=1), not {device_type}"
        return None if dtype is None else triton_dtype_problem(device_type, dtype)
    if row.device_types is not None and device_type not in row.device_types:
        return f"backend {backend!r} runs on {' or '.join(row.device_types)}, not {device_type}"
    if dtype is not None and dtype not in row.dtypes:
        return f"backend {backend!r} takes {', '.join(map(str, row.dtypes))}, not {dtype}"
    if row.runtime == "extension":
        if (error := _extension.load_error()) is not None:
            return error
        if not _extension.has_kernel("shrink", device_type):
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
    error that says why), or the fastest that can when ``backend == "auto"``. Cached per
    case; ``resolve.cache_clear()`` forgets the answers (and announces again)."""
    # Whether Triton interprets and whether the extension loaded decide availability too, and
    # a process (a test) may change them: they are part of the case.
    return _resolve(backend, op, device.type, dtype, _triton_interpreting(), _extension.load_error())


@functools.cache
def _resolve(backend: str, op: str, device_type: str, dtype: torch.dtype | None, *_state) -> str:
    if backend != "auto":
        reason = unavailable_reason(backend, op, device_type, dtype)
        if reason is None:
            return backend
        raise (ValueError if backend not in BACKENDS else RuntimeError)(reason)
    skipped = []
    for row in TABLE:
        reason = unavailable_reason(row.name, op, device_type, dtype)
        if reason is None and row.runtime == "triton" and device_type == "cpu":
            reason = f"the Triton interpreter is for tests; ask for backend={row.name!r} explicitly"
        if reason is None:
            break
        if row.device_types is None or device_type in row.device_types or row.runtime == "triton":
            skipped.append(f"{row.name}: {reason}")
    why = f" (faster ones are off: {'; '.join(skipped)})" if skipped else ""
    log.info("%s on %s runs on the %r backend%s", op, device_type, row.name, why)
    return row.name


resolve.cache_clear = _resolve.cache_clear


@functools.cache
def kernels(name: str) -> LayerKernels:
    """The kernels of backend ``name``, imported on first use: what its fused layer,
    ``generate_a`` and ``delta_weight`` run, and what benchmarks and kernel tests call."""
    row = _ROWS.get(name)
    if row is None:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if row.runtime == "extension" and (error := _extension.load_error()) is not None:
        raise RuntimeError(error)
    module, attribute = row.kernels.split(":")
    return getattr(importlib.import_module(module), attribute)
