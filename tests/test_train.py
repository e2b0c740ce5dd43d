"""Training: LoRI-D, masks, LoRI-S; FSDP2 on two processes equals one; a resumed run
continues the same loss curve; the command line."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lori
import lori_kernels
from lori import LoRIConfig, toy
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


ADAPTER_FIELDS = {f.name for f in dataclasses.fields(LoRIConfig)}


def config(world, output, **changes):
    """A run on the toy world: r 8, block 16x8, lr 3e-3; ``changes`` of the adapter's
    fields (r, dropout, seed, ...) go to its LoRIConfig, the others to the TrainConfig."""
    adapter = dict(r=8, block=(16, 8)) | {k: v for k, v in changes.items() if k in ADAPTER_FIELDS}
    settings = dict(
        model=str(world / "base"),
        data=str(world / "train.jsonl"),
        output=str(output),
        lr=3e-3,
        epochs=1,
        batch_size=8,
        progress=False,
        log_every=100,
    )
    settings.update({k: v for k, v in changes.items() if k not in ADAPTER_FIELDS})
    return TrainConfig(adapter=LoRIConfig(**adapter), **settings)


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
    lori_config = config(world, tmp_path).adapter
    assert (lori_config.alpha, lori_config.dropout) == (16.0, 0.0)


def toy_base(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(world / "base"))


def train_args(world, output, *extra):
    """`lori train` arguments matching ``config`` (r 8, block 16x8, lr 3e-3)."""
    return ["train", "--model", str(world / "base"), "--data", str(world / "train.jsonl"), "--output", str(output),
            "--rank", "8", "--block", "16,8", "--lr", "3e-3", "--no-progress", *extra]  # fmt: skip


def run_cli(args, env=None):
    out = subprocess.run(args, capture_output=True, text=True, env=env)
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
        dict(quantize_base="nf4", dropout=0.1),
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


def test_a_setting_newer_than_the_checkpoint_counts_as_its_default(world, tmp_path):
    """A checkpoint written before a resume setting existed resumes if the setting is at its
    default, and names it if not."""
    from lori.train.config import changed_resume_fields, resume_fields

    older = resume_fields(config(world, tmp_path))
    del older["quantize_base"]
    assert changed_resume_fields(older, config(world, tmp_path)) == []
    assert changed_resume_fields(older, config(world, tmp_path, quantize_base="nf4")) == ["quantize_base"]


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


def test_quantized_base_trains(world, tmp_path):
    """``quantize_base``: LoRI over an NF4 base (QLoRA-style) learns (its resume is in
    test_resumed_run_continues_identically); a bad kind is named."""
    result = train(config(world, tmp_path / "q", quantize_base="nf4", max_steps=8, lr=1e-2))
    assert result["losses"][-1] < result["losses"][0]
    with pytest.raises(ValueError, match="quantize_base must be one of"):
        config(world, tmp_path, quantize_base="int3")


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
    model = lori.get_lori_model(toy_base(world), config(world, tmp_path).adapter)
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


def test_a_new_run_refuses_the_directory_of_an_earlier_run(world, tmp_path):
    """A new run used to rotate out its own checkpoints in favour of an older run's higher
    step numbers, after which --resume failed."""
    out = tmp_path / "run"
    train(config(world, out, save_every=2, keep_checkpoints=5, max_steps=8))
    with pytest.raises(lori.OutputError, match=r"holds an earlier run \(checkpoints up to step-0000006\)"):
        train(config(world, out, save_every=2, max_steps=4))
    again = train(config(world, out, save_every=2, max_steps=5, overwrite_output=True, data_seed=1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    resumed = train(config(world, out, save_every=2, max_steps=5, resume=True, data_seed=1))
    assert resumed["losses"] == pytest.approx(again["losses"], rel=1e-6)
    finished = tmp_path / "finished"
    train(config(world, finished, max_steps=2))
    with pytest.raises(lori.OutputError, match="a finished run's adapter/"):
        train(config(world, finished, max_steps=2))
    with pytest.raises(lori.OutputError, match="no checkpoint to resume from"):
        train(config(world, finished, max_steps=2, resume=True))


def test_a_run_never_deletes_files_it_did_not_write(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, save_every=1, keep_checkpoints=1, max_steps=3))
    for mine in (out / "notes.txt", out / "checkpoints" / "notes.txt"):
        mine.write_text("mine")
    train(config(world, out, save_every=1, keep_checkpoints=1, max_steps=3, overwrite_output=True))
    assert (out / "notes.txt").is_file() and (out / "checkpoints" / "notes.txt").is_file()
    for where in ("adapter", "checkpoints/step-0000002"):
        (out / where / "notes.txt").write_text("mine")
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        with pytest.raises(lori.OutputError, match=f"{where} holds files that are not a .*notes.txt"):
            train(config(world, out, save_every=1, max_steps=3, overwrite_output=True))
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
        (out / where / "notes.txt").unlink()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(clip_grad=-1.0), "clip_grad must be positive and finite, or None"),
        (dict(clip_grad=0.0), "clip_grad must be positive and finite"),
        (dict(lr=float("nan")), "lr must be a positive finite number"),
        (dict(lr=float("inf")), "lr must be a positive finite number"),
        (dict(lr=-1e-3), "lr must be a positive finite number"),
        (dict(warmup_ratio=1.5), r"warmup_ratio must be in \[0, 1\)"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
        (dict(grad_accum=0), "grad_accum must be at least 1"),
        (dict(epochs=0), "epochs must be at least 1"),
        (dict(max_length=-5), "max_length must be at least 1"),
        (dict(save_every=-1), "save_every must be at least 0"),
        (dict(r=0), "LoRIConfig.r must be a positive int"),
        (dict(seed=2**64), "seed 18446744073709551616 is outside"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(resume=True, overwrite_output=True), "exclude each other"),
    ],
)
def test_every_option_is_checked_before_anything_loads(world, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        config(world, tmp_path, **changes)


def test_missing_inputs_are_named_before_loading(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory at"):
        train(config(world, tmp_path / "o", model=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="no masks file at"):
        train(config(world, tmp_path / "o", masks=str(tmp_path / "m.safetensors")))
    assert not (tmp_path / "o").exists()


def test_a_diverging_run_stops_before_spoiling_the_adapter(world, tmp_path):
    """--lr inf used to end with "final loss nan", exit 0 and a saved NaN adapter."""
    out = tmp_path / "run"
    with pytest.raises(lori.TrainingError, match=r"step 2: loss .*training diverged.*step-0000001"):
        train(config(world, out, lr=1e30, save_every=1, max_steps=4, warmup_ratio=0.0, schedule="constant"))
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    model = lori.load_lori(toy_base(world), out / "checkpoints" / "step-0000001")
    assert all(torch.isfinite(layer.b_values).all() for layer in lori.lori_layers(model).values())


def test_resume_checks_the_process_count_and_the_checkpoint_files(world, tmp_path):
    from types import SimpleNamespace

    from lori.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    train(config(world, out, save_every=2, keep_checkpoints=5, max_steps=5))
    step4 = out / "checkpoints" / "step-0000004"
    with pytest.raises(ValueError, match="written by a run of 1 processes; resume it with 1 \\(not 2\\)"):
        load_checkpoint(None, None, None, config(world, out), SimpleNamespace(size=2), step4)
    damages = {
        "optimizer.safetensors": (lambda d: d[:-7], "optimizer.safetensors does not match the checksum"),
        "trainer_state.json": (
            lambda d: d.replace(b'"step": 4', b'"step": 3'),
            "trainer_state.json was changed after it was saved",
        ),
    }
    for name, (damage, message) in damages.items():
        original = (step4 / name).read_bytes()
        (step4 / name).write_bytes(damage(original))
        with pytest.raises(lori.CheckpointError, match=message):
            train(config(world, out, save_every=2, keep_checkpoints=5, max_steps=5, resume=True))
        (step4 / name).write_bytes(original)
    optimizer = (step4 / "optimizer.safetensors").read_bytes()
    (step4 / "optimizer.safetensors").unlink()
    with pytest.raises(lori.CheckpointError, match="is not a training checkpoint: optimizer.safetensors is missing"):
        train(config(world, out, save_every=2, keep_checkpoints=5, max_steps=5, resume=True))
    (step4 / "optimizer.safetensors").write_bytes(optimizer)
    for name in ("lori_config.json", "adapter.safetensors"):  # another checkpoint's adapter
        shutil.copy(out / "checkpoints" / "step-0000002" / name, step4 / name)
    with pytest.raises(lori.CheckpointError, match="the adapter files are not the ones trainer_state.json was saved"):
        train(config(world, out, save_every=2, keep_checkpoints=5, max_steps=5, resume=True))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_during_training_then_resume_gives_the_uninterrupted_curve(world, tmp_path, seed):
    """`lori train` killed with SIGKILL at a random moment after its first checkpoint
    (possibly while writing one), then resumed: the same loss curve and adapter as a run
    never interrupted."""
    import random
    import signal
    import time

    settings = dict(save_every=1, keep_checkpoints=2, max_steps=16, dropout=0.1)
    full = train(config(world, tmp_path / "full", **settings))
    out = tmp_path / "killed"
    args = train_args(world, out, "--save-every", "1", "--keep-checkpoints", "2", "--max-steps", "16", "--dropout",
                      "0.1", "--log-every", "100")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-m", "lori.cli", *args], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints").is_dir() and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
        time.sleep(random.Random(seed).uniform(0.0, 0.5))
        assert child.poll() is None, "the run ended before it could be killed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    again = train(config(world, out, resume=True, **settings))
    assert again["losses"] == pytest.approx(full["losses"], rel=1e-6)
    a = lori.lori_layers(lori.load_lori(toy_base(world), full["adapter"]))
    b = lori.lori_layers(lori.load_lori(toy_base(world), again["adapter"]))
    for name, layer in a.items():
        torch.testing.assert_close(b[name].b_values, layer.b_values)


def step_losses(stdout: str) -> list[float]:
    """The losses of a run's "step N/M loss X" log lines (--log-every 1)."""
    return [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step ")]


@pytest.mark.slow
def test_hsdp_2x2_on_four_processes_equals_one_and_resumes(world, tmp_path):
    """--mesh 2x2: parameters sharded within pairs of processes, replicated across the two
    pairs; the same loss curve as one process, and a resumed run continues it."""
    single = train(config(world, tmp_path / "one", batch_size=8, max_steps=4))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "lori.cli"]
    extra = ("--mesh", "2x2", "--batch-size", "2", "--max-steps", "4", "--log-every", "1", "--save-every", "2")
    four = step_losses(run_cli([*launcher, *train_args(world, tmp_path / "hsdp", *extra)]))
    assert four == pytest.approx(single["losses"], rel=1e-4)
    restarted = tmp_path / "restarted"
    shutil.copytree(tmp_path / "hsdp" / "checkpoints" / "step-0000002", restarted / "checkpoints" / "step-0000002")
    resumed = step_losses(run_cli([*launcher, *train_args(world, restarted, *extra, "--resume")]))
    assert resumed == pytest.approx(four[2:], rel=1e-6)


RANK_MEMORY = """
import json, os, resource, sys
import torch
import torch.distributed.checkpoint.state_dict, torch.distributed.fsdp  # imported before measuring
from transformers import LlamaForCausalLM
from lori.train import TrainConfig
from lori.train.loop import _load_sharded
from lori.train.world import World
from lori import LoRIConfig
world = World()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cfg = TrainConfig(model=sys.argv[1], data=sys.argv[1], output=sys.argv[2], adapter=LoRIConfig(r=8, block=(16, 8)))
model, _ = _load_sharded(cfg, world, torch.float32, None, bf16=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
with open(os.path.join(sys.argv[2], f"rank{world.rank}.json"), "w") as f:
    json.dump({"peak_growth": after - before, "shard": shard}, f)
world.close()
"""


@pytest.mark.slow
def test_only_rank_0_reads_the_weights(tmp_path):
    """Two processes: rank 1 builds the model on meta and receives its shard by broadcast,
    one tensor at a time, so its peak memory grows by its shard and little more; with every
    rank loading the model (as before) it would grow by the whole model and its shard."""
    from test_model import TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 16})
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    (tmp_path / "load.py").write_text(RANK_MEMORY)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # Large tensors mmapped, so that a freed one leaves the resident set (glibc otherwise keeps
    # freed heap pages): the peak RSS then follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    run_cli([*launcher, str(tmp_path / "load.py"), str(tmp_path / "base"), str(tmp_path)], env=env)
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1["shard"] < 0.55 * size
    assert rank1["peak_growth"] < rank1["shard"] + 0.3 * size, (rank1, size)


@pytest.mark.slow
def test_accelerate_with_the_committed_config_equals_one_process(world, tmp_path):
    """examples/accelerate_fsdp2.yaml, its process count overridden: 2 processes on the CPU
    (accelerate's --cpu would start one)."""
    single = train(config(world, tmp_path / "one", batch_size=8, max_steps=3))
    config_file = Path(__file__).resolve().parents[1] / "examples" / "accelerate_fsdp2.yaml"
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config_file),
                "--num_processes", "2", "-m", "lori.cli"]  # fmt: skip
    extra = ("--batch-size", "4", "--max-steps", "3", "--log-every", "1")
    two = step_losses(run_cli([*launcher, *train_args(world, tmp_path / "acc", *extra)]))
    assert two == pytest.approx(single["losses"], rel=1e-4)
