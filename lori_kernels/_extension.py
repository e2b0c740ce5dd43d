"""Guarded loader of the compiled extension ``lori_kernels._C``.

Importing ``_C`` registers the ``torch.ops.lori.*`` kernels (CPU, and CUDA when it was
built with CUDA). Nothing is loaded at import of ``lori_kernels``: the first caller that
asks pays for it, and a missing build yields one sentence on how to build it.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

BUILD_HINT = (
    "lori_kernels._C is not built: install with `pip install --no-build-isolation -e .` "
    "(set CUDA_HOME for the CUDA kernels; LORI_BUILD_EXT=0 skips the build) or run `make test`."
)


@functools.cache
def load_error() -> str | None:
    """None once the extension is loaded; otherwise why it could not be."""
    try:
        from lori_kernels import _C  # noqa: F401  (import registers the ops)
    except (ImportError, OSError) as e:
        log.info("lori_kernels._C unavailable (%s); compiled backends are off", e)
        return f"{BUILD_HINT} ({type(e).__name__}: {e})"
    from lori_kernels import _extension_ops  # noqa: F401  (fake implementations of the ops)

    return None


def is_available() -> bool:
    return load_error() is None


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.lori.<op>`` has a kernel registered for ``device_type``."""
    if not is_available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"lori::{op}", key)
