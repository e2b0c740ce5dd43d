"""Which implementation runs an op, and saying so.

``available_backends()`` lists the backends of ``lori_linear`` that can run here;
``resolve`` turns ``backend="auto"`` into the fastest of those for a device and logs the
choice (and why a faster one is off) once per op, device type and backend.
"""

from __future__ import annotations

import logging

import torch

from lori_kernels import _extension

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "available_backends", "resolve"]

# Every backend name the project knows, fastest first within a device type.
BACKENDS = ("cuda_ext", "triton", "cpu_ext", "reference")

# The backends that implement each op; the rest arrive with their kernels.
_IMPLEMENTED = {
    "lori_linear": ("reference",),
    "generate_a": ("cuda_ext", "cpu_ext", "reference"),
}
_DEVICE_TYPES = {"cuda_ext": ("cuda",), "cpu_ext": ("cpu",), "triton": ("cuda",)}
_announced: set[tuple[str, str, str]] = set()


def _runs(backend: str, op: str, device_type: str) -> bool:
    if backend not in _IMPLEMENTED[op]:
        return False
    if backend == "reference":
        return True
    if device_type not in _DEVICE_TYPES[backend]:
        return False
    return _extension.has_kernel(op, device_type)


def available_backends(op: str = "lori_linear") -> list[str]:
    """Backends of ``op`` that can run on this machine (CPU, and CUDA when a GPU is
    present), e.g. ``["cpu_ext", "reference"]``."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(_runs(b, op, d) for d in device_types)]


def resolve(backend: str, op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device``: ``backend`` itself if it can (else a
    clear error), or the fastest that can when ``backend == "auto"``."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")
        if backend not in _IMPLEMENTED[op]:
            raise NotImplementedError(
                f"backend {backend!r} does not implement {op} yet; it has "
                f"{list(_IMPLEMENTED[op])}"
            )
        if backend != "reference" and device.type not in _DEVICE_TYPES[backend]:
            raise ValueError(f"backend {backend!r} runs on {_DEVICE_TYPES[backend]}, not {device}")
        if backend != "reference":
            _extension.require(op, device.type)
        return backend
    chosen = next(b for b in BACKENDS if _runs(b, op, device.type))
    key = (op, device.type, chosen)
    if key not in _announced:
        _announced.add(key)
        why = "" if _extension.is_available() else f" ({_extension.load_error()})"
        log.info("%s on %s runs on the %r backend%s", op, device.type, chosen, why)
    return chosen
