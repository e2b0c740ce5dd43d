"""The fused layer of every fast backend (Triton, Triton with its own GEMMs, the C++ CPU
ops, the CUDA ops) against the reference: forward and both gradients, odd shapes, dropout,
sparsity 0 to 1, what is saved for backward, torch.compile and activation checkpointing.

Tolerances are earned (STYLE.md): a backend's error against float64 math is at most twice
that of the torch reference in the same precision, in float32, float16 and bfloat16. Triton
runs in its interpreter without a GPU; conftest.py makes the interpreter's bfloat16 dots and
casts compute as a GPU's do (a test-only shim: test_kernel_safety.py says why).
"""

import pytest
import torch
from helpers import adapter_alone, assert_error_earned, make_layer, run

import lori_kernels
from lori_kernels.testing import saved_bytes

GPU = torch.cuda.is_available()
CASES = [  # (backend, device)
    pytest.param(("triton", "cuda" if GPU else "cpu"), id="triton"),
    pytest.param(("triton_epilogue", "cuda" if GPU else "cpu"), id="triton_epilogue"),
    pytest.param(("cpu_ext", "cpu"), id="cpu_ext"),
    pytest.param(("cuda_ext", "cuda"), id="cuda_ext", marks=pytest.mark.gpu),
]


@pytest.fixture(params=CASES)
def backend(request):
    """(backend, device), skipped where the backend cannot run."""
    name, device = request.param
    if name.endswith("_ext"):
        request.getfixturevalue("ext")  # skips (or fails under LORI_REQUIRE_EXT) without a build
    else:
        pytest.importorskip("triton")
    if name not in lori_kernels.available_backends():
        pytest.skip(f"{name} cannot run here")
    return name, device


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def forward_backward(layer, x, dy, r, block, dropout_p, backend):
    x = x.clone().requires_grad_()
    b_values = layer["b_values"].clone().requires_grad_()
    y = run(dict(layer, b_values=b_values), x, r, block, dropout_p=dropout_p, backend=backend)
    y.backward(dy)
    return y, x.grad, b_values.grad


def cast(layer, dtype):
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in layer.items()}


def check_against_reference(backend, device, lead, inp, out, r, block, keep, dropout_p, dtype, alone=False):
    layer64 = make_layer(out, inp, r, block, keep=keep, dtype=torch.float64, device=device)
    if alone:
        layer64 = adapter_alone(layer64)
    x = torch.randn(*lead, inp, dtype=torch.float64, device=device)
    dy = torch.randn(*lead, out, dtype=torch.float64, device=device)
    truth = forward_backward(layer64, x, dy, r, block, dropout_p, "reference")
    layer = cast(layer64, dtype)
    plain = forward_backward(layer, x.to(dtype), dy.to(dtype), r, block, dropout_p, "reference")
    ours = forward_backward(layer, x.to(dtype), dy.to(dtype), r, block, dropout_p, backend)
    for got, same, want in zip(ours, plain, truth, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        assert_error_earned(got, same, want)


SHAPES = [  # (leading dims of x, in, out, r, block, fraction of blocks kept)
    ((37,), 40, 70, 8, (32, 4), 0.5),  # partial last block row, in % 4 == 0
    ((2, 9), 41, 64, 16, (16, 8), 0.5),  # in % 4 != 0: one Philox call per element
    ((1,), 24, 48, 32, (32, 32), 1.0),  # M = 1, dense B (sparsity 0)
    ((0,), 16, 32, 8, (32, 8), 1.0),  # M = 0
    ((20,), 33, 40, 4, (16, 2), 0.9),  # br < 16
    ((9,), 20, 30, 4, (1, 1), 0.5),  # element mask
    ((19,), 32, 64, 16, (32, 16), 0.0),  # sparsity 1.0: every block dropped
    ((33,), 36, 256, 32, (16, 16), 0.1),  # sparsity 0.9 over many blocks
    ((21,), 72, 64, 16, (16, 8), 0.25),  # kept rows under half of in: triton_epilogue's linear_shrink
    ((2, 7), 75, 40, 8, (8, 4), 0.2),  # the same with in % 4 != 0
]


@pytest.mark.parametrize("lead, inp, out, r, block, keep", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_reference(backend, lead, inp, out, r, block, keep, dropout_p):
    name, device = backend
    for dtype in DTYPES:
        check_against_reference(name, device, lead, inp, out, r, block, keep, dropout_p, dtype)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_adapter_alone_matches_reference(backend, dropout_p):
    """Without a weight (a quantized base runs its own forward): the adapter's part alone."""
    name, device = backend
    for dtype in DTYPES:
        check_against_reference(name, device, (2, 9), 41, 70, 16, (16, 8), 0.5, dropout_p, dtype, alone=True)


def test_all_blocks_dropped_is_the_base_linear(backend):
    name, device = backend
    layer = make_layer(64, 32, 16, (32, 16), keep=0.0, device=device)
    x = torch.randn(19, 32, device=device)
    torch.testing.assert_close(
        run(layer, x, 16, (32, 16), backend=name), torch.nn.functional.linear(x, layer["weight"], layer["bias"])
    )


def test_noncontiguous_input_and_partial_gradients(backend):
    name, device = backend
    layer = make_layer(70, 40, 8, (32, 4), keep=0.5, device=device)
    x = torch.randn(40, 12, device=device).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(run(layer, x, 8, (32, 4), backend=name), run(layer, x, 8, (32, 4)))
    got, want = (layer["b_values"].clone().requires_grad_() for _ in range(2))
    run(dict(layer, b_values=got), x, 8, (32, 4), backend=name).sum().backward()
    run(dict(layer, b_values=want), x, 8, (32, 4)).sum().backward()
    torch.testing.assert_close(got.grad, want.grad)


def test_eager_call_inspects_no_signature(backend, monkeypatch):
    """An eager call, forward and backward, runs no ``inspect.signature``: an autograd.Function
    with a ``setup_context`` has torch bind each call's arguments by it (about 80 µs a layer)."""
    import inspect

    name, device = backend
    layer = make_layer(64, 32, 16, (32, 16), keep=0.5, device=device)
    x = torch.randn(8, 32, device=device, requires_grad=True)
    run(layer, x, 16, (32, 16), dropout_p=0.2, backend=name).sum().backward()  # resolution, imports, tuning

    def refuse(*args, **kwargs):
        raise AssertionError("inspect.signature ran in an eager call")

    monkeypatch.setattr(inspect, "signature", refuse)
    run(layer, x, 16, (32, 16), dropout_p=0.2, backend=name).sum().backward()


def test_inference_runs_no_autograd_function(backend, monkeypatch):
    """Where nothing is differentiated (no grad mode, or no input that requires grad) an eager
    call runs the composition alone, with the result of the autograd.Function's."""
    from lori_kernels import fused

    name, device = backend
    layer = make_layer(64, 32, 16, (32, 16), keep=0.5, device=device)
    x = torch.randn(8, 32, device=device)
    trained = dict(layer, b_values=layer["b_values"].clone().requires_grad_())
    want = run(trained, x, 16, (32, 16), backend=name).detach()

    def refuse(*args):
        raise AssertionError("an autograd.Function ran with nothing to differentiate")

    monkeypatch.setattr(fused.EagerLayer, "apply", refuse)
    with torch.no_grad():
        assert torch.equal(run(trained, x, 16, (32, 16), backend=name), want)
    assert torch.equal(run(layer, x, 16, (32, 16), backend=name), want)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_saves_only_h(backend, dropout_p):
    name, device = backend
    layer = make_layer(64, 32, 16, (32, 16), keep=0.5, device=device)
    x = torch.randn(40, 32, device=device, requires_grad=True)
    b_values = layer["b_values"].clone().requires_grad_()
    frozen = (layer["weight"], layer["bias"], b_values, layer["b_blocks"])
    base = saved_bytes(lambda: torch.nn.functional.linear(x, layer["weight"], layer["bias"]), frozen)
    ours = saved_bytes(
        lambda: run(dict(layer, b_values=b_values), x, 16, (32, 16), dropout_p=dropout_p, backend=name), frozen
    )
    assert ours == base + 40 * 16 * 4


@pytest.mark.parametrize("alone", [False, True], ids=["layer", "adapter_alone"])
def test_torch_compile_fullgraph_and_checkpointing(backend, alone):
    """The op traces with fullgraph=True (fake + autograd registrations) and recomputes
    exactly under activation checkpointing (A and D come from seeds)."""
    name, device = backend
    layer = make_layer(70, 40, 8, (32, 4), keep=0.5, device=device)
    layer = adapter_alone(layer) if alone else layer
    x = torch.randn(2, 7, 40, device=device)

    def f(x, b_values):
        return run(dict(layer, b_values=b_values), x, 8, (32, 4), dropout_p=0.25, backend=name)

    def grads(fn):
        xx, bv = x.clone().requires_grad_(), layer["b_values"].clone().requires_grad_()
        y = fn(xx, bv)
        y.square().sum().backward()
        return y, xx.grad, bv.grad

    eager = grads(f)
    compiled = grads(torch.compile(f, fullgraph=True, backend="inductor" if GPU else "aot_eager"))
    checkpointed = grads(lambda xx, bv: torch.utils.checkpoint.checkpoint(f, xx, bv, use_reentrant=False))
    for other in (compiled, checkpointed):
        for a, b in zip(eager, other, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("inp, out, r", [(4096, 4096, 32), (4096, 14336, 16), (14336, 4096, 64)])
def test_llama_shapes_gpu(backend, inp, out, r):
    name, device = backend
    for dtype in (torch.bfloat16, torch.float16):
        check_against_reference(name, device, (2048,), inp, out, r, (32, min(r, 32)), 0.1, 0.05, dtype)
