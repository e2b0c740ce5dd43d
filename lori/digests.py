"""Checksums that bind what the library saves: a file's content, or one file's record of
another, so that a damaged or edited file is refused instead of loaded with a silently
different result."""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["json_digest", "safetensors_metadata", "tensors_digest"]


def json_digest(value) -> str:
    """SHA-256 of a JSON value in a canonical form (sorted keys, no spaces): the same for
    the value written and the value read back."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and bytes (for files whose format
    has no place for a checksum of their own, recorded in their metadata)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's bytes (already loaded without error)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
