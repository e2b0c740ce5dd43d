"""Large models without their weights: Llama-3-8B and -70B shapes built on ``meta`` with
masks, ``lori train --plan`` per rank, and the plan's sharded sizes confirmed by FSDP2
itself at world size 64 under PyTorch's fake process group."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import lori
from lori import LoRIConfig
from lori.train import TrainConfig
from lori.train.plan import memory_plan

LLAMA3 = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}


def llama3_config(size: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        **LLAMA3[size],
    }


def meta_llama3(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**llama3_config(size)))


def targets(model) -> dict[str, torch.nn.Linear]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lori.DEFAULT_TARGET_MODULES
    }


def block_masks(model, r: int, keep: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random masks of whole 32 x 32 blocks keeping ``keep`` of each layer's blocks."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, linear in targets(model).items():
        grid = torch.rand(-(-linear.out_features // 32), r // 32, generator=g) < keep
        masks[name] = grid.repeat_interleave(32, 0).repeat_interleave(32, 1)[: linear.out_features]
    return masks


def test_llama3_8b_on_meta_with_masks_has_lori_s_trainable_counts():
    """r 32: PEFT LoRA trains 83,886,080 parameters (A and B); LoRI-S at 90% about 5.25%
    of that (a tenth of B). Built on meta: no weight exists, in a few seconds."""
    model = meta_llama3("8b")
    lora = sum(32 * (m.in_features + m.out_features) for m in targets(model).values())
    assert lora == 83_886_080
    masks = block_masks(model, 32, 0.1)
    lori.get_lori_model(model, LoRIConfig(r=32), masks=masks)
    layers = lori.lori_layers(model)
    assert all(layer.b_values.is_meta and layer.b_blocks.is_meta for layer in layers.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = sum(int(m.sum()) for m in masks.values())
    assert trainable == kept and trainable / lora == pytest.approx(0.0525, abs=0.002)


def test_llama3_70b_on_meta_with_masks():
    model = meta_llama3("70b")
    masks = block_masks(model, 32, 0.1)
    lori.get_lori_model(model, LoRIConfig(r=32), masks=masks)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(int(m.sum()) for m in masks.values())


SIMULATION = """
import json, os, sys
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
import lori
from lori import LoRIConfig
from lori.train.world import World, build_on_meta, device_mesh, shard
rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=size)
world = World()
model = build_on_meta(sys.argv[1], torch.bfloat16)
lori.get_lori_model(model, LoRIConfig(r=32), device="meta")
mesh = tuple(int(v) for v in sys.argv[2].split("x")) if len(sys.argv) > 2 else None
shard(model, device_mesh(world, mesh), bf16=True)
local = lambda p: p.to_local().numel() * p.to_local().element_size()
print(json.dumps({
    "frozen": sum(local(p) for p in model.parameters() if not p.requires_grad),
    "trainable": sum(local(p) for p in model.parameters() if p.requires_grad),
}))
"""


@pytest.mark.parametrize("mesh", [None, (8, 8)])
def test_plan_of_70b_on_64_gpus_is_what_fsdp2_shards(tmp_path, mesh):
    """The real sharding code (``lori.train.world.shard``) at world size 64 on meta tensors
    under the fake process group: each rank's shard of the frozen weights and of the
    trainable b_values is the plan's, for FSDP and for HSDP 8 x 8."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(llama3_config("70b")))
    args = [sys.executable, "-c", SIMULATION, str(tmp_path / "model")] + (["x".join(map(str, mesh))] if mesh else [])
    out = subprocess.run(args, capture_output=True, text=True, env={**_env(), "RANK": "5", "WORLD_SIZE": "64"})
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = TrainConfig(model=str(tmp_path / "model"), data="-", output="-", adapter=LoRIConfig(r=32), mesh=mesh,
                      batch_size=1, max_length=4096, activation_checkpointing=True)  # fmt: skip
    plan = memory_plan(cfg, 64, gpu_memory=80)
    assert plan.rows["frozen weights (sharded)"] == measured["frozen"]
    assert plan.rows["trainable b_values (fp32, sharded)"] == measured["trainable"]
    assert plan.fits() and "fits in 80 GiB" in plan.table()


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}


RUN = """
import json, os, sys
import torch
from torch import nn
from lori import LoRIConfig
from lori.train import TrainConfig
from lori.train.loop import _load_sharded
from lori.train.loss import response_loss_sum
from lori.train.world import World
world = World()
cfg = TrainConfig(**json.loads(sys.argv[1]), adapter=LoRIConfig(r=8, block=(16, 8)))
model, _ = _load_sharded(cfg, world, torch.float32, None, bf16=False)
model.train()
shape = (cfg.batch_size, cfg.max_length)
ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
seen = set()
def pack(t):
    weight = isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)  # gathered weights, not activations
    key = t.untyped_storage()._cdata
    if not weight and key not in seen:
        seen.add(key)
        pack.bytes += t.untyped_storage().nbytes()
    return t
pack.bytes = 0
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = response_loss_sum(model, batch, cfg.loss_chunk_tokens)
loss.backward()
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable)
optimizer.step()
local = lambda t: t.to_local().numel() * t.element_size()
state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
measured = {
    "frozen weights (sharded)": sum(local(p) for p in model.parameters() if not p.requires_grad),
    "trainable b_values (fp32, sharded)": sum(local(p) for p in trainable),
    "gradients (fp32, sharded)": sum(local(p.grad) for p in trainable),
    "AdamW state (fp32, sharded)": sum(local(v) for v in state),
    "saved": pack.bytes,
}
if world.main:
    print("MEASURED" + json.dumps(measured))
world.close()
"""


def test_plan_against_a_real_two_process_run(tmp_path):
    """The plan of a 2-process CPU run (float32) against what the run holds: the sharded
    weights, b_values, gradients and AdamW state exactly; what forward saves for backward
    (activations, and the chunked loss's gradient of the hidden states) within 10%."""
    from test_model import TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = {**TINY, "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 3, "vocab_size": 1000}
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp_path / "base")
    settings = dict(model=str(tmp_path / "base"), data="-", output=str(tmp_path), batch_size=2, max_length=256)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    (tmp_path / "run.py").write_text(RUN)
    out = subprocess.run([*launcher, str(tmp_path / "run.py"), json.dumps(settings)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("MEASURED"))[8:])
    cfg = TrainConfig(**settings, adapter=LoRIConfig(r=8, block=(16, 8)))
    plan = memory_plan(cfg, 2, compute_dtype=torch.float32)
    for row in ("frozen weights (sharded)", "trainable b_values (fp32, sharded)", "gradients (fp32, sharded)"):
        assert plan.rows[row] == measured[row], row
    assert plan.rows["AdamW state (fp32, sharded)"] == measured["AdamW state (fp32, sharded)"]
    hidden_grad = cfg.batch_size * cfg.max_length * config["hidden_size"] * 4  # the chunked loss saves it
    assert measured["saved"] == pytest.approx(plan.rows["activations"] + hidden_grad, rel=0.1)


@pytest.mark.parametrize("kind", ["int8", "nf4", "bnb_nf4"])
def test_plan_of_a_quantized_base_is_what_quantize_base_holds(tmp_path, kind):
    """--quantize-base (one process): the frozen weights are what ``quantize_base`` leaves on a
    real model of the same config (within 1%: the plan scales a sample layer), the unsharded
    model gathers nothing, and more than one process is refused as training refuses it."""
    from test_model import TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    from lori import get_lori_model, quantize_base
    from lori_kernels.testing import plain_tensors, storage_bytes

    torch.manual_seed(0)
    config = {**TINY, "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2, "vocab_size": 1000}
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp_path / "base")
    cfg = TrainConfig(model=str(tmp_path / "base"), data="-", output="-", adapter=LoRIConfig(r=8, block=(16, 8)),
                      quantize_base=kind)  # fmt: skip
    plan = memory_plan(cfg, 1)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    model = get_lori_model(quantize_base(model, kind), cfg.adapter)
    frozen = [t for p in model.parameters() if not p.requires_grad for t in plain_tensors(p)]
    assert plan.rows["frozen weights (sharded)"] == pytest.approx(storage_bytes(frozen), rel=0.01)
    unquantized = memory_plan(dataclasses.replace(cfg, quantize_base=None), 1)
    assert plan.rows["frozen weights (sharded)"] < unquantized.rows["frozen weights (sharded)"]
    assert plan.rows["gathered weights (root + 2 layers)"] == 0
    with pytest.raises(ValueError, match="quantize_base runs in one process; 2 processes"):
        memory_plan(cfg, 2)
