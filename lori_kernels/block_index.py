"""Indexes of ``b_blocks`` that the kernels walk, built once per ``b_blocks`` and cached.

- ``block_index``: the CSR view (``row_ptr``: the kept blocks of each block row) and the CSC
  view (``col_ptr``, ``col_order``: those of each block column) of sorted ``b_blocks``; the
  Triton kernels and the extension's ``lori::expand_`` / ``lori::expand_backward`` take it.
- ``block_slots``: the dense map block -> index in ``b_values`` (``-1`` where dropped), for
  the Triton GEMM that visits every block of a tile.

Everything is int32 and built on ``b_blocks``' device without a host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["BlockIndex", "block_index", "block_slots"]


class BlockIndex(NamedTuple):
    """Where the kept blocks of each block row and block column are."""

    row_ptr: torch.Tensor  # int32 [n_rows + 1]: blocks row_ptr[i]:row_ptr[i+1] are in row i
    col_ptr: torch.Tensor  # int32 [n_cols + 1]: col_order[col_ptr[j]:col_ptr[j+1]] in column j
    col_order: torch.Tensor  # int32 [nnz]


# Indexes built from a b_blocks tensor, kept while it lives and is not written in place (its
# version counter). A layer's b_blocks is a fixed buffer, and building an index takes 7 to 15
# small device ops (each a few microseconds of a GPU) on every forward and backward otherwise.
# A write through ``.data`` bypasses the version counter; nothing writes b_blocks that way.
_BUILT = WeakIdKeyDictionary()


def _cached(build: Callable, b_blocks: torch.Tensor, n_rows: int, n_cols: int):
    if b_blocks.is_inference():  # no version counter to trust
        return build(b_blocks, n_rows, n_cols)
    key = (build.__name__, n_rows, n_cols, b_blocks._version)
    built = _BUILT.get(b_blocks)
    if built is None or any(k[-1] != key[-1] for k in built):
        built = _BUILT[b_blocks] = {}
    if key not in built:
        built[key] = build(b_blocks, n_rows, n_cols)
    return built[key]


def _build_block_index(b_blocks: torch.Tensor, n_rows: int, n_cols: int) -> BlockIndex:
    rows, cols = b_blocks[:, 0].long().contiguous(), b_blocks[:, 1].long()
    col_order = torch.argsort(cols * n_rows + rows)
    row_ptr = torch.searchsorted(rows, torch.arange(n_rows + 1, device=rows.device))
    col_ptr = torch.searchsorted(cols[col_order].contiguous(), torch.arange(n_cols + 1, device=rows.device))
    return BlockIndex(row_ptr.int(), col_ptr.int(), col_order.int())


def _build_block_slots(b_blocks: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    slots = torch.full((n_rows, n_cols), -1, dtype=torch.int32, device=b_blocks.device)
    index = torch.arange(b_blocks.shape[0], dtype=torch.int32, device=b_blocks.device)
    slots[b_blocks[:, 0].long(), b_blocks[:, 1].long()] = index
    return slots


def block_index(b_blocks: torch.Tensor, n_rows: int, n_cols: int) -> BlockIndex:
    """The CSR/CSC view of sorted ``b_blocks`` of a B with ``n_rows`` x ``n_cols`` blocks
    (``searchsorted``, not ``bincount``, whose output size needs a sync); cached."""
    return _cached(_build_block_index, b_blocks, n_rows, n_cols)


def block_slots(b_blocks: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """int32 ``[n_rows, n_cols]``: the index in ``b_values`` of each kept block, -1 where
    the block is dropped (a dense map for kernels that visit every block of a tile); cached."""
    return _cached(_build_block_slots, b_blocks, n_rows, n_cols)
