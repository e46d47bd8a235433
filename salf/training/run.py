"""``train``: fine-tune a model with a plan, choosing how the data reach it from what the run asks for.

- ``boundaries`` (one per training datum, ``salf.training.perdatum``): each batch trains from its own
  data's boundary (``PerDatumStrategy``);
- ``config.prefix_cache`` (a directory, ``salf.training.cache``): the frozen prefix runs once into a
  cache and training feeds the first trainable block from it (``PrefixCacheStrategy``);
- neither: batch by batch through the whole model.

This is the one place that names the strategies; the loop (``salf.training.trainer.fit``) only sees
the ``salf.training.strategy`` contract.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from salf.method.freeze import FreezeSpec
from salf.training.cache import PrefixCacheStrategy
from salf.training.config import TrainConfig
from salf.training.inputs import RunExtras, TrainingData
from salf.training.perdatum import PerDatumStrategy
from salf.training.strategy import TrainingStrategy
from salf.training.trainer import fit


def choose_strategy(config: TrainConfig, boundaries: Sequence[int] | None) -> TrainingStrategy | None:
    """The strategy a run asks for (None: the plain loop). Asking for both is refused by the per-datum
    strategy, which needs every batch to pick its own prefix."""
    if boundaries is not None:
        return PerDatumStrategy(boundaries)
    if getattr(config, "prefix_cache", None) is not None:
        return PrefixCacheStrategy()
    return None


def train(
    model: nn.Module,
    tokenizer_or_pad_id: Any,
    data: TrainingData | Sequence[dict],
    spec: FreezeSpec | None,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    extras: RunExtras = RunExtras(),
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` with ``spec`` (None: full fine-tuning); returns the metrics written to
    metrics.json. ``data``: a ``TrainingData`` (training and evaluation rows, the task), or plain rows for
    language modelling without evaluation.

    The model is trained in place (with LoRA, adapters are injected into it). Raises ``SalfError`` on
    a non-finite loss (naming the step and the last good checkpoint) and ``TrainingInterrupted`` after
    SIGINT/SIGTERM (a checkpoint is saved first); ``salf.training.trainer.fit`` lists what is written.

    ``extras.boundaries``: one boundary per training datum (``salf.training.perdatum``); batches then group
    data of one boundary and each step trains from its batch's boundary up (``spec`` must be None or the
    boundary of the smallest). ``config.prefix_cache`` trains from a frozen-prefix cache
    (``salf.training.cache``). Under torchrun/accelerate only the main process writes files
    (docs/DISTRIBUTED.md).
    """
    return fit(model, tokenizer_or_pad_id, data, spec, config, out_dir, extras,
               strategy=choose_strategy(config, extras.boundaries))
