"""Training LoRI adapters (LoRI-D, or LoRI-S with masks), single process or FSDP2.

The same code runs alone or under ``torchrun``/``accelerate launch``: with a world size
above one it shards the model with ``torch.distributed.fsdp.fully_shard`` (each decoder
layer, then the root; gloo on CPU, NCCL on GPUs). Only the compact ``b_values`` train, so
gradients and AdamW state are proportional to the kept blocks.

A run is reproducible and resumable: the data order comes from a seed, the loss of a
step is the sum over every response token of the global batch divided by their count
(the same with any number of processes), and checkpoints hold the adapter, the optimizer
state (safetensors), the schedule and the dropout counts, so a restarted run continues
the same loss curve.

Nothing is lost: every option is checked before anything is loaded; a new run refuses an
output directory holding an earlier run (``resume`` continues it, ``overwrite_output``
starts over); checkpoints are written crash-safely with checksums that bind their files
together (``trainer_state.json`` names the optimizer file's and the adapter's SHA-256,
the optimizer file records the state's digest); a non-finite loss or gradient norm stops
the run before the update that would spoil the adapter, keeping the last good checkpoint.

Modules: ``config`` (``TrainConfig``), ``world`` (processes, FSDP2 sharding, loading the
base model), ``checkpoint`` (the run directory and its checkpoints), ``loop`` (the run).
"""

from lori.train.checkpoint import read_checkpoint
from lori.train.config import TrainConfig
from lori.train.loop import train

__all__ = ["TrainConfig", "read_checkpoint", "train"]
