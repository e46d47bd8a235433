"""What a training run is given besides the model and its config: its data, and what to record and call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from salf.config.data import TASKS
from salf.errors import SalfError


@dataclass(frozen=True)
class TrainingData:
    """The tokenized data of a run (``salf.data.tasks.TaskData.data`` rows) and the task they are for."""

    train: Sequence[dict]
    """The training data: ``{"input_ids": [...], "labels": [...] or int}`` each."""
    eval: Sequence[dict] | None = None
    """Held-out data evaluated at the end (and every ``eval_steps``); None: no evaluation."""
    task: str = "lm"
    """'lm', 'completion' or 'classification' (``salf.config.Task``)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SalfError(f"unknown task {self.task!r}", f"use one of {', '.join(TASKS)}")

    @classmethod
    def of(cls, data: TrainingData | Sequence[dict]) -> TrainingData:
        """``data`` as it is, or plain rows as language-modelling training data without evaluation."""
        return data if isinstance(data, TrainingData) else cls(data)


@dataclass(frozen=True)
class RunExtras:
    """What a run records and calls besides training: the plan it follows, callbacks, per-datum boundaries."""

    plan_dict: dict | None = None
    """The plan (``Plan.to_dict()``), written beside the run's outputs as plan.json."""
    callbacks: Sequence[Any] = ()
    """More ``transformers.TrainerCallback`` objects for the Trainer."""
    boundaries: Sequence[int] | None = None
    """One boundary per training datum (``salf.training.perdatum``); None: the spec's one boundary."""
