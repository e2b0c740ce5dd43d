"""The Triton backend: LoRI-RNG bit for bit, and the fused layer against the reference.

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) on
small shapes. The interpreter mishandles bfloat16 (it multiplies raw bf16 bits and
truncates casts), so bfloat16 runs only on a GPU; tests marked ``gpu`` add large shapes.
"""

import random

import pytest
import torch
from helpers import assert_bitwise_equal, assert_error_earned, make_layer, run

import lori_kernels
from lori_kernels import backends, rng
from lori_kernels.saved_memory import saved_bytes

pytest.importorskip("triton")

from lori_kernels.triton_kernels import philox  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def test_a_golden(golden):
    for key in ["a_uniform", "a_rademacher"]:
        case = golden[key]
        a = philox.generate_a_tile(case["seed"], case["d_in"], 0, case["r"], 0, case["d_in"],
                                   dist=case["dist"], device=DEVICE)
        assert_bitwise_equal(a.cpu(), rng.generate_a_tile(case["seed"], case["d_in"], 0, case["r"], 0, case["d_in"], dist=case["dist"]))


@pytest.mark.parametrize("dist", ["uniform", "rademacher"])
def test_a_tiles_match_torch_rng(dist):
    """Aligned (d_in % 4 == 0: one Philox call per four elements) and unaligned tiles,
    seeds >= 2^63, flat indices past 2^32 and 2^63."""
    rand = random.Random(dist)
    cases = [(40, 0, 8, 0, 40), (41, 0, 8, 0, 41), (4096, 3, 5, 128, 100), (2**20 + 3, 4097, 2, 100, 1001),
             (2**31 - 1, 2**32 + 5, 2, 2**31 - 1002, 1001), (2**30, 2**33 + 5, 2, 2**29, 100)]
    for d_in, row0, rows, col0, cols in cases:
        seed = rand.choice([0, 2**64 - 1, rand.getrandbits(64) | 2**63, rand.getrandbits(64)])
        got = philox.generate_a_tile(seed, d_in, row0, rows, col0, cols, dist=dist, device=DEVICE)
        assert_bitwise_equal(got.cpu(), rng.generate_a_tile(seed, d_in, row0, rows, col0, cols, dist=dist))


def test_generate_a_backend():
    a = lori_kernels.generate_a(2**63 + 5, 16, 77, dtype=torch.float16, device=DEVICE, backend="triton")
    assert_bitwise_equal(a.cpu(), rng.generate_a_tile(2**63 + 5, 77, 0, 16, 0, 77).to(torch.float16))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7, 0.9])
@pytest.mark.parametrize("d_in", [40, 41])
def test_dropout_masks_match_torch_rng(p, d_in):
    seed = 0x0123456789ABCDEF
    got = philox.dropout_keep(seed, p, 37, d_in, row0=5, device=DEVICE)
    assert torch.equal(got.cpu(), rng.dropout_keep(seed, p, 37, d_in, row0=5))


def test_dropout_golden(golden):
    for case in golden["dropout"]:
        keep = philox.dropout_keep(case["dropout_seed"], case["p"], case["M"], case["d_in"], device=DEVICE)
        assert keep.to(torch.int64).tolist() == case["keep"]


def forward_backward(layer, x, dy, r, block, dropout_p, backend):
    x = x.clone().requires_grad_()
    b_values = layer["b_values"].clone().requires_grad_()
    y = run(dict(layer, b_values=b_values), x, r, block, dropout_p=dropout_p, backend=backend)
    y.backward(dy)
    return y, x.grad, b_values.grad


def cast(layer, dtype):
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in layer.items()}


SHAPES = [  # (leading dims of x, in, out, r, block, fraction of blocks kept)
    ((37,), 40, 70, 8, (32, 4), 0.5),  # partial last block row, in % 4 == 0
    ((2, 9), 41, 64, 16, (16, 8), 0.5),  # in % 4 != 0: one Philox call per element
    ((1,), 24, 48, 32, (32, 32), 1.0),  # M = 1, dense B (sparsity 0)
    ((0,), 16, 32, 8, (32, 8), 1.0),  # M = 0
    ((20,), 33, 40, 4, (16, 2), 0.9),  # br < 16
    ((9,), 20, 30, 4, (1, 1), 0.5),  # element mask
    ((19,), 32, 64, 16, (32, 16), 0.0),  # sparsity 1.0: every block dropped
]


@pytest.mark.parametrize("lead, inp, out, r, block, keep", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_matches_reference(lead, inp, out, r, block, keep, dropout_p, dtype):
    """Forward, dx and db_values: the kernels' error against float64 math is at most twice
    that of the torch reference in the same precision (STYLE.md's earned tolerance)."""
    layer64 = make_layer(out, inp, r, block, keep=keep, dtype=torch.float64, device=DEVICE)
    x = torch.randn(*lead, inp, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(*lead, out, dtype=torch.float64, device=DEVICE)
    truth = forward_backward(layer64, x, dy, r, block, dropout_p, "reference")
    layer = cast(layer64, dtype)
    plain = forward_backward(layer, x.to(dtype), dy.to(dtype), r, block, dropout_p, "reference")
    ours = forward_backward(layer, x.to(dtype), dy.to(dtype), r, block, dropout_p, "triton")
    for got, same, want in zip(ours, plain, truth):
        assert got.dtype == dtype and got.shape == want.shape
        assert_error_earned(got, same, want)


def test_all_blocks_dropped_is_the_base_linear():
    layer = make_layer(64, 32, 16, (32, 16), keep=0.0, device=DEVICE)
    x = torch.randn(19, 32, device=DEVICE)
    y = run(layer, x, 16, (32, 16), backend="triton")
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer["weight"], layer["bias"]))


def test_noncontiguous_input_and_partial_gradients():
    layer = make_layer(70, 40, 8, (32, 4), keep=0.5, device=DEVICE)
    x = torch.randn(40, 12, device=DEVICE).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(run(layer, x, 8, (32, 4), backend="triton"), run(layer, x, 8, (32, 4), backend="reference"))
    b_values = layer["b_values"].clone().requires_grad_()
    run(dict(layer, b_values=b_values), x, 8, (32, 4), backend="triton").sum().backward()
    want = layer["b_values"].clone().requires_grad_()
    run(dict(layer, b_values=want), x, 8, (32, 4), backend="reference").sum().backward()
    torch.testing.assert_close(b_values.grad, want.grad)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_saves_only_h(dropout_p):
    layer = make_layer(64, 32, 16, (32, 16), keep=0.5, device=DEVICE)
    x = torch.randn(40, 32, device=DEVICE, requires_grad=True)
    b_values = layer["b_values"].clone().requires_grad_()
    frozen = (layer["weight"], layer["bias"], b_values, layer["b_blocks"])
    base = saved_bytes(lambda: torch.nn.functional.linear(x, layer["weight"], layer["bias"]), frozen)
    ours = saved_bytes(lambda: run(dict(layer, b_values=b_values), x, 16, (32, 16), dropout_p=dropout_p, backend="triton"), frozen)
    assert ours == base + 40 * 16 * 4


def test_torch_compile_fullgraph_and_checkpointing():
    """The op traces with fullgraph=True (fake + autograd registrations) and recomputes
    exactly under activation checkpointing (A and D come from seeds)."""
    layer = make_layer(70, 40, 8, (32, 4), keep=0.5, device=DEVICE)
    x = torch.randn(2, 7, 40, device=DEVICE)

    def f(x, b_values):
        return run(dict(layer, b_values=b_values), x, 8, (32, 4), dropout_p=0.25, backend="triton")

    def grads(fn):
        xx, bv = x.clone().requires_grad_(), layer["b_values"].clone().requires_grad_()
        y = fn(xx, bv)
        y.square().sum().backward()
        return y, xx.grad, bv.grad

    eager = grads(f)
    compiled = grads(torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor"))
    checkpointed = grads(lambda xx, bv: torch.utils.checkpoint.checkpoint(f, xx, bv, use_reentrant=False))
    for other in (compiled, checkpointed):
        for a, b in zip(eager, other):
            torch.testing.assert_close(a, b)


def test_opcheck():
    layer = make_layer(70, 40, 8, (32, 4), keep=0.5, device=DEVICE)
    x = torch.randn(20, 40, device=DEVICE, requires_grad=True)
    b_values = layer["b_values"].clone().requires_grad_()
    args = (x, layer["weight"], layer["bias"], b_values, layer["b_blocks"], -3, 8, 2.0, "uniform", 0.1, 5)
    torch.library.opcheck(torch.ops.lori_triton.forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_backend_selection(monkeypatch):
    assert "triton" in lori_kernels.available_backends()
    # On the CPU, auto never picks the interpreter; on a GPU it picks Triton.
    assert backends.resolve("auto", "lori_linear", torch.device(DEVICE), torch.float32) == ("triton" if DEVICE == "cuda" else "reference")
    assert backends.resolve("auto", "lori_linear", torch.device(DEVICE), torch.float64) == "reference"
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        backends.resolve("triton", "lori_linear", torch.device(DEVICE), torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton runs on CUDA devices"):
        backends.resolve("triton", "lori_linear", torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("inp, out, r", [(4096, 4096, 32), (4096, 14336, 16), (14336, 4096, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_shapes_gpu(inp, out, r, dtype):
    m, block = 2048, (32, min(r, 32))
    layer64 = make_layer(out, inp, r, block, keep=0.1, dtype=torch.float64, device="cuda")
    x = torch.randn(m, inp, dtype=torch.float64, device="cuda")
    dy = torch.randn(m, out, dtype=torch.float64, device="cuda")
    truth = forward_backward(layer64, x, dy, r, block, 0.05, "reference")
    layer = cast(layer64, dtype)
    plain = forward_backward(layer, x.to(dtype), dy.to(dtype), r, block, 0.05, "reference")
    ours = forward_backward(layer, x.to(dtype), dy.to(dtype), r, block, 0.05, "triton")
    for got, same, want in zip(ours, plain, truth):
        assert_error_earned(got, same, want)
