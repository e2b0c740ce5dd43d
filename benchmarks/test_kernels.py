"""pytest-benchmark: the kernel suite's implementations of one LoRI layer, every pass, at a
small case (the GPU: the suite's centre case). Correctness against the reference backend
is checked once before anything is timed.

    pytest benchmarks/ --benchmark-only
"""

import pytest
import torch

import lori_kernels
from lori.bench import kernels
from lori.bench.common import interpreted, lori_backends, synced

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = kernels.centre(DEVICE.type, quick=DEVICE.type == "cpu")
BACKENDS = lori_backends(DEVICE, SHAPE.dtype)
IMPLS = ["base", "peft_lora", "lori_original", *BACKENDS]


@pytest.fixture(scope="module")
def layer():
    case = kernels.make_case(SHAPE, DEVICE)
    impls = kernels.implementations(case, BACKENDS)
    kernels.check_against_reference(case, impls)
    return case, impls


@pytest.mark.parametrize("pass_", kernels.PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_layer(benchmark, layer, impl, pass_):
    case, impls = layer
    if impl not in impls:
        pytest.skip(f"{impl} is not available (peft missing?)")
    benchmark.group = f"layer {pass_}: {SHAPE}"
    benchmark.extra_info.update(SHAPE.columns(), impl=impl, passes=pass_)
    benchmark(synced(DEVICE, kernels.passes(impls[impl], case["dy"])[pass_]))


@pytest.mark.parametrize("backend", lori_kernels.available_backends("generate_a"))
def test_generate_a(benchmark, backend):
    if interpreted(backend, DEVICE):
        pytest.skip("Triton runs on the CPU only in its (slow) interpreter")
    r, d_in = kernels.GENERATE_A_SHAPES[1]
    want = lori_kernels.generate_a(kernels.GENERATE_A_SEED, r, d_in, device=DEVICE, backend="reference")
    got = lori_kernels.generate_a(kernels.GENERATE_A_SEED, r, d_in, device=DEVICE, backend=backend)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    benchmark.group = f"generate_a r={r} d_in={d_in}"
    generate = lambda: lori_kernels.generate_a(kernels.GENERATE_A_SEED, r, d_in, device=DEVICE, backend=backend)
    benchmark(synced(DEVICE, generate))
