"""The reference backend of lori_linear: math, gradients, dtypes, shapes, memory, errors."""

import pytest
import torch
import torch.nn.functional as F
from helpers import adapter_alone, assert_error_earned, make_layer, run

import lori_kernels
from lori_kernels import block_sparse as bs
from lori_kernels import rng
from lori_kernels.testing import saved_bytes


def dense_lora(layer, x, r, scaling=2.0, dropout_p=0.0, dropout_seed=11):
    """PEFT's LoRA computation with A materialised and B scattered dense."""
    inp = x.shape[-1]
    a = lori_kernels.generate_a(layer["seed"], r, inp, dtype=x.dtype)
    xd = x
    if dropout_p:
        x2 = x.reshape(-1, inp)
        keep = rng.dropout_keep(dropout_seed, dropout_p, x2.shape[0], inp)
        xd = (x2 * keep.to(x.dtype) * rng.dropout_scale(dropout_p)).reshape(x.shape)
    return F.linear(x, layer["weight"], layer["bias"]) + ((xd @ a.t()) @ layer["b_dense"].t()) * scaling


SHAPES = [  # (leading dims of x, in, out, r, block)
    ((7,), 48, 64, 8, (32, 4)),
    ((2, 3), 50, 70, 8, (32, 8)),  # out not a multiple of bo
    ((1,), 33, 17, 4, (16, 2)),  # M = 1, odd in/out
    ((0,), 16, 32, 4, (32, 4)),  # M = 0
    ((2, 0, 3), 16, 32, 4, (32, 4)),  # empty leading dim
    ((5,), 12, 9, 6, (1, 1)),  # element mask
]


@pytest.mark.parametrize("lead, inp, out, r, block", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_dense_lora_fp32(lead, inp, out, r, block, dropout_p):
    layer = make_layer(out, inp, r, block, keep=0.6)
    x = torch.randn(*lead, inp)
    y = run(layer, x, r, block, dropout_p=dropout_p)
    assert y.shape == (*lead, out)
    torch.testing.assert_close(y, dense_lora(layer, x, r, dropout_p=dropout_p))


@pytest.mark.parametrize(
    "lead, inp, out, r, block",
    [((3,), 12, 20, 4, (8, 2)), ((2, 2), 10, 13, 4, (8, 4)), ((1,), 5, 3, 2, (1, 1))],
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
@pytest.mark.parametrize("base", ["bias", "no bias", "adapter alone"])
def test_gradcheck_float64(lead, inp, out, r, block, dropout_p, base):
    layer = make_layer(out, inp, r, block, keep=0.7, dtype=torch.float64, bias=base == "bias")
    if base == "adapter alone":
        layer = adapter_alone(layer)
    x = torch.randn(*lead, inp, dtype=torch.float64, requires_grad=True)
    b_values = layer["b_values"].clone().requires_grad_()

    def f(x, b_values):
        return run(dict(layer, b_values=b_values), x, r, block, dropout_p=dropout_p)

    assert torch.autograd.gradcheck(f, (x, b_values))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_gradients_match_dense_autograd(dropout_p):
    """dx and dB against autograd through the dense LoRA composition; dB restricted to
    the kept blocks, with zero in the padded rows of the partial block row."""
    inp, out, r, block = 40, 70, 8, (32, 4)
    layer = make_layer(out, inp, r, block, keep=0.5)
    x = torch.randn(3, 5, inp, requires_grad=True)
    b_values = layer["b_values"].clone().requires_grad_()
    dy = torch.randn(3, 5, out)
    run(dict(layer, b_values=b_values), x, r, block, dropout_p=dropout_p).backward(dy)

    x2 = x.detach().clone().requires_grad_()
    b_dense = layer["b_dense"].clone().requires_grad_()
    dense_lora(dict(layer, b_dense=b_dense), x2, r, dropout_p=dropout_p).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b_values.grad, bs.gather_blocks(b_dense.grad, layer["b_blocks"], block))
    mask = bs.mask_from_blocks(layer["b_blocks"], out, r, block)
    torch.testing.assert_close(bs.scatter_blocks(b_values.grad, layer["b_blocks"], out, r), b_dense.grad * mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_low_precision_error_is_torchs(dtype, dropout_p):
    """In bf16/fp16/fp32 the reference's error against float64 math is that of the plain
    torch LoRA computation in the same precision (forward and both gradients)."""
    inp, out, r, block = 96, 80, 16, (32, 16)
    layer64 = make_layer(out, inp, r, block, keep=0.5, dtype=torch.float64)
    layer = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in layer64.items()}
    x64 = torch.randn(4, 9, inp, dtype=torch.float64)
    dy64 = torch.randn(4, 9, out, dtype=torch.float64)

    def ours(lay, x, dy):
        x, b_values = x.clone().requires_grad_(), lay["b_values"].clone().requires_grad_()
        y = run(dict(lay, b_values=b_values), x, r, block, dropout_p=dropout_p)
        y.backward(dy)
        return y, x.grad, b_values.grad

    def dense(lay, x, dy):
        x, b_dense = x.clone().requires_grad_(), lay["b_dense"].clone().requires_grad_()
        y = dense_lora(dict(lay, b_dense=b_dense), x, r, dropout_p=dropout_p)
        y.backward(dy)
        return y, x.grad, bs.gather_blocks(b_dense.grad, lay["b_blocks"], block)

    truth = dense(layer64, x64, dy64)
    got_all = ours(layer, x64.to(dtype), dy64.to(dtype))
    plain = dense(layer, x64.to(dtype), dy64.to(dtype))
    for got, same, want in zip(got_all, plain, truth, strict=True):
        assert got.dtype == dtype
        assert_error_earned(got, same, want)


def test_matches_peft_lora_layer():
    """Same outputs and gradients as PEFT's LoRA layer holding our A and dense B."""
    peft = pytest.importorskip("peft")
    inp, out, r, alpha, block = 48, 64, 8, 16, (16, 4)
    layer = make_layer(out, inp, r, block, keep=0.5)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(inp, out))
    with torch.no_grad():
        base.proj.weight.copy_(layer["weight"])
        base.proj.bias.copy_(layer["bias"])
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(lori_kernels.generate_a(layer["seed"], r, inp))
        lora.lora_B["default"].weight.copy_(layer["b_dense"])
    x = torch.randn(6, inp, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    b_values = layer["b_values"].clone().requires_grad_()
    dy = torch.randn(6, out)

    model(x_ref).backward(dy)
    run(dict(layer, b_values=b_values), x, r, block, scaling=alpha / r).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    peft_db = lora.lora_B["default"].weight.grad
    torch.testing.assert_close(b_values.grad, bs.gather_blocks(peft_db, layer["b_blocks"], block))


def test_noncontiguous_input_and_no_grad_paths():
    inp, out, r, block = 32, 32, 4, (32, 4)
    layer = make_layer(out, inp, r, block)
    x = torch.randn(inp, 10).t()  # non-contiguous [10, inp]
    assert not x.is_contiguous()
    torch.testing.assert_close(run(layer, x, r, block), dense_lora(layer, x, r))
    # Only b_values requires grad (x is data): dB without dx.
    b_values = layer["b_values"].clone().requires_grad_()
    run(dict(layer, b_values=b_values), x, r, block).sum().backward()
    assert b_values.grad is not None
    # Only x requires grad (B frozen, e.g. continual learning on another adapter).
    x = x.clone().requires_grad_()
    run(layer, x, r, block).sum().backward()
    assert x.grad.shape == x.shape


def test_all_blocks_dropped_is_the_base_linear():
    inp, out, r, block = 24, 40, 8, (32, 8)
    layer = make_layer(out, inp, r, block, keep=0.0)
    assert layer["b_blocks"].shape[0] == 0
    x = torch.randn(5, inp, requires_grad=True)
    y = run(layer, x, r, block)
    torch.testing.assert_close(y, F.linear(x, layer["weight"], layer["bias"]))
    y.sum().backward()


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_only_h_for_backward(dropout_p, dtype):
    """Saved for backward: M*r elements beyond what the frozen base linear saves, with or
    without dropout (PEFT with dropout also keeps the M*in dropped input)."""
    m, inp, out, r, block = 64, 128, 96, 16, (32, 16)
    layer = make_layer(out, inp, r, block, keep=0.5, dtype=dtype)
    x = torch.randn(m, inp, dtype=dtype, requires_grad=True)
    b_values = layer["b_values"].clone().requires_grad_()
    frozen = (layer["weight"], layer["bias"], b_values, layer["b_blocks"])
    base = saved_bytes(lambda: F.linear(x, layer["weight"], layer["bias"]), frozen)
    ours = saved_bytes(lambda: run(dict(layer, b_values=b_values), x, r, block, dropout_p=dropout_p), frozen)
    assert ours == base + m * r * x.element_size()


def test_dropout_seed_may_be_a_tensor():
    """``dropout_seed`` as a one-element int64 tensor (how LoRILinear passes it, so that
    torch.compile does not guard on it) draws the mask of its value, in forward and backward."""
    layer = make_layer(40, 24, 8, (16, 4), keep=0.6)
    outputs = []
    for dropout_seed in (2**63 + 5, torch.tensor(rng.to_int64(2**63 + 5))):
        x = torch.randn(6, 24, generator=torch.Generator().manual_seed(0), requires_grad=True)
        b_values = layer["b_values"].clone().requires_grad_()
        y = run(dict(layer, b_values=b_values), x, 8, (16, 4), dropout_p=0.4, dropout_seed=dropout_seed)
        y.square().sum().backward()
        outputs.append((y, x.grad, b_values.grad))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("dy_requires_grad", [False, True])
def test_double_backward_is_refused(dy_requires_grad):
    """Second-order gradients raise an error that says so, whether or not the incoming
    gradient requires grad (a plain ``y.sum()`` or a loss of ``y``)."""
    layer = make_layer(32, 16, 4, (32, 4))
    x = torch.randn(3, 16, requires_grad=True)
    y = run(layer, x, 4, (32, 4), dropout_p=0.2)
    dy = torch.randn_like(y, requires_grad=dy_requires_grad)
    (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    with pytest.raises(RuntimeError, match=r"lori_linear does not support double backward \(second-order gradients\)"):
        gx.sum().backward()


def test_double_backward_through_the_custom_op_is_refused():
    """The custom op that torch.compile traces refuses second-order gradients too."""
    layer = make_layer(32, 16, 4, (32, 4))
    x = torch.randn(3, 16, requires_grad=True)
    b_values = layer["b_values"].clone().requires_grad_()
    args = (layer["weight"], layer["bias"], b_values, layer["b_blocks"], rng.to_int64(layer["seed"]), 4, 32, 2.0)
    y, _ = torch.ops.lori_reference.forward(x, *args, "uniform", 0.2, torch.tensor(11))
    (gb,) = torch.autograd.grad(y.sum(), b_values, create_graph=True)
    with pytest.raises(RuntimeError, match="lori_linear does not support double backward"):
        gb.sum().backward()


def bad(**changes):
    layer = make_layer(70, 48, 8, (32, 4), keep=0.5)
    args = dict(
        x=torch.randn(3, 48),
        weight=layer["weight"],
        bias=layer["bias"],
        seed=layer["seed"],
        b_values=layer["b_values"],
        b_blocks=layer["b_blocks"],
        r=8,
        block=(32, 4),
        scaling=2.0,
        backend="reference",
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, error, message",
    [
        (bad(x=torch.randn(3, 47)), ValueError, "x has 47 features"),
        (
            bad(x=torch.randn(3, 48, dtype=torch.float64)),
            TypeError,
            "weight has dtype torch.float32 but x has torch.float64",
        ),
        (bad(x=torch.randint(0, 3, (3, 48))), TypeError, "x must be float16, bfloat16"),
        (bad(weight=None), ValueError, "without a weight .* pass bias=None"),
        (bad(weight=None, bias=None), ValueError, "out_features must be a positive int, got None"),
        (bad(weight=None, bias=None, out_features=0), ValueError, "out_features must be a positive int, got 0"),
        (bad(out_features=70), ValueError, "out_features is given only without a weight"),
        (bad(weight=torch.randn(70, 48, device="meta")), ValueError, "weight is on meta"),
        (bad(weight=torch.randn(70, 48, requires_grad=True)), ValueError, "weight requires grad"),
        (bad(weight=torch.randn(70, 48, 1)), ValueError, "weight must be 2-D"),
        (bad(bias=torch.randn(69)), ValueError, r"bias must have shape \[70\]"),
        (bad(bias=torch.randn(70, dtype=torch.float16)), TypeError, "bias has dtype"),
        (
            bad(b_values=torch.randn(1, 32, 4, dtype=torch.float16), b_blocks=torch.zeros(1, 2, dtype=torch.int32)),
            TypeError,
            "b_values has dtype",
        ),
        (
            bad(b_blocks=torch.tensor([[0, 0], [3, 1]], dtype=torch.int32), b_values=torch.randn(2, 32, 4)),
            ValueError,
            r"b_blocks\[1\] = \(3, 1\) is out of range",
        ),
        (
            bad(b_blocks=torch.tensor([[1, 1], [0, 0]], dtype=torch.int32), b_values=torch.randn(2, 32, 4)),
            ValueError,
            "not sorted",
        ),
        (bad(b_values=torch.randn(2, 32, 4), b_blocks=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "int32"),
        (bad(block=(32, 3)), ValueError, "br=3 must divide r=8"),
        (bad(dist="gauss"), ValueError, "dist must be one of"),
        (bad(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (bad(scaling=float("nan")), ValueError, "scaling must be a finite number"),
        (bad(seed=2**64), ValueError, "outside"),
        (bad(dropout_p=0.1, dropout_seed=torch.tensor([1, 2])), ValueError, "dropout_seed tensor must hold one int64"),
        (bad(dropout_p=0.1, dropout_seed=torch.tensor(1.0)), ValueError, "dropout_seed tensor must hold one int64"),
        (bad(backend="nope"), ValueError, "unknown backend"),
    ],
)
def test_bad_input_is_named(args, error, message):
    x = args.pop("x")
    with pytest.raises(error, match=message):
        lori_kernels.lori_linear(
            x,
            args.pop("weight"),
            args.pop("bias"),
            args.pop("seed"),
            args.pop("b_values"),
            args.pop("b_blocks"),
            **args,
        )
