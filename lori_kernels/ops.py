"""Python-side registrations of the compiled ``torch.ops.lori`` ops (schemas live in
``csrc/lori_ops.cpp``): fake (meta) implementations so that ``torch.compile`` and
``torch.library.opcheck`` can trace them. Imported by the extension loader right after
``lori_kernels._C`` is loaded; never import it directly.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("lori::generate_a")
def _generate_a_fake(seed, d_in, row0, rows, col0, cols, dist):
    torch._check(rows >= 0 and cols >= 0, lambda: "generate_a: rows and cols must be >= 0")
    return seed.new_empty((rows, cols), dtype=torch.float32)
