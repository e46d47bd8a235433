"""The contract between the training loop and a data strategy (prefix cache, per-datum boundaries).

By default the loop (``salf.training.trainer.fit``) feeds every batch through the whole model. A
strategy changes how the training data reach the model: it may change the plan before the optimizer is
built (``plan_spec``), then hands the loop a ``Batching``: the dataset, collator and batch sampler to
train with, hooks on the model that ``remove()`` takes off, and its own measurements for metrics.json.

The loop knows strategies only through this shape; ``salf.training.run.train`` picks the one a run
asks for. A new strategy needs no change to the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from salf.data.batch import ListDataset
from salf.method.freeze import FreezeReport, FreezeSpec
from salf.training.config import TrainConfig

INDEX_KEY = "salf_index"
"""Datum key holding the datum's position in the training data (added by ``IndexedDataset``)."""


class Batching(Protocol):
    """What a strategy hands the loop once the plan is applied."""

    dataset: torch.utils.data.Dataset
    collator: Callable[[Sequence[dict]], dict[str, torch.Tensor]]
    sampler: torch.utils.data.Sampler | None
    """A batch sampler (None: the Trainer's own shuffled batches)."""

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        """Add the strategy's measurements to the run's metrics (in place)."""

    def remove(self) -> None:
        """Take the strategy's hooks off the model and release what it opened."""


class TrainingStrategy(Protocol):
    """How the training data reach the model; see the module docstring."""

    def plan_spec(
        self, spec: FreezeSpec | None, n_data: int, num_layers: int, config: TrainConfig
    ) -> FreezeSpec | None:
        """The plan to apply and build the optimizer with (refuses what the strategy cannot train)."""

    def prepare(
        self,
        model: nn.Module,
        train_data: Sequence[dict],
        report: FreezeReport,
        pad_id: int,
        tokenizer: Any,
        config: TrainConfig,
        device: torch.device,
    ) -> Batching:
        """Called after the plan is applied and before the ``Trainer`` (and its optimizer) is built."""


class IndexedDataset(ListDataset):
    """A list of data whose items carry their position under ``INDEX_KEY`` (for per-datum lookups)."""

    def __getitem__(self, index: int) -> dict:
        return {**self.data[index], INDEX_KEY: int(index)}


def pop_indices(data: Sequence[dict]) -> tuple[list[dict], list[int] | None]:
    """Split the ``INDEX_KEY`` off a batch of items; None when the items carry none (evaluation)."""
    if not data or INDEX_KEY not in data[0]:
        return list(data), None
    return [{k: v for k, v in d.items() if k != INDEX_KEY} for d in data], [int(d[INDEX_KEY]) for d in data]


__all__ = ["INDEX_KEY", "Batching", "IndexedDataset", "TrainingStrategy", "pop_indices"]
