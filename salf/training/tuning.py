"""From the user's ``TrainConfig`` to the one actually trained: ``--lr auto`` and a compute budget.

(The batch, rates and warm-up left out come from the recipe of the run's kind, ``salf.training.recipes``.)
``--lr auto`` searches the rate for the plan
being trained (``salf.training.lrsearch``); ``--match-compute RUN`` / ``--max-flops N`` size the run to
a FLOPs budget (``salf.training.budget``). What was decided, and what deciding cost, is returned for
metrics.json.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from salf.errors import SalfError
from salf.method.freeze import FreezeSpec
from salf.models.arch import find_parts
from salf.training.budget import estimate_steps, flops_of_run
from salf.training.config import TrainConfig
from salf.training.lrsearch import LRSearchConfig, TunedModel, search_learning_rate
from salf.training.outputs import prepare_out_dir


def compute_budget(match_compute: str | None, max_flops: float | None) -> float | None:
    """The FLOPs budget asked for: another run's measured training FLOPs, or a number (not both)."""
    if match_compute is not None and max_flops is not None:
        raise SalfError("--match-compute and --max-flops both give a FLOPs budget", "pass one of them")
    if match_compute is not None:
        return flops_of_run(match_compute)
    return max_flops


def size_to_budget(model: nn.Module, pad_id: int, train_data: Sequence[dict], spec: FreezeSpec | None,
                   config: TrainConfig, budget: float) -> tuple[TrainConfig, dict[str, Any]]:
    """Set ``max_steps`` (the schedule) from this plan's estimated step FLOPs and ``max_flops`` (the stop)."""
    if config.max_steps is not None:
        raise SalfError("--max-steps and a FLOPs budget both set the run's length",
                        "leave --max-steps out: the budget decides how many steps fit")
    spec = spec if spec is not None else FreezeSpec.full(find_parts(model).num_layers)
    steps, per_step = estimate_steps(model, train_data, spec, pad_id, config.batch_size, budget, config.seed)
    return replace(config, max_steps=steps, max_flops=budget), {
        "budget_flops": budget, "estimated_steps": steps, "estimated_step_flops": per_step}


def search_rate(load_model: Callable[[], nn.Module], tokenizer: Any, train_data: Sequence[dict],
                spec: FreezeSpec | None, config: TrainConfig, task: str, out: str | Path,
                progress: Callable[[str], None] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """Run ``--lr auto``'s search (candidates in a temporary folder, within ``config.lr_search_budget`` of the
    run's steps) and return the config with the chosen rates. ``config`` is resolved (``resolve_recipe``)."""
    if not (config.overwrite or config.resume):
        prepare_out_dir(Path(out), config)  # refuse a non-empty --out now, not after the search
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="salf-lr-search-") as work:
        result = search_learning_rate(TunedModel(load_model, tokenizer), train_data, spec, config, work, task,
                                      LRSearchConfig(budget=config.lr_search_budget), progress=progress)
    tuned = replace(config, learning_rate=result.learning_rate, head_learning_rate=result.head_learning_rate)
    return tuned, {**result.to_dict(), "wall_seconds": time.perf_counter() - start}


__all__ = ["compute_budget", "search_rate", "size_to_budget"]
