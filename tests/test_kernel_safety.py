"""The kernels never compute garbage silently:

- strides: every backend's fused layer takes a non-contiguous weight and bias as it takes
  their contiguous copies, forward and backward; every kernel of every backend takes each
  of its tensor arguments as a strided view, or (the C++ ops) refuses it by name;
- int64 offsets: the Triton kernels' element offsets (``indexing.tile_offsets``) and the
  rows of A and of dropout masks are right past 2^31, where int32 arithmetic wraps;
- bfloat16 under the Triton interpreter, whose ``tl.dot`` is wrong, is refused (unless a
  probe finds the dot right, as with the tests' shim in conftest.py).

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest), which wraps int32 arithmetic as a GPU does.
"""

import pytest
import torch
from helpers import assert_bitwise_equal, make_layer, run

import lori_kernels
from lori_kernels import backends, rng
from lori_kernels.backends import TRITON_BACKENDS

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from lori_kernels.triton_kernels import philox  # noqa: E402
from lori_kernels.triton_kernels.indexing import tile_offsets  # noqa: E402

GPU = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if GPU else "cpu"
SEED, DROPOUT_SEED = -12345, 2**62 + 7  # int64, as the kernels take them
M, IN, OUT, R, BLOCK = 21, 40, 70, 8, (32, 4)

BACKEND_CASES = [  # (backend, device)
    pytest.param(("reference", TRITON_DEVICE), id="reference"),
    pytest.param(("triton", TRITON_DEVICE), id="triton"),
    pytest.param(("triton_epilogue", TRITON_DEVICE), id="triton_epilogue"),
    pytest.param(("cpu_ext", "cpu"), id="cpu_ext"),
    pytest.param(("cuda_ext", "cuda"), id="cuda_ext", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKEND_CASES)
def backend(request):
    """(backend, device), skipped where the backend cannot run."""
    name, device = request.param
    if name.endswith("_ext"):
        request.getfixturevalue("ext")  # skips (or fails under LORI_REQUIRE_EXT) without a build
    if name not in lori_kernels.available_backends():
        pytest.skip(f"{name} cannot run here")
    return name, device


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous view holding ``t``'s values: ``"transposed"`` (the last two dims
    stored swapped) or ``"every_other"`` (every other element of a last dim twice as wide,
    the gaps NaN, or 0 for integers, so that a kernel reading or writing them shows)."""
    if layout == "transposed":
        view = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        gap = float("nan") if t.is_floating_point() else 0
        view = torch.full((*t.shape[:-1], 2 * t.shape[-1]), gap, dtype=t.dtype, device=t.device)[..., ::2]
        view.copy_(t)
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def gaps_untouched(view: torch.Tensor) -> bool:
    """Whether the NaN gaps of an ``"every_other"`` view are still NaN."""
    return bool(torch.isnan(view._base[..., 1::2]).all())


# ---------------------------------------------------------------------------------------
# Strides


def forward_backward(layer, x, dy, backend):
    x = x.clone().requires_grad_()
    b_values = layer["b_values"].clone().requires_grad_()
    y = run(dict(layer, b_values=b_values), x, R, BLOCK, dropout_p=0.2, backend=backend)
    y.backward(dy)
    return y, x.grad, b_values.grad


@pytest.mark.parametrize("weight_layout", ["transposed", "every_other"])
def test_layer_takes_strided_weight_and_bias(backend, weight_layout):
    """lori_linear passes weight and bias on as given: y, dx and db_values with strided
    views equal those with contiguous copies."""
    name, device = backend
    layer = make_layer(OUT, IN, R, BLOCK, keep=0.5, device=device)
    x, dy = torch.randn(M, IN, device=device), torch.randn(M, OUT, device=device)
    views = dict(layer, weight=strided(layer["weight"], weight_layout), bias=strided(layer["bias"], "every_other"))
    for got, want in zip(forward_backward(views, x, dy, name), forward_backward(layer, x, dy, name), strict=True):
        torch.testing.assert_close(got, want)


# Each kernel of a backend (LayerKernels): its tensor arguments, the rest of its arguments,
# and the tensor it adds into in place (None: it returns its result).
SIGNATURES = {
    "shrink": (("x",), (SEED, R, "uniform", 0.25, DROPOUT_SEED), None),
    "shrink_backward": (("g",), (SEED, IN, "rademacher", 0.25, DROPOUT_SEED), None),
    "expand_": (("y", "h", "b_values", "b_blocks"), (1.5,), "y"),
    "expand_backward": (("dy", "b_values", "b_blocks"), (R, 1.5), None),
    "sddmm": (("dy", "h", "b_blocks"), (*BLOCK, 1.5), None),
    "linear_expand": (("x", "weight", "bias", "h", "b_values", "b_blocks"), (1.5,), None),
    "linear_shrink": (("x", "weight", "bias"), (SEED, R, "uniform", 0.25, DROPOUT_SEED), None),
    "linear_shrink_backward": (("dy", "weight", "g"), (SEED, "uniform", 0.25, DROPOUT_SEED), None),
}


def kernel_inputs(device, dtype=torch.float32):
    """Every tensor argument of the kernels, contiguous: M rows, a partial last block row."""
    layer = make_layer(OUT, IN, R, BLOCK, keep=0.5, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(3)
    shapes = dict(x=(M, IN), y=(M, OUT), dy=(M, OUT), h=(M, R), g=(M, R))
    tensors = {name: torch.randn(shape, generator=g).to(dtype=dtype, device=device) for name, shape in shapes.items()}
    return dict(tensors, **{k: layer[k] for k in ("weight", "bias", "b_values", "b_blocks")})


def call_kernel(kernels, kernel, inputs):
    """What ``kernel`` computes from ``inputs`` (for an in-place kernel, the tensor it adds into)."""
    tensor_args, rest, into = SIGNATURES[kernel]
    out = getattr(kernels, kernel)(*(inputs[name] for name in tensor_args), *rest)
    return inputs[into] if into else out


@pytest.mark.parametrize("layout", ["transposed", "every_other"])
@pytest.mark.parametrize("kernel, arg", [(k, a) for k, (args, _, _) in SIGNATURES.items() for a in args])
def test_kernels_take_strided_arguments(backend, kernel, arg, layout):
    """Each tensor argument of each kernel as a strided view: the same result as with
    contiguous tensors (an in-place output written through its strides, its gaps left
    alone), or, for the C++ ops, which take contiguous tensors, an error naming it."""
    name, device = backend
    kernels = backends.kernels(name)
    if getattr(kernels, kernel) is None:
        pytest.skip(f"{name} has no {kernel}")
    inputs = kernel_inputs(device)
    if layout == "transposed" and inputs[arg].dim() < 2:
        pytest.skip("a 1-D tensor has no transposed layout")
    want = call_kernel(kernels, kernel, inputs)
    inputs = dict(kernel_inputs(device), **{arg: strided(kernel_inputs(device)[arg], layout)})
    if name.endswith("_ext"):
        with pytest.raises(RuntimeError, match=f"{kernel}: {arg} must be contiguous"):
            call_kernel(kernels, kernel, inputs)
        return
    torch.testing.assert_close(call_kernel(kernels, kernel, inputs), want)
    if arg == SIGNATURES[kernel][2] and layout == "every_other":
        assert gaps_untouched(inputs[arg])


# ---------------------------------------------------------------------------------------
# int64 offsets


@triton.jit
def _offsets_kernel(out_ptr, row0, col0, stride_rows, stride_cols, INT32: tl.constexpr):
    """Writes the offsets ``[4, 4]`` of rows ``row0 + i`` and columns ``col0 + j``: by
    ``tile_offsets``, or (``INT32``) by the int32 arithmetic it replaced."""
    i = tl.arange(0, 4)
    rows, cols = row0 + i, col0 + i
    if INT32:
        offsets = (rows[:, None] * stride_rows + cols[None, :] * stride_cols).to(tl.int64)
    else:
        offsets = tile_offsets(rows, cols, stride_rows, stride_cols)
    tl.store(out_ptr + i[:, None] * 4 + i[None, :], offsets)


@pytest.mark.parametrize(
    "row0, col0, stride_rows, stride_cols",
    [
        (2**31 // 14336 - 1, 0, 14336, 1),  # ~150k tokens of a contiguous [M, 14336]
        (0, 14333, 1, 150_000),  # the last columns of a transposed [150k, 14336] view
    ],
)
def test_tile_offsets_are_int64(row0, col0, stride_rows, stride_cols):
    """Offsets past 2^31 from int32 row and column indices and strides (as Triton passes
    them): exact through ``tile_offsets``; the int32 arithmetic wraps (so this test sees
    the difference, in the interpreter as on a GPU)."""
    want = torch.tensor(
        [[(row0 + i) * stride_rows + (col0 + j) * stride_cols for j in range(4)] for i in range(4)], dtype=torch.int64
    )
    assert want.max() >= 2**31 and max(row0, col0, stride_rows, stride_cols) < 2**31
    got = torch.empty(4, 4, dtype=torch.int64, device=TRITON_DEVICE)
    _offsets_kernel[(1,)](got, row0, col0, stride_rows, stride_cols, INT32=False)
    assert torch.equal(got.cpu(), want)
    _offsets_kernel[(1,)](got, row0, col0, stride_rows, stride_cols, INT32=True)
    assert not torch.equal(got.cpu(), want)


def test_rng_rows_past_2_31():
    """Rows crossing 2^31 inside one tile: A and the dropout mask (the token row index
    of a long run) still match LoRI-RNG."""
    row0 = 2**31 - 20
    got = philox.generate_a_tile(SEED, 40, row0, 40, 0, 40, device=TRITON_DEVICE)
    assert_bitwise_equal(got.cpu(), rng.generate_a_tile(SEED, 40, row0, 40, 0, 40))
    keep = philox.dropout_keep(DROPOUT_SEED, 0.3, 40, 41, row0=row0, device=TRITON_DEVICE)
    assert torch.equal(keep.cpu(), rng.dropout_keep(DROPOUT_SEED, 0.3, 40, 41, row0=row0))


# ---------------------------------------------------------------------------------------
# bfloat16 under the Triton interpreter

interpreter_only = pytest.mark.skipif(GPU, reason="the Triton interpreter runs only where there is no GPU")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr):
    """``c = a @ b`` for contiguous 16 x 16 tiles, c in float32."""
    i = tl.arange(0, 16)
    offsets = i[:, None] * 16 + i[None, :]
    tl.store(c_ptr + offsets, tl.dot(tl.load(a_ptr + offsets), tl.load(b_ptr + offsets)))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    """``y = x.to(y's dtype)`` for contiguous vectors of N."""
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(y_ptr.dtype.element_ty))


def interpreter_dot_error(dtype) -> float:
    a, b = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c)
    return (c - a.float() @ b.float()).abs().max().item()


def interpreter_bfloat16_cast(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, N=x.numel())
    return y


# 16 float32 values whose bfloat16 rounding tests each case: ties to even (down and up), just
# above and below a tie, negative, past the largest bfloat16, infinities, subnormal, zeros.
CAST_VALUES = torch.tensor(
    [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 1 + 2**-9, -(1 + 3 * 2**-8), -2.7, 3.4e38, float("inf"),
     -float("inf"), 1e-40, 2 + 2**-6, 0.0, -0.0, 7.1, -1e-3, 65504.0],
    dtype=torch.float32,
)  # fmt: skip


@interpreter_only
def test_interpreter_bfloat16_is_still_wrong(unpatched_interpreter):
    """Why the tests shim the interpreter (conftest.py) and lori_kernels refuses bfloat16
    under it: its tl.dot is off by orders of magnitude on bfloat16 (float16 is right), and
    its float32 -> bfloat16 cast rounds toward zero. When Triton fixes these, this fails:
    drop the shim (the refusal lifts by itself: it probes the dot)."""
    assert interpreter_dot_error(torch.float16) < 1e-2
    fixed = f"triton {triton.__version__}'s interpreter now gets bfloat16 right: drop the shim in tests/conftest.py"
    assert interpreter_dot_error(torch.bfloat16) > 1.0, fixed
    cast = interpreter_bfloat16_cast(CAST_VALUES).view(torch.int16)
    assert not torch.equal(cast, CAST_VALUES.to(torch.bfloat16).view(torch.int16)), fixed
    normal = CAST_VALUES.abs() >= torch.finfo(torch.float32).tiny
    truncated = (CAST_VALUES.view(torch.int32) >> 16).to(torch.int16)  # the top half: rounded toward zero
    assert torch.equal(cast[normal], truncated[normal])


@interpreter_only
def test_interpreter_shim_computes_bfloat16_as_a_gpu():
    """With conftest.py's shim the interpreter's bfloat16 dot is as right as float16's, its
    casts round as torch (and a GPU) does, bit for bit, and bfloat16 is no longer refused."""
    assert interpreter_dot_error(torch.bfloat16) < 1e-2
    assert_bitwise_equal(interpreter_bfloat16_cast(CAST_VALUES), CAST_VALUES.to(torch.bfloat16))
    assert backends.triton_dtype_problem("cpu", torch.bfloat16) is None


@interpreter_only
@pytest.mark.parametrize("name", TRITON_BACKENDS)
def test_interpreter_refuses_bfloat16(unpatched_interpreter, name):
    """Without the shim, lori_linear and each of the backend's kernels refuse bfloat16 CPU
    tensors under the interpreter with one sentence, rather than return garbage; "auto"
    picks another backend."""
    message = "bfloat16 under the Triton interpreter is not supported because its tl.dot gets a 16 x 16 bfloat16"
    layer = make_layer(OUT, IN, R, BLOCK, keep=0.5, dtype=torch.bfloat16)
    x = torch.randn(M, IN, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=message):
        run(layer, x, R, BLOCK, backend=name)
    kernels = backends.kernels(name)
    inputs = kernel_inputs("cpu", torch.bfloat16)
    for kernel in SIGNATURES:
        if getattr(kernels, kernel) is not None:
            with pytest.raises(RuntimeError, match=f"{kernel}: {message}"):
                call_kernel(kernels, kernel, inputs)
    assert backends.resolve("auto", "lori_linear", torch.device("cpu"), torch.bfloat16) not in TRITON_BACKENDS
    assert name in lori_kernels.available_backends()  # float16 and float32 still run
    for dtype in (torch.float16, torch.float32):
        assert backends.triton_dtype_problem("cpu", dtype) is None
