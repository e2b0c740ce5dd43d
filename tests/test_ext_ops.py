"""The compiled layer ops (torch.ops.lori.shrink, shrink_backward, expand_,
expand_backward, sddmm): exact RNG, math on odd shapes, and errors that name the argument.
The expand ops are called through the extension's kernel set, which passes them the cached
index of b_blocks. The composed layer is tested in test_fused_layer.py, every op's
registration (opcheck) and each kernel against its twin in test_kernels.py."""

import pytest
import torch
from helpers import assert_bitwise_equal, assert_error_earned, devices, make_layer

from lori_kernels import backends, rng
from lori_kernels import block_sparse as bs

SEED, DROPOUT_SEED = -12345, 2**62 + 7  # int64 as in the schemas (negative: a seed >= 2^63)


@pytest.fixture(params=devices())
def device(request):
    return request.param


def layer_args(device, m=21, inp=41, out=70, r=8, block=(32, 4), keep=0.5, dtype=torch.float32):
    layer = make_layer(out, inp, r, block, keep=keep, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, inp, generator=g).to(dtype).to(device)
    dy = torch.randn(m, out, generator=g).to(dtype).to(device)
    return layer, x, dy


@pytest.mark.parametrize("inp", [40, 41])
def test_a_is_bit_exact_through_shrink_and_its_backward(ext, device, inp):
    """x = I gives h = A.T, and g = I gives dx = A, exactly in fp32: the kernels use
    LoRI-RNG's A bit for bit."""
    for dist in ["uniform", "rademacher"]:
        a = rng.generate_a_tile(SEED, inp, 0, 8, 0, inp, dist=dist, device=device)
        h = ext.shrink(torch.eye(inp, device=device), SEED, 8, dist, 0.0, 0)
        assert_bitwise_equal(h.t().contiguous(), a)
        assert_bitwise_equal(ext.shrink_backward(torch.eye(8, device=device), SEED, inp, dist, 0.0, 0), a)


@pytest.mark.parametrize("p", [0.1, 0.7, 0.9])
def test_dropout_mask_is_the_reference_mask(ext, device, p):
    """Where the dropout mask drops, shrink_backward gives exactly zero; elsewhere g @ A
    times 1/(1-p), which is never zero here."""
    m, inp = 19, 41
    keep = rng.dropout_keep(DROPOUT_SEED, p, m, inp, device=device)
    g = torch.randn(m, 8, device=device)
    dx = ext.shrink_backward(g, SEED, inp, "uniform", p, DROPOUT_SEED)
    assert torch.equal(dx != 0, keep)
    a = rng.generate_a_tile(SEED, inp, 0, 8, 0, inp, device=device)
    torch.testing.assert_close(dx, (g @ a) * keep * rng.dropout_scale(p))


@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("block", [(32, 4), (16, 8), (1, 1), (64, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_block_ops_match_dense_math(ext, device, keep, block, dtype):
    """expand_, expand_backward and sddmm against dense B math (the sparse and dense paths:
    tiny blocks and B kept at least half go dense), with earned tolerances: the error against
    float64 math at most twice that of the same dense math in torch, in the same dtype."""
    layer, x, dy = layer_args(device, keep=keep, block=block, dtype=dtype)
    out, r = 70, 8
    bv, bb, b = layer["b_values"], layer["b_blocks"], layer["b_dense"]
    h = torch.randn(x.shape[0], r, dtype=dtype, device=device)
    y = torch.randn(x.shape[0], out, dtype=dtype, device=device)
    want, torch_y = y.double() + 1.5 * h.double() @ b.double().t(), y + 1.5 * h @ b.t()
    kernels = backends.kernels("cpu_ext")
    kernels.expand_(y, h, bv, bb, 1.5)
    assert_error_earned(y, torch_y, want)
    g = kernels.expand_backward(dy, bv, bb, r, 1.5)
    assert_error_earned(g, 1.5 * dy @ b, 1.5 * dy.double() @ b.double())
    db = ext.sddmm(dy, h, bb, *block, 1.5)
    torch_db = bs.gather_blocks(1.5 * dy.t() @ h, bb, block)
    assert_error_earned(db, torch_db, bs.gather_blocks(1.5 * dy.double().t() @ h.double(), bb, block))


def bad_calls(ext):
    layer, x, dy = layer_args("cpu")
    bv, bb = layer["b_values"], layer["b_blocks"]
    h = torch.zeros(x.shape[0], 8)
    kernels = backends.kernels("cpu_ext")
    return [
        (lambda: ext.shrink(x[0], SEED, 8, "uniform", 0.0, 0), "shrink: x must be a 2-D tensor"),
        (lambda: ext.shrink(x.t(), SEED, 8, "uniform", 0.0, 0), "shrink: x must be contiguous"),
        (lambda: ext.shrink(x.int(), SEED, 8, "uniform", 0.0, 0), "shrink: x must be a floating-point"),
        (lambda: ext.shrink(x, SEED, 0, "uniform", 0.0, 0), "shrink: r must be positive"),
        (lambda: ext.shrink(x, SEED, 8, "normal", 0.0, 0), "shrink: dist must be"),
        (lambda: ext.shrink(x, SEED, 8, "uniform", 1.0, 0), r"shrink: dropout_p must be in \[0, 1\)"),
        (lambda: ext.shrink_backward(h.t(), SEED, 8, "uniform", 0.0, 0), "shrink_backward: g must be contiguous"),
        (lambda: ext.shrink_backward(h.int(), SEED, 8, "uniform", 0.0, 0), "shrink_backward: g must be a floating"),
        (lambda: ext.shrink_backward(h, SEED, 0, "uniform", 0.0, 0), "shrink_backward: d_in must be positive"),
        (
            lambda: ext.shrink_backward(h, SEED, 8, "uniform", -0.1, 0),
            r"shrink_backward: dropout_p must be in \[0, 1\)",
        ),
        (lambda: kernels.expand_(dy.clone(), h, bv, bb.long(), 1.0), "expand_: b_blocks must be an int32"),
        (
            lambda: kernels.expand_(dy.clone(), h, bv[:1], bb, 1.0),
            f"expand_: b_blocks has {bb.shape[0]} blocks but b_values has 1",
        ),
        (lambda: kernels.expand_(dy.clone(), h, bv.half(), bb, 1.0), "expand_: b_values has dtype"),
        (
            lambda: kernels.expand_(
                dy.clone(), h, torch.zeros(3, 32, 4), torch.tensor([[0, 0], [3, 0], [4, 1]], dtype=torch.int32), 1.0
            ),
            r"expand_: b_blocks\[1\] = \(3, 0\) is out of range: B has 3 block rows and 2 block columns",
        ),
        (
            lambda: kernels.expand_backward(dy, bv, bb.flip(0).contiguous(), 8, 1.0),
            "expand_backward: b_blocks must be sorted",
        ),
        (lambda: kernels.expand_backward(dy, bv, bb, 6, 1.0), "expand_backward: block .* does not fit r=6"),
        (lambda: ext.sddmm(dy, h, bb.t(), 32, 4, 1.0), "sddmm: b_blocks must be an int32 tensor \\[nnz, 2\\]"),
    ]


def test_errors_name_the_op_and_argument(ext):
    for call, message in bad_calls(ext):
        with pytest.raises(RuntimeError, match=message):
            call()
