import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. It must be switched on
# before the kernels are defined (lori_kernels imports them on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lori_kernels import _extension  # noqa: E402

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------
# Test-only shim: bfloat16 in Triton's CPU interpreter computed as a GPU computes it.
#
# The interpreter holds bfloat16 values as their raw bit patterns in uint16 numpy arrays.
# triton 3.8 gets two things wrong with them (float16, held as np.float16, and float32 are right):
# - its dot (InterpreterBuilder.create_dot) hands the bit patterns to np.matmul as they are,
#   multiplying them as integers (a 16 x 16 dot is off by ~1e10);
# - its float32 -> bfloat16 cast (cast_impl) drops the low 16 bits (rounds toward zero), where
#   a GPU rounds to nearest even: bfloat16 kernels came out 2-4x less accurate than torch's
#   bfloat16 math, 1x with the rounding a GPU does.
# For the test session both are replaced, at import of this file (before any kernel runs):
# the dot widens bfloat16 operands to float32 first (exact: a bfloat16 is the top half of a
# float32), the cast rounds to nearest even. Nothing outside tests/ patches Triton: without
# the shim lori_kernels refuses bfloat16 under the interpreter (backends.triton_dtype_problem
# probes the dot). test_kernel_safety.py proves the unpatched dot and cast still wrong (drop
# the shim when those tests fail) and the refusal still firing without the shim (fixture
# ``unpatched_interpreter``).


def _bfloat16_bits_as_float32(handle):
    """An interpreter operand holding raw bfloat16 bits (uint16), widened to float32; any
    other operand as it is."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if handle.dtype != tl.bfloat16 or handle.data.dtype != np.uint16:
        return handle
    return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def _float32_to_bfloat16_bits(values):
    """Raw bfloat16 bits (uint16) of float32 ``values``, rounded to nearest even as a GPU
    (and torch) does; NaN stays NaN."""
    import numpy as np

    bits = values.astype(np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), (bits >> 16).astype(np.uint16) | 0x0040, rounded)


def _install_interpreter_shim():
    """Replaces the interpreter's dot and cast by the bfloat16-faithful ones above; returns
    the originals ``{name: function}`` (None where the interpreter is off or Triton missing)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:
        return None
    originals = {name: getattr(InterpreterBuilder, name) for name in ("create_dot", "cast_impl")}

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = _bfloat16_bits_as_float32(a), _bfloat16_bits_as_float32(b)
        return originals["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_float32_to_bfloat16_bits(src.data), tl.bfloat16)
        return originals["cast_impl"](self, src, dst_type)

    InterpreterBuilder.create_dot = create_dot
    InterpreterBuilder.cast_impl = cast_impl
    return originals


INTERPRETER_ORIGINALS = _install_interpreter_shim()


@pytest.fixture
def unpatched_interpreter(monkeypatch):
    """Triton's own interpreter dot and cast for one test (the shim above removed), with
    lori_kernels' probe of the dot re-run before and after."""
    if INTERPRETER_ORIGINALS is None:
        pytest.skip("the Triton interpreter is off (or Triton is missing): no shim to remove")
    from triton.runtime.interpreter import InterpreterBuilder

    from lori_kernels.triton_kernels.gemm import interpreter_dot_is_right

    for name, original in INTERPRETER_ORIGINALS.items():
        monkeypatch.setattr(InterpreterBuilder, name, original)
    interpreter_dot_is_right.cache_clear()
    yield
    monkeypatch.undo()
    interpreter_dot_is_right.cache_clear()


# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def golden():
    """LoRI-RNG v1 known answers (a copy of shared/rng_golden_v1.json; test_rng checks it)."""
    return json.loads((DATA / "rng_golden_v1.json").read_text())


@pytest.fixture(scope="session")
def ext():
    """Skip unless lori_kernels._C is built; with LORI_REQUIRE_EXT=1 (make test) a missing
    build fails instead, so CI cannot pass without compiling the extension."""
    error = _extension.load_error()
    if error is not None:
        if os.environ.get("LORI_REQUIRE_EXT") == "1":
            pytest.fail(f"LORI_REQUIRE_EXT=1 but {error}")
        pytest.skip(error)
    return torch.ops.lori


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
