"""Every kernel of every backend against its ``*_ref`` twin, every registered op under
``torch.library.opcheck``, the block index the kernels share, and the announcement of the
backend that ``"auto"`` picks.

Tolerances are earned (STYLE.md, flash-attention's rule): a kernel's error against the twin
in float64 is at most twice that of the twin (plain torch) in the kernel's own precision.
The shapes are odd on purpose: no rows and one row, ``in`` not a multiple of 4, a partial
last block row, element masks (block 1 x 1), ranks 4 to 32. Without a GPU the Triton kernels
run in Triton's interpreter (conftest.py), in the dtypes ``backends.triton_dtype_problem``
lets through.
"""

import logging

import pytest
import torch
from helpers import assert_bitwise_equal, assert_error_earned, make_layer
from test_multi_op import segmented_expand_args

import lori_kernels
from lori_kernels import backends, fused, reference, rng
from lori_kernels.block_index import block_index, block_slots

GPU = torch.cuda.is_available()
SEED, DROPOUT_SEED = -12345, 2**62 + 7  # int64 as the kernels take them (negative: a seed >= 2^63)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = {  # (M, in, out, r, block, dropout_p)
    "empty": (0, 12, 20, 8, (16, 8), 0.0),
    "one_row_element_mask": (1, 13, 33, 4, (1, 1), 0.3),
    "partial_block_row": (7, 40, 70, 16, (32, 4), 0.2),
    "in_odd_r32": (19, 37, 48, 32, (16, 8), 0.0),
    "out_below_bo": (5, 24, 20, 8, (32, 8), 0.1),
}
# (backend, device, kernels of its set tested here): triton_epilogue shares triton's other kernels.
LAYER_KERNELS = ("shrink", "shrink_backward", "expand_", "expand_backward", "sddmm", "generate_a")
CASES = [
    ("triton", "cuda" if GPU else "cpu", LAYER_KERNELS),
    ("triton_epilogue", "cuda" if GPU else "cpu", ("linear_expand", "linear_shrink", "linear_shrink_backward")),
    ("cpu_ext", "cpu", LAYER_KERNELS),
    pytest.param("cuda_ext", "cuda", LAYER_KERNELS, marks=pytest.mark.gpu),
]


def skip_unless_runs(request, name: str, device: str, dtype: torch.dtype | None = None) -> None:
    if name.endswith("_ext"):
        request.getfixturevalue("ext")  # skips (or fails under LORI_REQUIRE_EXT) without a build
    reason = backends.unavailable_reason(name, "lori_linear", device, dtype)
    if reason is not None:
        pytest.skip(reason)


def inputs(shape: str, device: str) -> dict:
    """Float64 inputs of every kernel for one shape (cast to a dtype by the test)."""
    m, inp, out, r, block, dropout_p = SHAPES[shape]
    layer = make_layer(out, inp, r, block, keep=0.5, dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(m * 1000 + inp)
    rand = lambda *size: torch.randn(*size, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    return dict(
        x=rand(m, inp),
        h=rand(m, r),
        g=rand(m, r),
        dy=rand(m, out),
        y=rand(m, out),
        weight=layer["weight"],
        bias=layer["bias"],
        b_values=layer["b_values"],
        b_blocks=layer["b_blocks"],
    )


def linear_expand_ref(x, weight, bias, h, b_values, b_blocks, scaling):
    """The twin of the GEMM with ``expand_`` in its epilogue."""
    y = torch.nn.functional.linear(x, weight, bias)
    reference.expand_ref_(y, h, b_values, b_blocks, scaling)
    return y


def linear_shrink_ref(x, weight, bias, seed, r, dist, dropout_p, dropout_seed):
    """The twin of the GEMM that computes ``h`` from the x tiles it reads."""
    return torch.nn.functional.linear(x, weight, bias), reference.shrink_ref(x, seed, r, dist, dropout_p, dropout_seed)


def linear_shrink_backward_ref(dy, weight, g, seed, dist, dropout_p, dropout_seed):
    """The twin of the GEMM with ``shrink_backward`` in its epilogue."""
    return reference.shrink_backward_ref(g, seed, weight.shape[1], dist, dropout_p, dropout_seed).addmm_(dy, weight)


def run_kernel(kernels, kernel: str, t: dict, shape: str):
    """What ``kernel`` of a kernel set computes on the tensors ``t`` (an in-place kernel:
    the tensor it adds into, a copy of the input's; ``linear_shrink``: y and h side by side)."""
    m, inp, out, r, (bo, br), p = SHAPES[shape]
    dist = "rademacher" if shape == "in_odd_r32" else "uniform"
    if kernel == "shrink":
        return kernels.shrink(t["x"], SEED, r, dist, p, DROPOUT_SEED)
    if kernel == "shrink_backward":
        return kernels.shrink_backward(t["g"], SEED, inp, dist, p, DROPOUT_SEED)
    if kernel == "expand_":
        y = t["y"].clone()
        kernels.expand_(y, t["h"], t["b_values"], t["b_blocks"], 1.5)
        return y
    if kernel == "expand_backward":
        return kernels.expand_backward(t["dy"], t["b_values"], t["b_blocks"], r, 1.5)
    if kernel == "sddmm":
        return kernels.sddmm(t["dy"], t["h"], t["b_blocks"], bo, br, 1.5)
    if kernel == "linear_shrink":
        return torch.cat(kernels.linear_shrink(t["x"], t["weight"], t["bias"], SEED, r, dist, p, DROPOUT_SEED), 1)
    if kernel == "linear_expand":
        return kernels.linear_expand(t["x"], t["weight"], t["bias"], t["h"], t["b_values"], t["b_blocks"], 1.5)
    return kernels.linear_shrink_backward(t["dy"], t["weight"], t["g"], SEED, dist, p, DROPOUT_SEED)


REFERENCE = reference.KERNELS._replace(
    linear_expand=linear_expand_ref, linear_shrink_backward=linear_shrink_backward_ref, linear_shrink=linear_shrink_ref
)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, device, tested", CASES)
def test_kernels_match_their_twins(request, name, device, tested, dtype, shape):
    """Each kernel of the backend against its ``*_ref`` twin: its error against the twin in
    float64 at most twice the twin's own in ``dtype`` (``generate_a``: bit for bit)."""
    skip_unless_runs(request, name, device, dtype)
    kernels = backends.kernels(name)
    t64 = inputs(shape, device)
    t = {k: v.to(dtype) if v is not None and v.is_floating_point() else v for k, v in t64.items()}
    truth_inputs = {k: v.double() if v is not None and v.is_floating_point() else v for k, v in t.items()}
    for kernel in tested:
        if kernel == "generate_a":
            _, inp, _, r, _, _ = SHAPES[shape]
            args = (SEED, inp, 1, r - 1, 3, inp - 3)
            want = rng.generate_a_tile(*args, dist="rademacher", device=device)
            assert_bitwise_equal(kernels.generate_a(*args, dist="rademacher", device=device), want)
            continue
        got = run_kernel(kernels, kernel, t, shape)
        assert got.dtype == dtype, kernel
        same_precision = run_kernel(REFERENCE, kernel, t, shape)
        truth = run_kernel(REFERENCE, kernel, truth_inputs, shape)
        assert_error_earned(got, same_precision, truth)


# ---------------------------------------------------------------------------------------
# opcheck of every registered op


# Ops whose outputs come from inputs that may require grad, with no derivative: the layer's
# backward refuses (DOUBLE_BACKWARD_ERROR), the extension's kernels are registered as such.
NO_DERIVATIVE = ("backward", "shrink", "shrink_backward", "expand_backward", "sddmm")
NOT_DIFFERENTIABLE = "does not support double backward|is not implemented"
EXT_OPS = ("generate_a", "shrink", "shrink_backward", "expand_", "expand_segments_", "expand_backward", "sddmm")
OPS = (
    ["lori_rng::dropout_seed"]
    + [f"lori_{name}::{op}" for name in backends.BACKENDS for op in ("forward", "backward")]
    + [f"lori::{op}" for op in EXT_OPS]
)


def op_args(op: str, device: str, requires_grad: bool) -> tuple:
    """Sample arguments of a registered op (float32, small, with dropout); the reference's
    fused ops get a stored A."""
    t = inputs("partial_block_row", device)
    t = {k: v.float() if v is not None and v.is_floating_point() else v for k, v in t.items()}
    for k in ("x", "dy", "h", "b_values"):
        t[k].requires_grad_(requires_grad)
    namespace, name = op.split("::")
    dropout_seed = torch.tensor(DROPOUT_SEED)
    if namespace == "lori_rng":
        return torch.tensor(3), rng.to_int64(2**64 - 5), 7
    if namespace != "lori":
        a = rng.generate_a_tile(3, 40, 0, 16, 0, 40, device=device) if namespace == "lori_reference" else None
        if name == "forward":
            return (
                t["x"],
                t["weight"],
                t["bias"],
                t["b_values"],
                t["b_blocks"],
                SEED,
                16,
                t["weight"].shape[0],
                2.0,
                "uniform",
                0.1,
                dropout_seed,
                a,
            )
        rng_args = (SEED, 2.0, "uniform", 0.1, dropout_seed)
        in_features = t["weight"].shape[1]
        return t["dy"], t["h"], t["weight"], t["b_values"], t["b_blocks"], in_features, *rng_args, True, True, a
    index = block_index(t["b_blocks"], 3, 4)
    return {
        "generate_a": (torch.tensor(SEED, device=device), 10, 2, 3, 1, 9, "rademacher"),
        "shrink": (t["x"], SEED, 16, "uniform", 0.2, DROPOUT_SEED),
        "shrink_backward": (t["h"], SEED, 40, "rademacher", 0.2, DROPOUT_SEED),
        "expand_": (t["y"], t["h"], t["b_values"], t["b_blocks"], index.row_ptr, 2.0),
        "expand_segments_": tuple(segmented_expand_args(device, torch.float32).values()),
        "expand_backward": (t["dy"], t["b_values"], t["b_blocks"], index.col_ptr, index.col_order, 16, 2.0),
        "sddmm": (t["dy"], t["h"], t["b_blocks"], 32, 4, 2.0),
    }[name]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_every_registered_op(request, op, requires_grad):
    """Schema, autograd registration, fake tensors and AOT dispatch (all of opcheck's checks)
    of every op the package registers: the extension's ``lori::`` ops, every backend's fused
    ``forward`` and ``backward``, and ``lori_rng::dropout_seed``; on each device it runs."""
    namespace, name = op.split("::")
    devices = ["cpu"] + (["cuda"] if GPU and namespace != "lori_rng" else [])
    if namespace == "lori":
        request.getfixturevalue("ext")
        devices = [d for d in devices if backends.unavailable_reason(f"{d}_ext", "lori_linear", d) is None]
    elif namespace != "lori_rng":
        backend = namespace.removeprefix("lori_")
        devices = [d for d in devices if backends.unavailable_reason(backend, "lori_linear", d) is None][-1:]
        if not devices:
            pytest.skip(f"{backend} runs on neither the CPU nor a GPU here")
    overload = getattr(getattr(torch.ops, namespace), name).default
    for device in devices:
        args = op_args(op, device, requires_grad)
        if requires_grad and name in NO_DERIVATIVE:
            # Every check passes but AOT dispatch's, which differentiates the op: refused, naming it.
            torch.library.opcheck(
                overload, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
            )
            with pytest.raises(Exception, match=NOT_DIFFERENTIABLE):  # opcheck's OpCheckError
                torch.library.opcheck(overload, args, test_utils="test_aot_dispatch_dynamic")
        else:
            torch.library.opcheck(overload, args)


# ---------------------------------------------------------------------------------------
# The block index, and the backend announcement


def test_block_indexes_are_built_once_per_b_blocks_version():
    """A layer's CSR/CSC index and slot map are built on its first call, reused after, and
    built again when b_blocks is written in place (its version counter moves)."""
    b_blocks = torch.tensor([[0, 0], [1, 1]], dtype=torch.int32)
    first = block_index(b_blocks, 3, 2)
    assert block_index(b_blocks, 3, 2) is first and first.row_ptr.tolist() == [0, 1, 2, 2]
    assert block_slots(b_blocks, 3, 2) is block_slots(b_blocks, 3, 2)
    moved = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    b_blocks.copy_(moved)
    again = block_index(b_blocks, 3, 2)
    assert again.row_ptr.tolist() == [0, 1, 1, 2] and again.col_ptr.tolist() == [0, 1, 2]
    assert block_slots(b_blocks, 3, 2).tolist() == [[-1, 0], [-1, -1], [1, -1]]
    with torch.inference_mode():
        fresh = moved.clone()
    assert block_index(fresh, 3, 2).row_ptr.tolist() == [0, 1, 1, 2]


def test_auto_announces_its_choice_once_per_case(caplog):
    """``resolve("auto", ...)`` logs which backend runs, and why each faster one is off,
    once per (op, device, dtype); an explicit backend is not announced."""
    caplog.set_level(logging.INFO, logger="lori_kernels.backends")
    backends.resolve.cache_clear()
    cpu = torch.device("cpu")
    for _ in range(3):
        chosen = backends.resolve("auto", "lori_linear", cpu, torch.float32)
        backends.resolve("auto", "lori_linear", cpu, torch.float64)
        backends.resolve("reference", "lori_linear", cpu, torch.float32)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"lori_linear on cpu runs on the {chosen!r} backend")
    faster = backends.BACKENDS[: backends.BACKENDS.index(chosen)]
    for name in faster:
        if name != "cuda_ext":  # a backend of another device is not a faster one here
            assert f"{name}: " in messages[0]
    assert messages[1].startswith("lori_linear on cpu runs on")


def test_a_new_backend_is_one_row():
    """Every row of the table names kernels holding every kernel the fused layer needs, and
    has its fused layer registered as ``lori_<name>::forward`` / ``::backward``."""
    assert backends.BACKENDS == tuple(fused.LAYERS)
    for row in backends.TABLE:
        namespace = getattr(torch.ops, f"lori_{row.name}")
        assert namespace.forward.default.name() == f"lori_{row.name}::forward" and namespace.backward.default
        if backends.unavailable_reason(row.name, "lori_linear", "cuda" if GPU else "cpu") is None:
            kernels = backends.kernels(row.name)
            assert all(getattr(kernels, k) is not None for k in LAYER_KERNELS)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.kernels("nope")
    assert lori_kernels.available_backends()[-1] == "reference"
