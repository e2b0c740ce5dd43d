"""pytest-benchmark: writing the adapter of one Llama-3-8B-shaped decoder layer (base on the
meta device), ours at every sparsity (and with element masks) and PEFT LoRA's, sizes attached
as ``extra_info``; reading ours back.

    pytest benchmarks/ --benchmark-only
"""

import pytest
import torch

import lori
from lori.bench import storage
from lori.checkpoint import read_lori

CONFIG = storage.llama3_8b_config(quick=True)


@pytest.fixture(scope="module")
def peft_size(tmp_path_factory):
    return storage.peft_bytes(CONFIG, 32, tmp_path_factory.mktemp("peft"))


def test_save_peft(benchmark, tmp_path):
    model = storage.peft_on_meta(storage.meta_model(CONFIG), 32)
    benchmark.group = "save adapter, r 32"
    benchmark.pedantic(lambda: model.save_pretrained(str(tmp_path)), rounds=3)
    tensors, total = storage.checkpoint_size(tmp_path, storage.PEFT_FILES)
    benchmark.extra_info.update(tensor_bytes=tensors, total_bytes=total)


CASES = [(s, (32, 32), storage.TARGET if s == 0.9 else None) for s in storage.SPARSITIES]
CASES.append((0.9, (1, 1), storage.ELEMENT_TARGET))


@pytest.mark.parametrize("sparsity, block, target", CASES)
def test_save_lori(benchmark, tmp_path, peft_size, sparsity, block, target):
    model = storage.lori_model(CONFIG, 32, sparsity, block)
    benchmark.group = "save adapter, r 32"
    benchmark.pedantic(lambda: lori.save_lori(model, tmp_path / "adapter", dtype=torch.bfloat16), rounds=3)
    tensors, total = storage.checkpoint_size(tmp_path / "adapter", storage.LORI_FILES)
    ratio = total / peft_size[1]
    benchmark.extra_info.update(tensor_bytes=tensors, total_bytes=total, ratio_to_peft=ratio)
    if target is not None:
        assert ratio <= target, f"{ratio:.2%} of PEFT LoRA's checkpoint"


@pytest.mark.parametrize("block", [(32, 32), (1, 1)])
def test_read_lori(benchmark, tmp_path, block):
    """Reading back (checksums, decoding of the kept blocks' indices, every check)."""
    model = storage.lori_model(CONFIG, 32, 0.9, block)
    path = lori.save_lori(model, tmp_path / "adapter", dtype=torch.bfloat16)
    benchmark.group = "read adapter, r 32, sparsity 0.9"
    layers = benchmark.pedantic(lambda: read_lori(path).layers, rounds=3)
    assert all(torch.equal(layers[n]["b_blocks"], layer.b_blocks) for n, layer in lori.lori_layers(model).items())
