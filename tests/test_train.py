"""Training: LoRI-D, masks, LoRI-S; FSDP2 on two processes equals one; a resumed run
continues the same loss curve; the command line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import lori
import lori_kernels
from lori import toy
from lori.train import TrainConfig, train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base model pretrained on copying, a shift-by-one task, a held-out set."""
    root = tmp_path_factory.mktemp("toy")
    tokenizer = toy.build_tokenizer(root / "tokenizer")
    toy.build_base_model(root / "base", tokenizer, steps=120, progress=False)
    toy.write_jsonl(toy.caesar_examples(128, 1, 10), root / "train.jsonl")
    toy.write_jsonl(toy.caesar_examples(16, 1, 11), root / "test.jsonl")
    return root


def config(world, output, **changes):
    settings = dict(
        model=str(world / "base"),
        data=str(world / "train.jsonl"),
        output=str(output),
        r=8,
        block=(16, 8),
        lr=3e-3,
        epochs=1,
        batch_size=8,
        progress=False,
        log_every=100,
    )
    settings.update(changes)
    return TrainConfig(**settings)


def test_lori_d_then_masks_then_lori_s(world, tmp_path):
    d = train(config(world, tmp_path / "d", lr=1e-2, epochs=3))
    assert len(d["losses"]) == 48 and d["losses"][-1] < 0.5 * d["losses"][0]
    model = lori.load_lori(toy_base(world), d["adapter"])
    masks = lori.extract_masks(model, 0.9)
    lori.save_masks(masks, tmp_path / "masks.safetensors")
    s = train(config(world, tmp_path / "s", masks=str(tmp_path / "masks.safetensors"), lr=1e-2, epochs=3))
    lori_s = lori.load_lori(toy_base(world), s["adapter"])
    kept = sum(int(m.sum()) for m in masks.values())
    assert sum(int((layer.b_dense() != 0).sum()) for layer in lori.lori_layers(lori_s).values()) <= kept
    for name, layer in lori.lori_layers(lori_s).items():
        assert torch.equal(layer.mask(), masks[name])
    assert s["losses"][-1] < s["losses"][0]


def test_learning_rates_default_to_the_lori_recipe(world, tmp_path):
    assert config(world, tmp_path, lr=None).peak_lr() == 5e-5
    assert config(world, tmp_path, lr=None, masks="m.safetensors").peak_lr() == 5e-4
    lori_config = config(world, tmp_path).lori_config()
    assert (lori_config.alpha, lori_config.dropout) == (16.0, 0.0)


def toy_base(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(world / "base"))


def train_args(world, output, *extra):
    """`lori train` arguments matching ``config`` (r 8, block 16x8, lr 3e-3)."""
    return ["train", "--model", str(world / "base"), "--data", str(world / "train.jsonl"), "--output", str(output),
            "--rank", "8", "--block", "16,8", "--lr", "3e-3", "--no-progress", *extra]  # fmt: skip


def run_cli(args):
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_fsdp2_on_two_processes_equals_one(world, tmp_path):
    """torchrun, gloo, fully_shard per decoder layer: the same global batches give the same
    losses as one process (the loss is normalised by the global token count). Without
    dropout: its masks depend on how a batch is split across processes."""
    single = train(config(world, tmp_path / "one", batch_size=8, grad_accum=2, max_steps=6))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lori.cli"]
    run_cli(
        [*launcher, *train_args(world, tmp_path / "two", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "6")]
    )
    two = lori.load_lori(toy_base(world), tmp_path / "two" / "adapter")
    one = lori.load_lori(toy_base(world), single["adapter"])
    for name, layer in lori.lori_layers(one).items():
        torch.testing.assert_close(lori.lori_layers(two)[name].b_values, layer.b_values, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(dropout=0.2, grad_accum=2, batch_size=4, clip_mode="per_tensor", activation_checkpointing=True),
    ],
)
def test_resumed_run_continues_identically(world, tmp_path, changes):
    """A run restarted from its step-4 checkpoint (all a killed run leaves) gives the loss
    curve and adapter of the uninterrupted run."""
    full = train(config(world, tmp_path / "full", save_every=4, keep_checkpoints=5, max_steps=10, **changes))
    restarted = tmp_path / "restarted"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-0000004", restarted / "checkpoints" / "step-0000004")
    again = train(config(world, restarted, save_every=4, max_steps=10, resume=True, **changes))
    assert again["losses"] == pytest.approx(full["losses"], rel=1e-6)
    a = lori.load_lori(toy_base(world), full["adapter"])
    b = lori.load_lori(toy_base(world), again["adapter"])
    for name, layer in lori.lori_layers(a).items():
        torch.testing.assert_close(lori.lori_layers(b)[name].b_values, layer.b_values)


def test_checkpoints_are_pruned_and_resume_checks_settings(world, tmp_path):
    train(config(world, tmp_path / "run", save_every=2, keep_checkpoints=2, max_steps=9))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-0000006", "step-0000008"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and len(state["losses"]) == 8
    with pytest.raises(ValueError, match=r"cannot resume .* settings changed \(\['lr'\]\)"):
        train(config(world, tmp_path / "run", save_every=2, max_steps=9, resume=True, lr=1e-3))


def test_cli_extract_masks_and_eval(world, tmp_path):
    lori_cli = [sys.executable, "-m", "lori.cli"]
    run_cli([*lori_cli, *train_args(world, tmp_path / "d")])
    adapter = ["--model", str(world / "base"), "--adapter", str(tmp_path / "d" / "adapter")]
    run_cli([*lori_cli, "extract-masks", *adapter, "--sparsity", "0.75", "--output", str(tmp_path / "m.safetensors")])
    masks = lori.load_masks(tmp_path / "m.safetensors")
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == pytest.approx(0.25 * total, rel=0.02)
    out = run_cli([*lori_cli, "eval", *adapter, "--data", str(world / "test.jsonl")])
    figures = json.loads(out.strip().splitlines()[-1])
    assert set(figures) == {"loss", "exact_match"}


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(schedule="linear"), "schedule must be"),
        (dict(clip_mode="norm"), "clip_mode must be"),
        (dict(precision="fp8"), "precision must be"),
        (dict(batch_size=0), "batch_size must be at least 1"),
        (dict(max_steps=0), "max_steps must be at least 1"),
    ],
)
def test_bad_training_settings_are_named(world, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        config(world, tmp_path, **changes)


def test_too_little_data_is_named(world, tmp_path):
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        train(config(world, tmp_path / "x", batch_size=200))
    with pytest.raises(ValueError, match="has no response tokens"):
        train(config(world, tmp_path / "y", max_length=4))


def test_bf16_mixed_precision_on_one_and_two_processes(world, tmp_path):
    """bf16 base weights, float32 b_values (the optimizer's master copy); under FSDP2 the base
    is loaded in bf16 too (frozen bf16 beside trainable fp32 in one shard group), and two
    processes follow one process's loss curve to bf16 rounding."""
    result = train(config(world, tmp_path / "bf16", precision="bf16", max_steps=4))
    model = lori.load_lori(toy_base(world), result["adapter"])
    assert all(layer.b_values.dtype == torch.float32 for layer in lori.lori_layers(model).values())
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lori.cli"]
    extra = ("--precision", "bf16", "--batch-size", "4", "--max-steps", "4", "--log-every", "1")
    stdout = run_cli([*launcher, *train_args(world, tmp_path / "two", *extra)])
    assert "base weights in bfloat16, adapter in float32" in stdout
    two = [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step ")]
    assert two == pytest.approx(result["losses"], rel=2e-3)


def random_block_masks(model, keep, seed):
    """Masks of whole blocks keeping a random ``keep`` fraction of each adapted layer's blocks."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, layer in lori.lori_layers(model).items():
        n_rows, n_cols = lori_kernels.block_sparse.block_grid(layer.out_features, layer.r, layer.block)
        grid = torch.rand(n_rows, n_cols, generator=g) < keep
        masks[name] = grid.repeat_interleave(layer.block[0], 0).repeat_interleave(layer.block[1], 1)[
            : layer.out_features
        ]
    return masks


@pytest.mark.parametrize("processes", [1, 2])
def test_continual_learning_trains_the_task_mask_and_keeps_every_other_block(world, tmp_path, processes):
    """A safety adapter (LoRI-S) first, then a task under its own mask on top of it: the
    safety blocks outside the task mask stay bit-identical (weight decay on, so they would
    shrink if they were only given zero gradients), the task blocks train."""
    model = lori.get_lori_model(toy_base(world), config(world, tmp_path).lori_config())
    lori.save_masks(random_block_masks(model, 0.4, seed=1), tmp_path / "safety.safetensors")
    task_masks = random_block_masks(model, 0.3, seed=2)
    lori.save_masks(task_masks, tmp_path / "task.safetensors")
    safety = train(config(world, tmp_path / "safety", masks=str(tmp_path / "safety.safetensors"), max_steps=3))
    extra = ["--init-adapter", safety["adapter"], "--masks", str(tmp_path / "task.safetensors"),
             "--weight-decay", "0.5", "--max-steps", "3", "--batch-size", str(8 // processes)]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    run_cli([*launcher, "-m", "lori.cli", *train_args(world, tmp_path / "task", *extra)])
    before = lori.lori_layers(lori.load_lori(toy_base(world), safety["adapter"]))
    after = lori.lori_layers(lori.load_lori(toy_base(world), tmp_path / "task" / "adapter"))
    changed = 0
    for name, layer in after.items():
        old, new, task = before[name].b_dense(), layer.b_dense(), task_masks[name]
        assert torch.equal(layer.mask(), before[name].mask() | task)
        assert torch.equal(new[~task].view(torch.int32), old[~task].view(torch.int32))
        changed += int((new[task] != old[task]).sum())
    assert changed > 0.5 * sum(int(m.sum()) for m in task_masks.values())


def test_cli_merge_export_import(world, tmp_path):
    """Two adapters of one seed merge into one compact adapter; export to PEFT and import
    back keep the outputs; --fold writes a plain model."""
    for i in range(2):
        train(config(world, tmp_path / f"t{i}", max_steps=2, data_seed=i))
    lori_cli = [sys.executable, "-m", "lori.cli"]
    base = ["--model", str(world / "base")]
    adapters = [str(tmp_path / f"t{i}" / "adapter") for i in range(2)]
    run_cli([*lori_cli, "merge", *base, "--adapters", *adapters, "--weights", "0.5", "0.5", "--output",
             str(tmp_path / "merged")])  # fmt: skip
    merged = lori.load_lori(toy_base(world), tmp_path / "merged")
    assert all(layer.stored_a is None for layer in lori.lori_layers(merged).values())
    run_cli([*lori_cli, "export", *base, "--adapter", str(tmp_path / "merged"), "--output", str(tmp_path / "peft")])
    run_cli([*lori_cli, "export", *base, "--adapter", str(tmp_path / "merged"), "--format", "lori", "--dtype",
             "bfloat16", "--output", str(tmp_path / "bf16")])  # fmt: skip
    bf16 = lori.checkpoint.read_lori(tmp_path / "bf16")[1]
    assert all(t["b_values"].dtype == torch.bfloat16 for t in bf16.values())
    run_cli([*lori_cli, "import", *base, "--adapter", str(tmp_path / "peft"), "--output", str(tmp_path / "back")])
    run_cli([*lori_cli, "merge", *base, "--adapters", str(tmp_path / "merged"), "--weights", "1", "--fold",
             "--output", str(tmp_path / "folded")])  # fmt: skip
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 30, (2, 9))
    back = lori.load_lori(toy_base(world), tmp_path / "back")
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    with torch.no_grad():
        want = merged(ids).logits
        torch.testing.assert_close(back(ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded(ids).logits, want, rtol=1e-4, atol=1e-4)
