"""``lori_kernels.lori_linear_multi``: each row as ``lori_linear`` with its adapter alone, on
every backend; one shrink per seed group; the segmented expand against its torch twin."""

import pytest
import torch
from helpers import assert_error_earned, make_layer

import lori_kernels
from lori_kernels import AdapterSpec, backends, multi, reference

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
        shrink=lambda x, *args: calls.append(x.shape[0]) or reference.shrink_ref(x, *args)
    )
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(2))
    rows = (0, 1, 2, 3, 4, 0, 1, -1)
    multi.forward(kernels, x, weight, bias, packed, packed.plan(rows, 1))
    assert calls == [6, 1]  # rows of adapters 0, 1, 2 and 4 in one shrink; adapter 3's in another


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_segmented_expand_matches_its_twin(dtype):
    backend_or_skip("triton")
    if backends.triton_dtype_problem("cpu", dtype) is not None and not torch.cuda.is_available():
        pytest.skip(backends.triton_dtype_problem("cpu", dtype))
    from lori_kernels.triton_kernels.expand_segments import expand_segments_

    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [s._replace(b_values=s.b_values.to(device), b_blocks=s.b_blocks.to(device)) for s in adapters()]
    packed = lori_kernels.pack_adapters([specs[k] for k in (0, 1, 4)], OUT)
    (group,) = packed.groups
    (expand_set,) = group.sets
    g = torch.Generator().manual_seed(4)
    h = torch.randn(37, 16, generator=g).to(device)
    rows = torch.randperm(50, generator=g)[:37].to(device)  # y's rows, scattered
    seg_ptr = torch.tensor([0, 20, 37, 37], dtype=torch.int32, device=device)
    y0 = torch.randn(50, OUT, generator=g).to(device)
    index = (rows, seg_ptr, 20)  # segments of 20, 17 and 0 rows; the longest has 20
    b = (expand_set.b_blocks, expand_set.row_ptr, expand_set.scaling)
    truth = y0.double()
    reference.expand_segments_ref_(truth, h.double(), *index, expand_set.b_values.double(), *b)
    torch_same, got = y0.to(dtype), y0.to(dtype)
    reference.expand_segments_ref_(torch_same, h.to(dtype), *index, expand_set.b_values.to(dtype), *b)
    expand_segments_(got, h.to(dtype), *index, expand_set.b_values.to(dtype), *b)
    assert_error_earned(got, torch_same, truth)


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
