"""pytest-benchmark: writing the adapter of one Llama-3-8B-shaped decoder layer (base on the
meta device), ours at every sparsity and PEFT LoRA's, sizes attached as ``extra_info``.

    pytest benchmarks/ --benchmark-only
"""

import pytest
import torch

import lori
from lori.bench import storage

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


@pytest.mark.parametrize("sparsity", storage.SPARSITIES)
def test_save_lori(benchmark, tmp_path, peft_size, sparsity):
    model = storage.lori_model(CONFIG, 32, sparsity, (32, 32))
    benchmark.group = "save adapter, r 32"
    benchmark.pedantic(lambda: lori.save_lori(model, tmp_path / "adapter", dtype=torch.bfloat16), rounds=3)
    tensors, total = storage.checkpoint_size(tmp_path / "adapter", storage.LORI_FILES)
    ratio = total / peft_size[1]
    benchmark.extra_info.update(tensor_bytes=tensors, total_bytes=total, ratio_to_peft=ratio)
    if sparsity == 0.9:
        assert ratio <= storage.TARGET, f"{ratio:.2%} of PEFT LoRA's checkpoint"
