"""The errors the library raises on purpose. Each message is one sentence that names the
file, option or layer at fault; the ``lori`` command prints it as its one line on stderr."""

from __future__ import annotations

__all__ = ["CheckpointError", "LoRIError", "OutputError", "TrainingError"]


class LoRIError(Exception):
    """Base of the library's own errors."""


class CheckpointError(LoRIError, ValueError):
    """A file that cannot be read as what it should be (a LoRI adapter, masks, a PEFT
    adapter, a training checkpoint); the message names the file and says why."""


class OutputError(LoRIError, ValueError):
    """An output that is refused before anything is written: it would replace or delete
    what the library did not write, or it cannot be written."""


class TrainingError(LoRIError, RuntimeError):
    """A training run that stopped: a non-finite loss or gradient norm, or a resume that
    cannot continue the run exactly."""
