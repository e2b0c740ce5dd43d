"""Address arithmetic shared by the Triton kernels.

Element offsets into the activations (``x``, ``y``, ``dy``, ``dx``, ``h``, ``g``: ``M``
rows), the weight and the tiles of A and dropout masks that ``philox`` writes are int64.
In int32, ``row * stride`` wraps past 2^31: at M x width >= 2^31, about
150k tokens at width 14336, one long-context batch. Triton's own integer arguments and
``tl.arange`` are int32, so every such product goes through ``tile_offsets``. Offsets into
B (``b_values``, the block index and slot map, ``db_values``) stay int32: they are bounded
by B's size, out x r.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_offsets(rows, cols, stride_rows, stride_cols):
    """int64 element offsets ``[len(rows), len(cols)]`` of a tile of a strided matrix:
    ``rows[:, None] * stride_rows + cols[None, :] * stride_cols``, every product in int64
    (a stride of 1, which Triton specialises, still folds away)."""
    return rows.to(tl.int64)[:, None] * stride_rows + cols.to(tl.int64)[None, :] * stride_cols
