"""``TrainConfig`` (defined in ``salf.config.train``, where every option lives) and ``TrainingInterrupted``."""

from __future__ import annotations

from salf.config.data import TASKS
from salf.config.train import TrainConfig
from salf.errors import SalfError


class TrainingInterrupted(SalfError):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint; resume continues it."""

    def __init__(self, step: int, checkpoint: str | None):
        self.step = step
        self.checkpoint = checkpoint
        where = f"checkpoint saved at {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"training interrupted at step {step}; {where}", "run again with resume to continue")



__all__ = ["TASKS", "TrainConfig", "TrainingInterrupted"]
