"""From the user's flags to the ``TrainConfig`` actually trained: recipe defaults, ``--lr auto``, compute budget.

``salf train`` leaves out what the user did not say: the batch, rates and warm-up come from the
recipe of the run's kind (``salf.training.recipes``); ``--lr auto`` searches the rate for the plan
being trained (``salf.training.lrsearch``); ``--match-compute RUN`` / ``--max-flops N`` size the run to
a FLOPs budget (``salf.training.budget``). What was decided, and what deciding cost, is returned for
metrics.json.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
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
from salf.training.recipes import default_recipe, recipe_kind

AUTO = "auto"


def parse_learning_rate(text: str | float | None) -> float | str | None:
    """A learning rate flag: 'auto', or a positive finite number (None: the recipe's)."""
    if text is None or text == AUTO:
        return text
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SalfError(f"--lr must be a positive number or 'auto', got {text!r}", "e.g. --lr 1e-4, or --lr auto") from None
    if not math.isfinite(value) or value <= 0:
        raise SalfError(f"--lr must be a positive finite number, got {text!r}", "e.g. --lr 1e-4, or --lr auto")
    return value


@dataclass(frozen=True)
class Flags:
    """The recipe-related flags as the user gave them (None: not given)."""

    lr: float | str | None = None
    head_lr: float | None = None
    batch_size: int | None = None
    warmup_ratio: float | None = None
    epochs: float | None = None


def recipe_config(task: str, flags: Flags, width: int | None = None, **config: Any) -> tuple[TrainConfig, dict[str, Any]]:
    """The ``TrainConfig`` of a run: the flags given, the recipe of the run's kind for the rest.

    ``width``: the model's hidden size, which scales the recipe's body rate (``Recipe.learning_rate_for``).
    """
    lora = bool(config.get("lora", False))
    recipe = default_recipe(task, lora)
    scaled = recipe.learning_rate_for(width)
    body = scaled if flags.lr in (None, AUTO) else float(flags.lr)  # pipeline parsed it
    head = flags.head_lr if flags.head_lr is not None else recipe.head_learning_rate
    cfg = TrainConfig(learning_rate=body, head_learning_rate=head,
                      batch_size=flags.batch_size or recipe.batch_size,
                      warmup_ratio=recipe.warmup_ratio if flags.warmup_ratio is None else flags.warmup_ratio,
                      epochs=recipe.epochs if flags.epochs is None else flags.epochs, **config)
    given = {k: v for k, v in asdict(flags).items() if v is not None}
    return cfg, {"kind": recipe_kind(task, lora), "recipe": asdict(recipe), "model_width": width,
                 "learning_rate_for_width": scaled, "flags_given": given}


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
                spec: FreezeSpec | None, config: TrainConfig, task: str, out: str | Path, budget: float,
                progress: Callable[[str], None] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """Run ``--lr auto``'s search (candidates in a temporary folder) and return the config with the chosen rates."""
    if not (config.overwrite or config.resume):
        prepare_out_dir(Path(out), config)  # refuse a non-empty --out now, not after the search
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="salf-lr-search-") as work:
        result = search_learning_rate(TunedModel(load_model, tokenizer), train_data, spec, config, work, task,
                                      LRSearchConfig(budget=budget), progress=progress)
    tuned = replace(config, learning_rate=result.learning_rate, head_learning_rate=result.head_learning_rate)
    return tuned, {**result.to_dict(), "wall_seconds": time.perf_counter() - start}


__all__ = ["AUTO", "Flags", "compute_budget", "parse_learning_rate", "recipe_config", "search_rate", "size_to_budget"]
