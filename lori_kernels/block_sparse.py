"""The compact block-sparse B of a LoRI layer.

B ``[out, r]`` is cut into blocks of ``bo x br`` (``br`` divides ``r``; when ``out`` is not
a multiple of ``bo`` the last row of blocks is partial). Only the kept blocks exist:

- ``b_values`` ``[nnz, bo, br]``: their values (the padded rows of a partial block are
  ignored in forward and get zero gradient),
- ``b_blocks`` int32 ``[nnz, 2]``: their (block row, block column), sorted and unique.

Block ``(1, 1)`` is an element mask, so original (element-wise) LoRI masks need no other
type. Every function here checks what it is given and names what is wrong.
"""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "check_block",
    "block_grid",
    "check_b_layout",
    "check_b_blocks",
    "dense_blocks",
    "blocks_from_mask",
    "blocks_covering",
    "mask_from_blocks",
    "gather_blocks",
    "scatter_blocks",
    "from_dense",
    "to_dense",
]


def check_block(block, r: int) -> tuple[int, int]:
    """``block`` as a tuple ``(bo, br)`` of positive ints with ``br`` dividing ``r``."""
    if not _is_int(r) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if not isinstance(block, (tuple, list)) or len(block) != 2 or not all(map(_is_int, block)):
        raise ValueError(f"block must be a pair (bo, br) of ints, got {block!r}")
    bo, br = int(block[0]), int(block[1])
    if bo <= 0 or br <= 0:
        raise ValueError(f"block sizes must be positive, got {block!r}")
    if r % br:
        raise ValueError(f"block column size br={br} must divide r={r}")
    return bo, br


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def block_grid(out_features: int, r: int, block) -> tuple[int, int]:
    """Number of (block rows, block columns) of B ``[out_features, r]``."""
    bo, br = check_block(block, r)
    if out_features <= 0:
        raise ValueError(f"out_features must be positive, got {out_features}")
    return -(-out_features // bo), r // br


def check_b_layout(b_values: torch.Tensor, b_blocks: torch.Tensor, block) -> None:
    """Check the metadata of a compact B (shapes, dtypes, devices); reads no values."""
    bo, br = block
    if not isinstance(b_blocks, torch.Tensor) or b_blocks.dtype != torch.int32:
        got = b_blocks.dtype if isinstance(b_blocks, torch.Tensor) else type(b_blocks).__name__
        raise TypeError(f"b_blocks must be an int32 tensor, got {got}")
    if b_blocks.dim() != 2 or b_blocks.shape[1] != 2:
        raise ValueError(f"b_blocks must have shape [nnz, 2], got {tuple(b_blocks.shape)}")
    if not isinstance(b_values, torch.Tensor) or not b_values.is_floating_point():
        got = b_values.dtype if isinstance(b_values, torch.Tensor) else type(b_values).__name__
        raise TypeError(f"b_values must be a floating-point tensor, got {got}")
    nnz = b_blocks.shape[0]
    if tuple(b_values.shape) != (nnz, bo, br):
        raise ValueError(
            f"b_values must have shape [nnz, bo, br] = [{nnz}, {bo}, {br}] to match b_blocks "
            f"and block {tuple(block)}, got {tuple(b_values.shape)}"
        )
    if b_values.device != b_blocks.device:
        raise ValueError(f"b_values is on {b_values.device} but b_blocks is on {b_blocks.device}")


def check_b_blocks(b_blocks: torch.Tensor, out_features: int, r: int, block) -> None:
    """Check the content of ``b_blocks``: in range, sorted, unique (reads the tensor)."""
    n_rows, n_cols = block_grid(out_features, r, block)
    if b_blocks.numel() == 0:
        return
    blocks = b_blocks.detach().to("cpu", torch.int64)
    rows, cols = blocks[:, 0], blocks[:, 1]
    bad = ((rows < 0) | (rows >= n_rows) | (cols < 0) | (cols >= n_cols)).nonzero()
    if bad.numel():
        k = int(bad[0])
        raise ValueError(
            f"b_blocks[{k}] = ({int(rows[k])}, {int(cols[k])}) is out of range: B "
            f"[{out_features}, {r}] with block {tuple(block)} has {n_rows} block rows and "
            f"{n_cols} block columns"
        )
    keys = rows * n_cols + cols
    bad = (keys[1:] <= keys[:-1]).nonzero()
    if bad.numel():
        k = int(bad[0]) + 1
        what = "duplicated" if keys[k] == keys[k - 1] else "not sorted"
        raise ValueError(
            f"b_blocks must be sorted by (block row, block column) and unique: b_blocks[{k}] = "
            f"({int(rows[k])}, {int(cols[k])}) is {what} after b_blocks[{k - 1}] = "
            f"({int(rows[k - 1])}, {int(cols[k - 1])})"
        )


def dense_blocks(out_features: int, r: int, block, device=None) -> torch.Tensor:
    """``b_blocks`` keeping every block: the dense B of LoRI-D."""
    n_rows, n_cols = block_grid(out_features, r, block)
    rows = torch.arange(n_rows, dtype=torch.int32, device=device).repeat_interleave(n_cols)
    cols = torch.arange(n_cols, dtype=torch.int32, device=device).repeat(n_rows)
    return torch.stack([rows, cols], dim=1)


def _padded(dense: torch.Tensor, n_rows: int, bo: int) -> torch.Tensor:
    """``dense`` with zero rows appended up to ``n_rows * bo``."""
    pad = n_rows * bo - dense.shape[0]
    return torch.nn.functional.pad(dense, (0, 0, 0, pad)) if pad else dense


def _as_blocks(dense: torch.Tensor, block) -> torch.Tensor:
    """View of a padded dense ``[n_rows*bo, r]`` as ``[n_rows, n_cols, bo, br]``."""
    bo, br = block
    n_rows, n_cols = dense.shape[0] // bo, dense.shape[1] // br
    return dense.reshape(n_rows, bo, n_cols, br).transpose(1, 2)


def _check_dense(dense: torch.Tensor, what: str) -> None:
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
        shape = tuple(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__
        raise ValueError(f"{what} must be a 2-D tensor [out, r], got {shape}")


def blocks_from_mask(mask: torch.Tensor, block) -> torch.Tensor:
    """``b_blocks`` of a bool mask ``[out, r]`` made of whole ``(bo, br)`` blocks
    (rows past ``out`` in a partial last block row do not count)."""
    _check_dense(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    out_features, r = mask.shape
    bo, br = block = check_block(block, r)
    n_rows, _ = block_grid(out_features, r, block)
    tiles = _as_blocks(_padded(mask, n_rows, bo), block)
    count = tiles.sum(dim=(2, 3))
    # A partial last block row holds fewer real elements than bo * br.
    full = torch.full_like(count, bo * br)
    full[-1] = (out_features - (n_rows - 1) * bo) * br
    partly = ((count > 0) & (count < full)).nonzero()
    if partly.numel():
        i, j = (int(v) for v in partly[0])
        raise ValueError(
            f"mask is not made of whole {tuple(block)} blocks: block ({i}, {j}) is partly set "
            f"({int(count[i, j])} of {int(full[i, j])} elements); element-wise masks need "
            "block (1, 1)"
        )
    return (count > 0).nonzero().to(torch.int32).contiguous()


def blocks_covering(mask: torch.Tensor, block) -> torch.Tensor:
    """``b_blocks`` of every ``(bo, br)`` block holding at least one set element of a bool
    mask ``[out, r]``: the smallest block layout that keeps an arbitrary mask exactly."""
    _check_dense(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    bo, _ = block = check_block(block, mask.shape[1])
    n_rows, _ = block_grid(mask.shape[0], mask.shape[1], block)
    return _as_blocks(_padded(mask, n_rows, bo), block).any(dim=3).any(dim=2).nonzero().to(torch.int32).contiguous()


def mask_from_blocks(b_blocks: torch.Tensor, out_features: int, r: int, block) -> torch.Tensor:
    """The bool mask ``[out_features, r]`` that ``b_blocks`` keeps."""
    bo, br = block = check_block(block, r)
    n_rows, n_cols = block_grid(out_features, r, block)
    check_b_blocks(b_blocks, out_features, r, block)
    kept = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=b_blocks.device)
    kept[b_blocks[:, 0].long(), b_blocks[:, 1].long()] = True
    mask = kept.repeat_interleave(bo, dim=0).repeat_interleave(br, dim=1)
    return mask[:out_features]


def gather_blocks(dense: torch.Tensor, b_blocks: torch.Tensor, block) -> torch.Tensor:
    """``b_values`` ``[nnz, bo, br]``: the blocks ``b_blocks`` of a dense ``[out, r]``
    (zero in the padded rows of a partial block)."""
    _check_dense(dense, "dense B")
    bo, _ = block = check_block(block, dense.shape[1])
    n_rows, _ = block_grid(dense.shape[0], dense.shape[1], block)
    tiles = _as_blocks(_padded(dense, n_rows, bo), block)
    return tiles[b_blocks[:, 0].long(), b_blocks[:, 1].long()]


def scatter_blocks(b_values: torch.Tensor, b_blocks: torch.Tensor, out_features: int, r: int) -> torch.Tensor:
    """Dense B ``[out_features, r]`` with ``b_values`` at ``b_blocks``, zero elsewhere.
    Differentiable in ``b_values`` (padded rows get zero gradient)."""
    bo, br = b_values.shape[1:]
    n_rows, n_cols = block_grid(out_features, r, (bo, br))
    tiles = b_values.new_zeros(n_rows, n_cols, bo, br)
    tiles = tiles.index_put((b_blocks[:, 0].long(), b_blocks[:, 1].long()), b_values)
    return tiles.transpose(1, 2).reshape(n_rows * bo, r)[:out_features]


def from_dense(dense: torch.Tensor, block, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact ``(b_values, b_blocks)`` of a dense B ``[out, r]``: every block, or only the
    blocks of ``mask`` (bool ``[out, r]``, made of whole blocks). Values outside the mask
    must be zero: nothing is dropped silently."""
    _check_dense(dense, "dense B")
    if mask is None:
        b_blocks = dense_blocks(dense.shape[0], dense.shape[1], block, dense.device)
    else:
        if mask.shape != dense.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match B shape {tuple(dense.shape)}")
        mask = mask.to(dense.device)
        b_blocks = blocks_from_mask(mask, block)
        outside = (dense != 0) & ~mask
        if outside.any():
            i, j = (int(v) for v in outside.nonzero()[0])
            raise ValueError(
                f"B has {int(outside.sum())} nonzero values outside the mask (first at "
                f"[{i}, {j}]); multiply B by the mask first if they are to be dropped"
            )
    return gather_blocks(dense, b_blocks, block), b_blocks


def to_dense(b_values: torch.Tensor, b_blocks: torch.Tensor, out_features: int, r: int) -> torch.Tensor:
    """Dense B ``[out_features, r]`` of a compact B, after checking it."""
    block = tuple(b_values.shape[1:]) if b_values.dim() == 3 else None
    if block is None:
        raise ValueError(f"b_values must have shape [nnz, bo, br], got {tuple(b_values.shape)}")
    check_block(block, r)
    check_b_layout(b_values, b_blocks, block)
    check_b_blocks(b_blocks, out_features, r, block)
    return scatter_blocks(b_values, b_blocks, out_features, r)
