"""Many adapters of one layer in one batch (inference): each row of ``x`` runs its own adapter.

LoRI adapters trained over one seed share A, so rows are grouped by ``(seed, r, dist)`` (a
*shrink group*) and each group runs one shrink, ``h = x_g @ A.T``, however many adapters it
serves; within a group the rows are sorted by adapter into segments (Punica's SGMV layout:
``seg_ptr[s]:seg_ptr[s+1]`` are the rows of segment ``s``), and one segmented block-sparse
expand adds ``scaling_s * h @ B_s.T`` into each segment's rows of ``y``:

    y = x @ W.T + b                                   every row (torch matmul)
    for each shrink group g:   h_g = x[rows_g] @ A_g.T            one shrink
        for each block shape:  y[rows_g[i]] += s_a * h_g[i] @ B_a.T   one segmented expand

- ``AdapterSpec``: one adapter of the layer (seed or stored A, compact B, r, block, scaling);
- ``pack_adapters``: adapters grouped, their B concatenated per expand (``PackedAdapters``),
  once for many calls;
- ``RowPlan`` (``PackedAdapters.plan``): which rows each group and segment holds, computed on
  the host from the rows' adapter indices (checked when the plan is made) and cached per batch
  layout;
- ``forward``: the composition over one backend's kernels (its ``shrink`` and
  ``expand_segments_``). Where the backend's shrink multiplies by a generated A with torch's
  matmul (its kernel set's ``matmul_shrink_on``: the reference's, the extension's on the CPU),
  the pack keeps each group's A (``PackedAdapters.a``) and the shrink is that matmul alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch

from lori_kernels import checks, reference, rng
from lori_kernels.backends import LayerKernels
from lori_kernels.block_index import block_index
from lori_kernels.block_sparse import block_grid, check_b_blocks, check_b_layout, check_block

__all__ = ["AdapterSpec", "PackedAdapters", "RowPlan", "Span", "forward", "pack_adapters"]


class AdapterSpec(NamedTuple):
    """One LoRI adapter of a layer ``[out, in]``: A from ``seed`` (or a stored ``a`` [r, in],
    ``seed`` then None), B as ``b_values`` [nnz, bo, br] at sorted ``b_blocks`` int32
    [nnz, 2] (as in ``lori_linear``), ``y += scaling * (x @ A.T) @ B.T``."""

    seed: int | None
    b_values: torch.Tensor
    b_blocks: torch.Tensor
    r: int
    block: tuple[int, int]
    scaling: float
    dist: str = "uniform"
    a: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class ExpandSet:
    """The adapters of a shrink group that share a block shape: their B concatenated
    (``b_values`` [sum nnz, bo, br], ``b_blocks``) and, per adapter (segment) ``s``,
    ``row_ptr[s]`` (int32 [n_block_rows + 1], the CSR view of its blocks as offsets into the
    concatenation) and ``scaling[s]`` (float32), for a segmented expand kernel."""

    adapters: tuple[int, ...]  # indices into the packed adapters, in segment order
    block: tuple[int, int]
    b_values: torch.Tensor
    b_blocks: torch.Tensor
    row_ptr: torch.Tensor
    scaling: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ShrinkGroup:
    """Adapters sharing one A (same seed, r and dist; or one stored A): one shrink serves them."""

    seed: int  # int64; 0 with a stored A
    r: int
    dist: str
    a: torch.Tensor | None
    sets: tuple[ExpandSet, ...]


class Span(NamedTuple):
    """An expand set's rows within its shrink group's: ``start:end``, cut into one segment per
    adapter by ``seg_ptr`` (int32 [S + 1] on the device, relative to ``start``); ``longest``:
    the largest segment's row count (a launch grid)."""

    start: int
    end: int
    seg_ptr: torch.Tensor
    longest: int


class RowPlan(NamedTuple):
    """Where the rows of one batch layout go: per shrink group, the rows of the flattened
    ``x`` it reads (int64, sorted by expand set then adapter) and the ``Span`` of each of its
    expand sets."""

    groups: tuple[tuple[torch.Tensor, tuple[Span, ...]], ...]


class PackedAdapters:
    """Adapters of a layer with ``out_features`` outputs, grouped for ``lori_linear_multi``
    (``pack_adapters``). Holds the adapters' B concatenated per expand set (a copy, except for
    a set of one adapter), the row plans of the batch layouts it has served and, once a shrink
    has used it, each seed group's A (``a``)."""

    def __init__(self, adapters: tuple[AdapterSpec, ...], out_features: int, groups: tuple[ShrinkGroup, ...]):
        self.adapters, self.out_features, self.groups = adapters, out_features, groups
        self.device = adapters[0].b_values.device
        self.requires_grad = any(spec.b_values.requires_grad for spec in adapters)  # lori_linear_multi refuses
        self.stored_a = tuple(k for k, spec in enumerate(adapters) if spec.a is not None)  # their shape is checked
        self._plans: dict[tuple, tuple[tuple[int, ...], RowPlan]] = {}  # layout -> (its checked rows, plan)
        self._a: dict[tuple, torch.Tensor] = {}  # (group, in_features, dtype) -> its A

    def __len__(self) -> int:
        return len(self.adapters)

    def plan(self, row_adapters: tuple[int, ...], tokens_per_row: int) -> RowPlan:
        """The ``RowPlan`` of a batch whose row ``i`` (``tokens_per_row`` rows of the flattened
        ``x``) runs adapter ``row_adapters[i]`` (-1: none); computed on the host, cached.
        ``row_adapters`` is checked unless it is the very tuple that made the cached plan (an
        equal one may hold other values: ``1.0 == 1``); a refused one makes no plan."""
        key = (row_adapters, tokens_per_row)
        made = self._plans.get(key)
        if made is None or made[0] is not row_adapters:
            checks.check_row_adapters(row_adapters, len(self.adapters))
        if made is None:
            made = self._plans[key] = (row_adapters, self._make_plan(row_adapters, tokens_per_row))
        return made[1]

    def a(self, g: int, in_features: int, dtype: torch.dtype, generate_a) -> torch.Tensor:
        """Seed group ``g``'s A ``[r, in_features]`` in ``dtype`` on the pack's device: made by
        ``generate_a`` (a kernel set's, bit-identical on every backend) on first use, then kept.
        It cannot go stale: it follows from the group's seed, r and dist alone, fixed at packing.
        One A per group and input width and dtype run (a layer runs one): r x in elements each,
        16 KiB at r = 16 and in = 256 in float32, 128 KiB at in = 4096 in bfloat16."""
        key = (g, in_features, dtype)
        a = self._a.get(key)
        if a is None:
            group = self.groups[g]
            tile = generate_a(group.seed, in_features, 0, group.r, 0, in_features, dist=group.dist, device=self.device)
            a = self._a[key] = tile.to(dtype)
        return a

    def _make_plan(self, row_adapters: tuple[int, ...], tokens_per_row: int) -> RowPlan:
        batch_rows = [[] for _ in self.adapters]
        for i, a in enumerate(row_adapters):
            if a >= 0:
                batch_rows[a].append(i)
        tokens = torch.arange(tokens_per_row)
        groups = []
        for group in self.groups:
            rows, spans = [], []
            for s in group.sets:
                counts = [len(batch_rows[a]) * tokens_per_row for a in s.adapters]
                seg_ptr = torch.tensor([0, *counts], dtype=torch.int32).cumsum(0, dtype=torch.int32)
                start = len(rows)
                rows.extend(i for a in s.adapters for i in batch_rows[a])
                end = len(rows) * tokens_per_row
                spans.append(Span(start * tokens_per_row, end, seg_ptr.to(self.device), max(counts)))
            token_rows = (torch.tensor(rows, dtype=torch.int64)[:, None] * tokens_per_row + tokens).reshape(-1)
            groups.append((token_rows.to(self.device), tuple(spans)))
        return RowPlan(tuple(groups))


def pack_adapters(adapters: Sequence[AdapterSpec], out_features: int) -> PackedAdapters:
    """Check ``adapters`` (all on one device, ``b_values`` in one dtype; ``b_blocks`` are read
    once here: in range, sorted, unique) and group them for ``lori_linear_multi``: one shrink
    per ``(seed, r, dist)`` (or stored A), one segmented expand per block shape in it. Pack once
    and reuse for the calls of many batches: concatenating B costs a copy."""
    if not isinstance(adapters, (list, tuple)) or isinstance(adapters, AdapterSpec) or not adapters:
        raise TypeError("adapters must be a non-empty list of lori_kernels.AdapterSpec")
    adapters = tuple(adapters)
    first = adapters[0].b_values
    keys: dict[tuple, dict[tuple[int, int], list[int]]] = {}
    for k, spec in enumerate(adapters):
        if not isinstance(spec, AdapterSpec):
            raise TypeError(f"adapters[{k}] must be a lori_kernels.AdapterSpec, got {type(spec).__name__}")
        block = check_block(spec.block, spec.r)
        check_b_layout(spec.b_values, spec.b_blocks, block)
        if spec.b_values.dtype != first.dtype or spec.b_values.device != first.device:
            raise ValueError(
                f"adapters[{k}].b_values is {spec.b_values.dtype} on {spec.b_values.device}, adapters[0]'s "
                f"{first.dtype} on {first.device}; pack adapters of one dtype and device"
            )
        if spec.dist not in rng.DISTRIBUTIONS:
            raise ValueError(f"adapters[{k}].dist must be one of {rng.DISTRIBUTIONS}, got {spec.dist!r}")
        if (spec.seed is None) == (spec.a is None):
            raise ValueError(f"adapters[{k}] needs a seed or a stored A (a=...), exactly one")
        if spec.a is not None and (spec.a.dtype != first.dtype or spec.a.device != first.device):
            raise ValueError(f"adapters[{k}].a must be {first.dtype} on {first.device}, as b_values")
        check_b_blocks(spec.b_blocks, out_features, spec.r, block)
        shared = (rng.to_int64(spec.seed), spec.r, spec.dist) if spec.a is None else ("a", id(spec.a))
        keys.setdefault(shared, {}).setdefault(block, []).append(k)
    groups = []
    for members in keys.values():
        spec = adapters[next(iter(members.values()))[0]]
        sets = tuple(_expand_set(adapters, tuple(ks), block, out_features) for block, ks in members.items())
        seed = rng.to_int64(spec.seed) if spec.a is None else 0
        groups.append(ShrinkGroup(seed, spec.r, spec.dist, spec.a, sets))
    return PackedAdapters(adapters, out_features, tuple(groups))


def _expand_set(adapters, members: tuple[int, ...], block, out_features: int) -> ExpandSet:
    n_rows, n_cols = block_grid(out_features, adapters[members[0]].r, block)
    parts = [adapters[k] for k in members]
    row_ptrs, offset = [], 0
    for spec in parts:
        row_ptrs.append(block_index(spec.b_blocks, n_rows, n_cols).row_ptr + offset)
        offset += spec.b_blocks.shape[0]
    one = len(parts) == 1
    return ExpandSet(
        adapters=members,
        block=block,
        b_values=parts[0].b_values.contiguous() if one else torch.cat([p.b_values for p in parts]),
        b_blocks=parts[0].b_blocks.contiguous() if one else torch.cat([p.b_blocks for p in parts]),
        row_ptr=torch.stack(row_ptrs).contiguous(),
        scaling=torch.tensor([float(p.scaling) for p in parts], dtype=torch.float32, device=parts[0].b_values.device),
    )


def forward(
    kernels: LayerKernels,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    packed: PackedAdapters,
    plan: RowPlan,
) -> torch.Tensor:
    """``y`` [M, out_features] of a 2-D contiguous ``x`` [M, in]: the base for every row (none
    without a ``weight``), each row's adapter (``plan``) added over ``kernels``."""
    y = x.new_zeros(x.shape[0], out_features) if weight is None else torch.nn.functional.linear(x, weight, bias)
    on = kernels.matmul_shrink_on
    keep_a = on is None or x.device.type in on
    for g, (group, (rows, spans)) in enumerate(zip(packed.groups, plan.groups, strict=True)):
        if rows.numel() == 0:
            continue
        x_g = x.index_select(0, rows)
        if group.a is not None:
            h = reference.shrink_a_ref(x_g, group.a, 0.0, 0)
        elif keep_a:
            h = reference.shrink_a_ref(x_g, packed.a(g, x.shape[1], x.dtype, kernels.generate_a), 0.0, 0)
        else:
            h = kernels.shrink(x_g, group.seed, group.r, group.dist, 0.0, 0)
        for s, span in zip(group.sets, spans, strict=True):
            if span.end == span.start:
                continue
            part = slice(span.start, span.end)
            h_s, rows_s = (h, rows) if len(spans) == 1 else (h[part], rows[part])  # one set: the group's rows
            kernels.expand_segments_(
                y, h_s, rows_s, span.seg_ptr, span.longest, s.b_values, s.b_blocks, s.row_ptr, s.scaling
            )
    return y
