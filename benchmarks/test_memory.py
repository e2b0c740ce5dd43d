"""pytest-benchmark: one training step of a small Llama-shaped model per variant (LoRI-S,
LoRI-D, PEFT LoRA, the original LoRI code), dropout 0 and 0.05, with the memory figures of
the memory suite attached as ``extra_info``; and the bytes one layer saves for backward.

    pytest benchmarks/ --benchmark-only
"""

import pytest
import torch

from lori.bench import kernels, memory
from lori.bench.common import lori_backends, synced
from lori_kernels.testing import saved_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE = memory.model_case(DEVICE.type, quick=True)


@pytest.mark.parametrize("dropout", memory.DROPOUTS)
@pytest.mark.parametrize("variant", memory.VARIANTS)
def test_training_step(benchmark, variant, dropout):
    if variant == "base" and dropout:
        pytest.skip("the base model has no adapter dropout")
    benchmark.extra_info.update(memory.model_row(variant, CASE, dropout, DEVICE))
    run = memory.training(variant, CASE, dropout, DEVICE)
    benchmark.group = f"training step, dropout {dropout}"
    benchmark.pedantic(synced(DEVICE, run.step), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("dropout", memory.DROPOUTS)
def test_layer_saved_for_backward(benchmark, dropout):
    """LoRI saves M·r elements for backward whatever the dropout; PEFT more."""
    shape = kernels.QUICK_SHAPE
    case = kernels.make_case(shape, DEVICE)
    impls = kernels.implementations(case, lori_backends(DEVICE, shape.dtype), dropout)
    saved = {name: saved_bytes(impl.forward, exclude=impl.held) for name, impl in impls.items()}
    mr = shape.m * shape.r * case["x"].element_size()
    assert all(saved[b] == mr for b in lori_backends(DEVICE, shape.dtype))
    benchmark.extra_info.update({f"saved_bytes_{name}": size for name, size in saved.items()})
    benchmark.group = "layer forward (saved bytes in extra_info)"
    benchmark(synced(DEVICE, impls["reference"].forward))
