"""Compute-matched training: train a plan for as many steps as fit in a FLOPs budget.

A plan that saves compute can spend the saving on more steps instead. ``salf train --match-compute
runs/full`` reads the other run's measured training FLOPs (its metrics.json) and ``--max-flops N`` takes
N; the run then

1. sets its schedule (``max_steps``) from an estimate: one real step of this plan on a batch of the
   training data, counted with ``FlopCounterMode`` (``measure_step_flops``), scaled per padded token
   to the expected padded length of a batch (dynamic padding: the longest datum of each batch);
2. stops, whatever the estimate said, before the measured FLOPs would pass the budget: the trainer's
   FLOP count (FLOPs per padded token x padded tokens so far, as metrics.json reports it) plus the
   largest step the data allow (batch size x the longest datum) must fit (``flops_budget_stop``), so
   the run ends less than one step below the budget and never above it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from salf.data.batch import collate
from salf.errors import SalfError
from salf.method.cost_counting import measure_step_flops
from salf.method.freeze import FreezeSpec, apply_plan


def flops_of_run(run_dir: str | Path) -> float:
    """The measured training FLOPs of a finished salf run (its metrics.json ``train_flops``)."""
    path = Path(run_dir)
    path = path / "metrics.json" if path.is_dir() else path
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise SalfError(f"{path} not found: --match-compute needs a finished salf training run",
                        "pass the --out folder of a `salf train` run (it holds metrics.json), or --max-flops N") from None
    except ValueError as exc:
        raise SalfError(f"{path} is not valid JSON ({exc})", "pass the --out folder of a finished salf train run") from exc
    flops = metrics.get("train_flops") if isinstance(metrics, dict) else None
    if not isinstance(flops, (int, float)) or not math.isfinite(flops) or flops <= 0:
        raise SalfError(f"{path} records no measured training FLOPs",
                        "train that run with FLOP measurement on (the default), or pass --max-flops N")
    return float(flops)


def expected_padded_tokens(data: Sequence[dict], batch_size: int, seed: int = 0, draws: int = 256) -> float:
    """Mean padded tokens of a random batch (batch size x its longest datum), by sampling batches."""
    lengths = np.array([len(d["input_ids"]) for d in data])
    if lengths.size == 0:
        raise SalfError("no training data to size a compute budget with", "give a non-empty training file")
    rng = np.random.default_rng(seed)
    size = min(batch_size, lengths.size)
    widths = [lengths[rng.choice(lengths.size, size, replace=False)].max() for _ in range(draws)]
    return float(size * np.mean(widths))


def flops_per_padded_token(model: nn.Module, data: Sequence[dict], spec: FreezeSpec, pad_id: int,
                           batch_size: int) -> float:
    """FLOPs of one training step of ``spec`` per padded token, measured on the first batch of ``data``."""
    batch = collate(list(data[:batch_size]), pad_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    report = apply_plan(model, spec)
    was_training = model.training
    try:
        model.train()
        step = measure_step_flops(model, batch)
    finally:
        model.train(was_training)
        report.remove()
        model.zero_grad(set_to_none=True)
    return step.total / batch["input_ids"].numel()


def steps_for_budget(budget: float, per_token: float, padded_tokens_per_step: float) -> int:
    """Whole steps of ``per_token x padded_tokens_per_step`` FLOPs that fit in ``budget`` (at least 1)."""
    if not (math.isfinite(budget) and budget > 0):
        raise SalfError(f"the FLOPs budget must be a positive number, got {budget}", "pass --max-flops N with N > 0")
    per_step = per_token * padded_tokens_per_step
    steps = math.floor(budget / per_step)
    if steps < 1:
        raise SalfError(f"the FLOPs budget {budget:.3g} does not fit one step of this plan ({per_step:.3g} FLOPs)",
                        "raise --max-flops, or lower --batch-size")
    return steps


def flops_budget_stop(spent: float, next_step: float, budget: float) -> bool:
    """True when one more step of (at most) ``next_step`` FLOPs could take the run past ``budget``."""
    return spent + next_step > budget


class FlopBudgetStop(TrainerCallback):
    """Ends training before the measured FLOPs would pass ``budget`` (``flops_budget_stop``).

    Reads the FLOP count of a ``SalfCallback`` listed before it (FLOPs per padded token x padded tokens);
    ``max_step_tokens`` bounds the padded tokens of any step (batch size x longest datum);
    ``tokens_before`` counts the padded tokens of the steps a resumed run already took.
    """

    def __init__(self, budget: float, counter: Any, max_step_tokens: int, tokens_before: int = 0):
        self.budget, self.counter = budget, counter
        self.max_step_tokens, self.tokens_before = max_step_tokens, tokens_before
        self.stopped_at: int | None = None

    def spent(self) -> float | None:
        per_token = self.counter.flops_per_padded_token
        return None if per_token is None else per_token * (self.tokens_before + self.counter.padded_tokens)

    def on_step_end(self, args, state, control, **kwargs):
        spent = self.spent()
        if spent is not None and flops_budget_stop(
                spent, self.counter.flops_per_padded_token * self.max_step_tokens, self.budget):
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def estimate_steps(model: nn.Module, data: Sequence[dict], spec: FreezeSpec, pad_id: int, batch_size: int,
                   budget: float, seed: int = 0) -> tuple[int, float]:
    """(steps, estimated FLOPs per step) for a run of ``spec`` on ``data`` within ``budget`` FLOPs."""
    with torch.random.fork_rng():  # the measured step must not move the run's random state (dropout)
        per_token = flops_per_padded_token(model, data, spec, pad_id, batch_size)
    per_step_tokens = expected_padded_tokens(data, batch_size, seed)
    return steps_for_budget(budget, per_token, per_step_tokens), per_token * per_step_tokens


__all__ = ["FlopBudgetStop", "estimate_steps", "expected_padded_tokens", "flops_budget_stop", "flops_of_run",
           "flops_per_padded_token", "steps_for_budget"]
