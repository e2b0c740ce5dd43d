"""``lori_kernels.lori_linear_multi``: each row as ``lori_linear`` with its adapter alone, on
every backend; one shrink per seed group; each backend's segmented expand against its torch twin,
and the extension's ``lori::expand_segments_`` under opcheck and refusing wrong arguments."""

import numpy as np
import pytest
import torch
from helpers import assert_error_earned, make_layer

import lori_kernels
from lori_kernels import AdapterSpec, backends, checks, multi, reference

OUT, IN = 40, 24  # 40 rows of B: a partial last block row with bo = 16 or 32
SEED = 2**64 - 7
# (seed, r, block, scaling, kept fraction): 0-2 share A (one shrink), 2 with other blocks;
# 3 another seed; 4 keeps no block at all.
KINDS = [
    (SEED, 16, (16, 8), 0.5, 0.6),
    (SEED, 16, (16, 8), 2.0, 0.6),
    (SEED, 16, (32, 16), 1.0, 1.0),
    (SEED + 1, 8, (16, 8), 1.5, 0.6),
    (SEED, 16, (16, 8), 1.0, 0.0),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny ops run far slower with two on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapters(dtype=torch.float32, kinds=KINDS):
    specs = []
    for k, (seed, r, block, scaling, keep) in enumerate(kinds):
        layer = make_layer(OUT, IN, r, block, keep=keep, dtype=dtype, seed=k + 1)
        specs.append(AdapterSpec(seed, layer["b_values"], layer["b_blocks"], r, block, scaling))
    return specs


def base(dtype=torch.float32):
    layer = make_layer(OUT, IN, 16, (16, 8), dtype=dtype)
    return layer["weight"], layer["bias"]


def alone(x, weight, bias, spec, backend):
    """Row by row: ``lori_linear`` with the row's adapter (None: the base linear)."""
    if spec is None:
        return torch.nn.functional.linear(x, weight, bias)
    return lori_kernels.lori_linear(
        x,
        weight,
        bias,
        spec.seed,
        spec.b_values,
        spec.b_blocks,
        r=spec.r,
        block=spec.block,
        scaling=spec.scaling,
        backend=backend,
        a=spec.a,
    )


def backend_or_skip(backend):
    if backend not in lori_kernels.available_backends("lori_linear_multi"):
        pytest.skip(f"the {backend} backend is not available here")
    return backend


@pytest.mark.parametrize("backend", ["reference", "cpu_ext", "triton"])
@pytest.mark.parametrize("shape", [(7, 3), (1, 1), (5,)], ids=["rows-tokens", "one", "2d"])
def test_each_row_as_its_adapter_alone(backend, shape):
    backend_or_skip(backend)
    weight, bias = base()
    specs = adapters()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, IN, generator=g)
    rows = [(i * 2) % (len(specs) + 1) - 1 for i in range(shape[0])]  # every adapter, and -1 (the base)
    y = lori_kernels.lori_linear_multi(x, weight, bias, rows, specs, backend=backend)
    assert y.shape == (*shape, OUT)
    for i, a in enumerate(rows):
        want = alone(x[i], weight, bias, specs[a] if a >= 0 else None, backend)
        torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-5)


def test_stored_a_adapters_and_packed_reuse():
    weight, bias = base()
    specs = adapters(kinds=KINDS[:2])
    a = torch.randn(16, IN, generator=torch.Generator().manual_seed(3)) / IN**0.5
    specs.append(specs[0]._replace(seed=None, a=a))
    packed = lori_kernels.pack_adapters(specs, OUT)
    assert len(packed.groups) == 2  # the seed's group, and the stored A's
    x = torch.randn(6, 2, IN, generator=torch.Generator().manual_seed(1))
    for rows in ([2, 0, 1, 2, -1, 0], [1, 1, 1, 1, 1, 1], [-1] * 6):
        y = lori_kernels.lori_linear_multi(x, weight, bias, torch.tensor(rows), packed, backend="reference")
        for i, k in enumerate(rows):
            want = alone(x[i], weight, bias, specs[k] if k >= 0 else None, "reference")
            torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-5)
    assert len(packed._plans) == 3  # a plan per batch layout, cached


def test_one_shrink_per_seed_group(monkeypatch):
    weight, bias = base()
    specs = adapters()
    packed = lori_kernels.pack_adapters(specs, OUT)
    assert [len(g.sets) for g in packed.groups] == [2, 1]  # seed group: blocks (16, 8) and (32, 16); the other seed
    calls = []
    kernels = reference.KERNELS._replace(
        shrink=lambda x, *args: calls.append(x.shape[0]) or reference.shrink_ref(x, *args), matmul_shrink_on=()
    )
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(2))
    rows = (0, 1, 2, 3, 4, 0, 1, -1)
    multi.forward(kernels, x, weight, bias, OUT, packed, packed.plan(rows, 1))
    assert calls == [6, 1]  # rows of adapters 0, 1, 2 and 4 in one shrink; adapter 3's in another


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu_ext"])
def test_kept_a_gives_the_backends_shrink_bit_for_bit(backend, dtype):
    """Where the shrink is generate_a then torch's matmul, the pack keeps each seed group's A
    from the first call on, and ``y`` is the one the backend's own shrink gives, bit for bit."""
    backend_or_skip(backend)
    weight, bias = base(dtype)
    packed = lori_kernels.pack_adapters(adapters(dtype), OUT)
    x = torch.randn(9, 2, IN, generator=torch.Generator().manual_seed(5)).to(dtype)
    rows = (0, 1, 2, 3, 4, 0, 1, -1, 3)
    kernels = backends.kernels(backend)
    own_shrink = kernels._replace(matmul_shrink_on=())  # shrinks with its own A every call
    want = multi.forward(own_shrink, x.reshape(-1, IN), weight, bias, OUT, packed, packed.plan(rows, 2))
    assert not packed._a
    for _ in range(2):
        got = lori_kernels.lori_linear_multi(x, weight, bias, rows, packed, backend=backend)
        assert torch.equal(got.reshape(-1, OUT), want)
    assert [tuple(a.shape) for a in packed._a.values()] == [(16, IN), (8, IN)]  # one per seed group
    assert all(a.dtype == dtype for a in packed._a.values())


def test_kept_a_generated_once_per_group():
    weight, bias = base()
    packed = lori_kernels.pack_adapters(adapters(), OUT)
    calls = []

    def generate_a(seed, *args, **kwargs):
        calls.append(seed)
        return reference.KERNELS.generate_a(seed, *args, **kwargs)

    kernels = reference.KERNELS._replace(generate_a=generate_a)
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(6))
    for rows in ((0, 1, 2, 3, 4, 0, 1, -1), (3, 3, 0, -1, -1, 2, 2, 1), (0, 1, 2, 3, 4, 0, 1, -1)):
        multi.forward(kernels, x, weight, bias, OUT, packed, packed.plan(rows, 1))
    assert calls == [group.seed for group in packed.groups]


def segmented_expand_args(device, dtype) -> dict:
    """Arguments of ``expand_segments_`` in its order (test_kernels.py opchecks it with them)
    over four segments of adapters 0, 1, 4 and 0 again: 15, 0 (empty), 12 (adapter 4 keeps no
    block) and 10 rows of ``h`` at rows of ``y`` [50, 40] scattered; B's last block row is
    partial (40 % 16 != 0)."""
    specs = adapters()
    packed = lori_kernels.pack_adapters([specs[k] for k in (0, 1, 4, 0)], OUT)
    (group,) = packed.groups
    (s,) = group.sets
    g = torch.Generator().manual_seed(4)
    y, h = torch.randn(50, OUT, generator=g), torch.randn(37, 16, generator=g)
    return dict(
        y=y.to(device=device, dtype=dtype),
        h=h.to(device=device, dtype=dtype),
        rows=torch.randperm(50, generator=g)[:37].to(device),
        seg_ptr=torch.tensor([0, 15, 15, 27, 37], dtype=torch.int32, device=device),
        longest=15,
        b_values=s.b_values.to(device=device, dtype=dtype),
        b_blocks=s.b_blocks.to(device),
        row_ptr=s.row_ptr.to(device),
        scaling=s.scaling.to(device),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["cpu_ext", "cuda_ext", "triton"])
def test_segmented_expand_matches_its_twin(backend, dtype):
    """Each backend's one-launch segmented expand against ``reference.expand_segments_ref_``
    (a dense product per segment) in float64, its error earned against the twin's in ``dtype``;
    rows of ``y`` outside the segments with blocks stay as they were."""
    backend_or_skip(backend)
    device = "cpu" if backend == "cpu_ext" or not torch.cuda.is_available() else "cuda"
    if backend == "triton" and backends.triton_dtype_problem(device, dtype) is not None:
        pytest.skip(backends.triton_dtype_problem(device, dtype))
    args = segmented_expand_args(device, dtype)
    y, h, b_values = args.pop("y"), args.pop("h"), args.pop("b_values")
    truth = y.double()
    reference.expand_segments_ref_(truth, h.double(), b_values=b_values.double(), **args)
    torch_same, got = y.clone(), y.clone()
    reference.expand_segments_ref_(torch_same, h, b_values=b_values, **args)
    backends.kernels(backend).expand_segments_(got, h, b_values=b_values, **args)
    assert_error_earned(got, torch_same, truth)
    untouched = torch.ones(50, dtype=torch.bool, device=device)
    untouched[args["rows"][:15]] = untouched[args["rows"][27:]] = False  # the segments with blocks
    assert torch.equal(got[untouched], y[untouched])


def _first_block_row_takes_all(row_ptr):
    """Segment 3's blocks all listed in its block row 0."""
    row_ptr = row_ptr.clone()
    row_ptr[3, 1:-1] = row_ptr[3, -1]
    return row_ptr


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("rows", lambda t: t.int(), r"rows must be a Long tensor \[37\], got Int"),
        ("rows", lambda t: torch.cat([t[:3], t[:1], t[4:]]), r"rows must be distinct, but rows\[3\] = \d+ comes twice"),
        ("rows", lambda t: t + 50, r"rows\[0\] = \d+ is out of range: y has 50 rows"),
        ("scaling", lambda t: t[:-1], r"scaling must be a Float tensor \[4\], got Float with shape \[3\]"),
        ("longest", lambda n: 12, "longest = 12 but segment 0 has 15 rows"),
        ("seg_ptr", lambda t: t.flip(0), "seg_ptr must run from 0 to the 37 rows of h, got 37 to 0"),
        ("row_ptr", lambda t: t[:, :-1].contiguous(), r"row_ptr must be an int32 tensor \[4, 4\]"),
        ("row_ptr", _first_block_row_takes_all, r"b_blocks\[\d+\] = \([12], \d\) is not the next block of block row 0"),
    ],
    ids=["rows-dtype", "repeated-row", "row-range", "scaling-size", "longest", "seg-ptr", "row-ptr-shape", "row-ptr"],
)
def test_segmented_expand_refusals(ext, name, change, match):
    """The C++ checks of ``lori::expand_segments_`` name the argument and the problem."""
    args = segmented_expand_args("cpu", torch.float32)
    args[name] = change(args[name])
    with pytest.raises(RuntimeError, match=match):
        ext.expand_segments_(**args)


def test_refusals():
    weight, bias = base()
    specs = adapters(kinds=KINDS[:2])
    x = torch.randn(3, IN)
    with pytest.raises(RuntimeError, match="inference only"):
        lori_kernels.lori_linear_multi(x.requires_grad_(), weight, bias, [0, 1, -1], specs)
    x = x.detach()
    with pytest.raises(ValueError, match="row_adapters has 2 entries but x has 3 rows"):
        lori_kernels.lori_linear_multi(x, weight, bias, [0, 1], specs)
    with pytest.raises(ValueError, match=r"adapter indices in \[0, 2\) or -1"):
        lori_kernels.lori_linear_multi(x, weight, bias, [0, 2, -1], specs)
    with pytest.raises(TypeError, match=r"adapters\[0\].b_values has dtype torch.float32 but x has torch.float64"):
        lori_kernels.lori_linear_multi(x.double(), weight.double(), bias.double(), [0, 1, -1], specs)
    with pytest.raises(ValueError, match="packed for 40 outputs, the weight has 8"):
        lori_kernels.lori_linear_multi(x, weight[:8], bias[:8], [0, 1, -1], lori_kernels.pack_adapters(specs, OUT))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        lori_kernels.lori_linear_multi(x[0], weight, bias, [0], specs)
    for wrong in (specs[0], []):
        with pytest.raises(TypeError, match="adapters must be a non-empty list of lori_kernels.AdapterSpec"):
            lori_kernels.lori_linear_multi(x, weight, bias, [0, 0, -1], wrong)


def test_row_adapters_checked_once_per_plan(monkeypatch):
    """A packed call reads ``row_adapters`` only until the tuple has made a plan; a refused one
    makes none (refused again), and an equal tuple of other values (``1.0 == 1``) is read again."""
    calls = []
    check = checks.check_row_adapters
    monkeypatch.setattr(checks, "check_row_adapters", lambda rows, n: calls.append(rows) or check(rows, n))
    weight, bias = base()
    packed = lori_kernels.pack_adapters(adapters(kinds=KINDS[:2]), OUT)
    x = torch.randn(3, IN)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"adapter indices in \[0, 2\) or -1 \(the base\), got 2"):
            lori_kernels.lori_linear_multi(x, weight, bias, (0, 2, -1), packed)
    assert not packed._plans
    good = (0, 1, -1)
    for _ in range(3):
        lori_kernels.lori_linear_multi(x, weight, bias, good, packed)
    assert calls == [(0, 2, -1), (0, 2, -1), good]
    with pytest.raises(ValueError, match=r"got 1\.0"):
        lori_kernels.lori_linear_multi(x, weight, bias, (0, 1.0, -1), packed)
    with pytest.raises(ValueError, match=r"got True"):
        lori_kernels.lori_linear_multi(x, weight, bias, (0, True, -1), packed)
    with pytest.raises(ValueError, match=r"got -2"):
        packed.plan((0, -2, -1), 1)  # a plan made directly checks its rows too
    y = lori_kernels.lori_linear_multi(x, weight, bias, tuple(np.array(good)), packed)  # numpy's ints are indices
    assert torch.equal(y, lori_kernels.lori_linear_multi(x, weight, bias, good, packed))
