"""transformers' Trainer (and TRL's SFTTrainer) on a LoRI model: checkpoints hold the compact
adapter and the Trainer's optimizer and scheduler state, never the base weights;
``save_model`` writes the adapter; resuming from a checkpoint follows the uninterrupted run's
losses exactly, dropout and LoRI-S masks included."""

import pytest
import torch
from safetensors.torch import load_file
from test_model import TINY, randomize_b, tiny_model
from transformers import Trainer, TrainingArguments

import lori
from lori import LoRIConfig
from lori.checkpoint import ADAPTER_FILES, TENSORS_FILE
from lori.continual import stack_adapter
from lori.errors import TrainingError
from lori.hf_trainer import DROPOUT_STATE_FILE, LoRITrainer, LoRITrainerMixin

STEPS, SAVE_AT = 6, 3
WHOLE_MODEL_FILES = {
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
}
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


@pytest.fixture(autouse=True)
def one_thread():
    """Ops this small run faster on one thread than handed to a busy machine's second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordLosses:
    """Keeps every training step's loss (the Trainer logs them rounded)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


class Recording(RecordLosses, LoRITrainer):
    pass


class PlainRecording(RecordLosses, Trainer):
    pass


def dataset(n=24, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, TINY["vocab_size"], (length,), generator=g).tolist() for _ in range(n)]
    return [{"input_ids": ids, "labels": ids} for ids in rows]


def lori_model(masks=None, dropout=0.0):
    return lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 4), seed=3, dropout=dropout), masks=masks)


def lori_s_masks():
    model = lori_model()
    randomize_b(model, 7)
    return lori.extract_masks(model, sparsity=0.75)


def arguments(output_dir, args_class=TrainingArguments, **more):
    defaults = dict(max_steps=STEPS, save_steps=SAVE_AT, per_device_train_batch_size=4, learning_rate=1e-2, seed=0)
    return args_class(
        output_dir=str(output_dir),
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **{**defaults, **more},
    )


def train(trainer_class, model, output_dir, resume=None, args=None, **kwargs):
    args = args or arguments(output_dir)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset(), **kwargs)
    trainer.losses = []
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


def b_values(model):
    return {name: layer.b_values.detach().clone() for name, layer in lori.lori_layers(model).items()}


def assert_same_b(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_compact_checkpoint(path, model):
    files = {p.name for p in path.iterdir()}
    assert not files & WHOLE_MODEL_FILES, files
    assert set(ADAPTER_FILES) | TRAINER_FILES <= files, files
    adapter = load_file(path / TENSORS_FILE)
    assert all(name.rsplit(".", 1)[0] in lori.lori_layers(model) for name in adapter), sorted(adapter)[:3]
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert sum(p.stat().st_size for p in path.iterdir()) < base_bytes / 2


@pytest.mark.parametrize("masked, dropout", [(False, 0.0), (True, 0.1)], ids=["LoRI-D", "LoRI-S with dropout"])
def test_checkpoints_are_compact_and_resume_exactly(tmp_path, masked, dropout):
    masks = lori_s_masks() if masked else None
    whole = train(Recording, lori_model(masks, dropout), tmp_path / "whole")
    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    assert_compact_checkpoint(checkpoint, whole.model)
    assert (checkpoint / DROPOUT_STATE_FILE).is_file()

    resumed = train(Recording, lori_model(masks, dropout), tmp_path / "resumed", resume=checkpoint)
    assert len(whole.losses) == STEPS
    assert resumed.losses == whole.losses[SAVE_AT:]
    assert_same_b(b_values(resumed.model), b_values(whole.model))

    whole.save_model()  # into the output directory, beside its checkpoints
    out = tmp_path / "whole"
    assert not {p.name for p in out.iterdir()} & WHOLE_MODEL_FILES
    assert (out / f"checkpoint-{STEPS}").is_dir()
    restored = lori.load_lori(tiny_model(), out)
    assert_same_b(b_values(restored), b_values(whole.model))
    if masked:
        for name, layer in lori.lori_layers(restored).items():
            assert torch.equal(layer.mask(), masks[name].to(layer.mask().device)), name


def test_quantized_base_checkpoints_are_compact_and_resume_exactly(tmp_path):
    """QLoRA-style: LoRI-S with dropout over an NF4 base (``lori.quantize_base``) under
    ``LoRITrainer``: compact checkpoints, an exact resume, the adapter loads onto a new base."""
    pytest.importorskip("torchao")
    masks = lori_s_masks()

    def qlora_model():
        base = lori.quantize_base(tiny_model(), "nf4", group_size=32)
        return lori.get_lori_model(base, LoRIConfig(r=8, block=(16, 4), seed=3, dropout=0.1), masks=masks)

    whole = train(Recording, qlora_model(), tmp_path / "whole")
    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    assert_compact_checkpoint(checkpoint, whole.model)
    resumed = train(Recording, qlora_model(), tmp_path / "resumed", resume=checkpoint)
    assert resumed.losses == whole.losses[SAVE_AT:]
    assert_same_b(b_values(resumed.model), b_values(whole.model))
    whole.save_model()
    restored = lori.load_lori(lori.quantize_base(tiny_model(), "nf4", group_size=32), tmp_path / "whole")
    assert_same_b(b_values(restored), b_values(whole.model))


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    scores = iter([1.0, 0.0])  # the first checkpoint scores best, so the model goes back to it
    args = arguments(
        tmp_path,
        eval_strategy="steps",
        eval_steps=SAVE_AT,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
    )
    trainer = train(
        Recording,
        lori_model(),
        tmp_path,
        args=args,
        eval_dataset=dataset(4, seed=2),
        compute_metrics=lambda predictions: {"score": next(scores)},
    )
    best = trainer.state.best_model_checkpoint
    assert best.endswith(f"checkpoint-{SAVE_AT}")
    assert_same_b(b_values(trainer.model), b_values(lori.load_lori(tiny_model(), best)))
    last = b_values(lori.load_lori(tiny_model(), tmp_path / f"checkpoint-{STEPS}"))
    assert not all(torch.equal(value, last[name]) for name, value in b_values(trainer.model).items())


def test_continual_learning_keeps_the_loaded_blocks(tmp_path):
    first = lori_model()
    randomize_b(first, 5)
    first.save_pretrained(tmp_path / "first")
    task = lori_s_masks()

    def stacked():
        model = tiny_model()
        return model, stack_adapter(model, str(tmp_path / "first"), task)

    model, frozen = stacked()
    loaded = b_values(model)
    args = arguments(tmp_path / "whole", weight_decay=0.1)  # decay would shrink the kept blocks
    whole = train(Recording, model, tmp_path / "whole", args=args, frozen_blocks=frozen)
    changed = 0
    for name, layer in lori.lori_layers(whole.model).items():
        trains = frozen.trainable[name].reshape(-1) > 0
        assert torch.equal(layer.b_values[~trains], loaded[name][~trains]), name
        changed += int(trains.any() and not torch.equal(layer.b_values[trains], loaded[name][trains]))
    assert changed == sum(int(t.any()) for t in frozen.trainable.values()) > 0

    model, frozen = stacked()
    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    resumed = train(Recording, model, tmp_path / "resumed", checkpoint, args, frozen_blocks=frozen)
    assert resumed.losses == whole.losses[SAVE_AT:]
    assert_same_b(b_values(resumed.model), b_values(whole.model))


def test_plain_trainer_writes_the_adapter_that_lori_trainer_resumes(tmp_path):
    whole = train(PlainRecording, lori_model(), tmp_path / "whole")
    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    assert_compact_checkpoint(checkpoint, whole.model)
    assert not (checkpoint / DROPOUT_STATE_FILE).exists()
    with pytest.raises(ValueError, match="Can't find a valid checkpoint"):  # the Trainer reads whole models only
        train(PlainRecording, lori_model(), tmp_path / "plain", resume=checkpoint)
    resumed = train(Recording, lori_model(), tmp_path / "resumed", resume=checkpoint)
    assert resumed.losses == whole.losses[SAVE_AT:]
    # With dropout the count of forwards is missing from a plain Trainer's checkpoint.
    with pytest.raises(TrainingError, match=DROPOUT_STATE_FILE):
        train(Recording, lori_model(dropout=0.1), tmp_path / "dropout", resume=checkpoint)


def test_lori_trainer_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(TypeError, match="without them"):
        LoRITrainer(model=tiny_model(), args=arguments(tmp_path), train_dataset=dataset())


def test_sft_trainer_checkpoints_are_compact_and_resume_exactly(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from lori.toy import build_tokenizer, caesar_examples

    class SFTRecording(RecordLosses, LoRITrainerMixin, trl.SFTTrainer):
        pass

    tokenizer = build_tokenizer(tmp_path / "tokenizer")  # 34 tokens, within the tiny model's vocabulary
    examples = Dataset.from_list(
        [{"prompt": e["prompt"], "completion": e["response"]} for e in caesar_examples(24, 1, 0)]
    )

    def run(output_dir, resume=None):
        # SFTConfig's default: bfloat16 autocast, under which the LoRI layers run in bfloat16.
        args = arguments(output_dir, trl.SFTConfig, max_length=32)
        trainer = SFTRecording(
            model=lori_model(dropout=0.1), args=args, train_dataset=examples, processing_class=tokenizer
        )
        trainer.losses = []
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        return trainer

    whole = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    assert_compact_checkpoint(checkpoint, whole.model)
    resumed = run(tmp_path / "resumed", checkpoint)
    assert resumed.losses == whole.losses[SAVE_AT:]
    whole.save_model()
    assert_same_b(b_values(lori.load_lori(tiny_model(), tmp_path / "whole")), b_values(whole.model))
