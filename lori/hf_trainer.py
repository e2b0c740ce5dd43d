"""transformers' ``Trainer`` on a model with LoRI adapters: checkpoints and ``save_model``
hold the compact adapter and never the base weights, and ``resume_from_checkpoint``
continues the run exactly.

Writing needs nothing of this module: a ``Trainer`` saves a ``PreTrainedModel`` through its
``save_pretrained``, which on a LoRI model writes the adapter (``lori.peft_api``); the
optimizer, scheduler, RNG and trainer state are the Trainer's own files beside it. Reading
back is what ``LoRITrainerMixin`` adds: a ``Trainer`` reloads only full weights or a
``peft.PeftModel``'s adapter, and knows nothing of the count of training forwards that
LoRI's dropout masks are drawn from. It also runs continual learning: with
``frozen_blocks`` (``lori.continual.stack_adapter``) only the task's blocks train and the
loaded adapter's other blocks keep their values bit for bit, as in ``lori train
--init-adapter``. The mixin goes before any ``Trainer`` class:
``LoRITrainer`` is the one for ``transformers.Trainer``; for TRL,
``class LoRISFTTrainer(LoRITrainerMixin, trl.SFTTrainer): pass``. It overrides the
Trainer's loading, RNG state and training step, adds a callback for continual learning, and
patches nothing.

Tested in one process. Under data parallel (DDP) every process holds the whole adapter and
the first writes it; FSDP or DeepSpeed through the Trainer are not supported (``lori train``
is the sharded path).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel, Trainer, TrainerCallback

from lori.checkpoint import load_lori
from lori.continual import FrozenBlocks
from lori.errors import TrainingError
from lori.files import atomic_file, read_json
from lori.model import set_dropout_calls

__all__ = ["DROPOUT_STATE_FILE", "LoRITrainer", "LoRITrainerMixin"]

# Beside the Trainer's rng_state.pth: how many training forwards the model had run.
DROPOUT_STATE_FILE = "lori_dropout_state.json"


class LoRITrainerMixin:
    """Resuming a ``Trainer`` (or a subclass) on a LoRI model from the checkpoints it
    wrote: the adapter is loaded into the model's own (same layers and kept blocks, so
    LoRI-S masks carry over), ``load_best_model_at_end`` likewise, and the count of
    training forwards comes back with the Trainer's RNG state, so dropout draws the masks
    the uninterrupted run would have drawn. ``frozen_blocks``: the keeper of the blocks that
    must not change (continual learning); their gradients are zeroed after each backward, so
    clipping sees only the trained blocks, and their values written back after each
    optimizer step."""

    def __init__(self, *args, frozen_blocks: FrozenBlocks | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.model, "lori_config", None) is None or not isinstance(self.model, PreTrainedModel):
            raise TypeError(
                f"{type(self).__name__} trains a transformers PreTrainedModel with LoRI adapters "
                f"(lori.get_lori_model); got a {type(self.model).__name__} without them"
            )
        self.frozen_blocks = frozen_blocks
        if frozen_blocks is not None:
            self.add_callback(_RestoreFrozenBlocks(frozen_blocks))

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.frozen_blocks is not None:
            self.frozen_blocks.mask_grads()
        return loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_lori(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_lori(self.model, self.state.best_model_checkpoint)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            with atomic_file(Path(output_dir) / DROPOUT_STATE_FILE) as tmp:
                tmp.write_text(json.dumps({"dropout_calls": int(self.model.dropout_calls)}))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = Path(checkpoint) / DROPOUT_STATE_FILE
        if path.is_file():
            set_dropout_calls(self.model, int(read_json(path, "LoRI Trainer checkpoint")["dropout_calls"]))
        elif self.model.lori_config.dropout > 0:
            raise TrainingError(
                f"{checkpoint} has no {DROPOUT_STATE_FILE} (it was not written by a LoRITrainer), so the adapter's "
                "dropout masks cannot continue where the run stopped"
            )


class _RestoreFrozenBlocks(TrainerCallback):
    def __init__(self, frozen_blocks: FrozenBlocks):
        self.frozen_blocks = frozen_blocks

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.frozen_blocks.restore()


class LoRITrainer(LoRITrainerMixin, Trainer):
    """``transformers.Trainer`` for a model with LoRI adapters (``LoRITrainerMixin``)."""
