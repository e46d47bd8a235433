"""``--lr auto``: a short, budgeted learning-rate search for the configuration actually trained.

A planned run freezes part of the model, and fewer trainable blocks often want a larger rate than full
fine-tuning, so the rate is searched for the plan being trained, not borrowed from another run. The
search is successive halving over a small log-spaced grid of multiples of the configured body rate. A
fresh classification head keeps its own rate (the recipe's, ``salf.training.recipes``): scaling it with the
body cost 1.7 points on MiniLM, Debian name -> section (body 3e-4 with head 6e-3: 87.8 against 89.9 with
head 2e-3, BENCHMARKS.md). Only a plan that trains no block (the head-only boundary) scales the head's rate,
since there is nothing else to tune:

1. Hold out a validation split of the training data (seeded), never the user's evaluation data.
2. Rung 0 trains every candidate for ``r_0`` steps from the same initial weights, data order and
   seed, on the tuned run's schedule compressed to ``r_0`` steps (same warm-up share, same decay),
   so every candidate reaches its peak rate: a few steps inside the real run's warm-up would hide
   the instability of a rate that is too large. The best ``1/eta`` by validation loss go on to the
   next rung, which trains them from scratch for more steps.
3. The budget is a share of the tuned run's steps, split equally between the rungs; the validation
   passes are charged to it too (an evaluation batch counts ``EVAL_STEP_SHARE`` of a training step),
   and the validation split is kept small enough to cost at most a third of a candidate's share.

The default grid has three rates and ``eta = 4``: one rung in which every rate gets the same short run
(with so few candidates, halving would spend half the budget on a cull after a few steps). A larger grid
or a smaller ``eta`` halves. What the search costs (steps, measured FLOPs and seconds) and every
candidate's score are returned, so they can be recorded beside the run they tune.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from salf.errors import SalfError
from salf.method.freeze import FreezeSpec
from salf.training.config import TrainConfig
from salf.training.inputs import TrainingData
from salf.training.run import train

LR_GRID_FACTORS = (1 / 3, 1.0, 3.0)
"""Candidate rates as multiples of the configured ones, half a decade apart around the recipe's rate. A
fourth at 10x was dropped on evidence: at a benchmark's 150 steps its short candidate run looked best on
one task and lost 1.6 points there, and 10x lost 7 points on another (BENCHMARKS.md, training recipe)."""

EVAL_STEP_SHARE = 0.5
"""An evaluation batch (forward only) counted as this share of a training step when the budget is split:
a forward pass is about a third of a full fine-tuning step and more of a planned one's."""


@dataclass(frozen=True)
class LRSearchConfig:
    """How the learning-rate search spends its budget."""

    budget: float = 0.15
    """Share of the tuned run's training steps the whole search may spend (candidates and validation)."""
    factors: tuple[float, ...] = LR_GRID_FACTORS
    """Candidate rates as multiples of the run's configured body rate (see the module docstring for the head)."""
    eta: int = 4
    """Successive halving keeps the best ceil(n / eta) candidates after each rung (eta >= n: one rung)."""
    val_fraction: float = 0.1
    """Share of the training data held out to score the candidates (clipped to ``val_min..val_max``)."""
    val_min: int = 32
    """Fewest validation data (never more than half the training data)."""
    val_max: int = 256
    """Most validation data: enough to rank rates by loss, cheap enough to evaluate often."""
    min_steps: int = 2
    """Fewest steps a candidate may train; a budget below that is an error, not a silent guess."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.budget) and 0 < self.budget <= 1):
            raise SalfError(f"the learning-rate search budget must be in (0, 1], got {self.budget}",
                            "pass --lr-search-budget as a share of the run's steps, e.g. 0.15")
        factors = tuple(float(f) for f in self.factors)
        if len(factors) < 2 or any(not (math.isfinite(f) and f > 0) for f in factors) or len(set(factors)) != len(factors):
            raise SalfError(f"the learning-rate grid needs at least two distinct positive factors, got {self.factors}",
                            "use multiples of the configured rate such as (1/3, 1, 3)")
        object.__setattr__(self, "factors", factors)
        if self.eta < 2:
            raise SalfError(f"eta must be at least 2, got {self.eta}", "keep the best half (2) or fewer per rung")
        if not 0 < self.val_fraction < 1:
            raise SalfError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 1 <= self.val_min <= self.val_max:
            raise SalfError(f"need 1 <= val_min <= val_max, got {self.val_min} and {self.val_max}")
        if self.min_steps < 1:
            raise SalfError(f"min_steps must be at least 1, got {self.min_steps}")


@dataclass
class Candidate:
    """One candidate's run in one rung."""

    factor: float
    learning_rate: float
    head_learning_rate: float | None
    rung: int
    steps: int
    val_loss: float
    val_accuracy: float | None
    seconds: float
    flops: float | None


@dataclass
class LRSearchResult:
    """The rate chosen, every candidate's score, and what the search cost."""

    factor: float
    """The chosen multiple of the configured body rate (and of the head's, for a head-only plan)."""
    learning_rate: float
    head_learning_rate: float | None
    """None when the head follows the body's rate (or gets the fresh-head rate of ``salf.training.train``)."""
    run_steps: int
    """Steps of the run the search tunes."""
    budget_steps: float
    """The budget in training steps (validation charged at ``EVAL_STEP_SHARE``)."""
    steps: int
    """Training steps the candidates took, all rungs together."""
    eval_batches: int
    """Validation batches evaluated, all candidates together."""
    seconds: float
    """Wall-clock seconds of the whole search (loading, training, validation)."""
    flops: float | None
    """Measured training FLOPs of the candidates (validation not included; None when not measured)."""
    val_size: int
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def step_share(self) -> float:
        """The search's cost in training-step equivalents, as a share of the tuned run's steps."""
        return (self.steps + EVAL_STEP_SHARE * self.eval_batches) / self.run_steps

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "step_share": self.step_share}


def run_steps(config: TrainConfig, train_size: int) -> int:
    """Optimizer steps of the run ``config`` describes on ``train_size`` data (one device)."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(math.ceil(train_size / config.batch_size) * config.epochs))


def rung_sizes(n: int, eta: int) -> list[int]:
    """Candidates per rung of successive halving: n, ceil(n/eta), ... down to the rung that picks one."""
    sizes = [n]
    while sizes[-1] > eta:
        sizes.append(math.ceil(sizes[-1] / eta))
    return sizes


def rung_steps(sizes: Sequence[int], budget_steps: float, eval_cost: float, min_steps: int) -> list[int]:
    """Steps per candidate in each rung: the budget split equally between rungs, validation charged first."""
    per_rung = budget_steps / len(sizes)
    steps = [math.floor((per_rung - n * eval_cost) / n) for n in sizes]
    if steps[0] < min_steps:
        need = len(sizes) * sizes[0] * (min_steps + eval_cost)
        raise SalfError(
            f"the learning-rate search budget ({budget_steps:.0f} step equivalents) is too small for "
            f"{sizes[0]} candidates of at least {min_steps} steps each (about {need:.0f} are needed)",
            "raise --lr-search-budget or --max-steps, or pass a fixed --lr",
        )
    return steps


@dataclass(frozen=True)
class SearchPlan:
    """How a search spends its budget on one run: validation size, and candidates and steps per rung."""

    run_steps: int
    budget_steps: float
    val_size: int
    eval_batches: int
    """Validation batches per candidate."""
    sizes: list[int]
    steps: list[int]


def plan_search(n_data: int, config: TrainConfig, search: LRSearchConfig) -> SearchPlan:
    """Size the validation split and the rungs so the whole search fits ``search.budget`` of the run.

    The validation split may cost at most a third of a first-rung candidate's share; a budget that
    cannot give each candidate ``min_steps`` steps and ``val_min`` validation data is an error.
    """
    total = run_steps(config, n_data)
    budget = search.budget * total
    sizes = rung_sizes(len(search.factors), search.eta)
    eval_batch = config.eval_batch_size or config.batch_size
    share = budget / len(sizes) / sizes[0]
    affordable = math.floor(share / 3 / EVAL_STEP_SHARE) * eval_batch
    size = min(max(round(search.val_fraction * n_data), search.val_min), search.val_max, n_data // 2, affordable)
    if size < search.val_min:
        raise SalfError(
            f"the learning-rate search budget ({budget:.0f} step equivalents for {sizes[0]} candidates) cannot "
            f"pay for validating each on {search.val_min} held-out data",
            "raise --lr-search-budget or --max-steps, or pass a fixed --lr",
        )
    eval_batches = math.ceil(size / eval_batch)
    steps = rung_steps(sizes, budget, EVAL_STEP_SHARE * eval_batches, search.min_steps)
    return SearchPlan(total, budget, size, eval_batches, sizes, steps)


def split_validation(data: Sequence[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(rest, validation): a seeded held-out split of ``size`` training data for scoring candidates."""
    n = len(data)
    size = min(size, n // 2)
    if size < 1:
        raise SalfError(f"{n} training data are too few for a learning-rate search",
                        "pass a fixed --lr, or give more training data")
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:size].tolist())
    return [d for i, d in enumerate(data) if i not in held], [data[i] for i in sorted(held)]


def _scaled(config: TrainConfig, factor: float, task: str, head_only: bool) -> TrainConfig:
    """The candidate's rates: the body's rate x ``factor``; the head's own rate unchanged unless ``head_only``."""
    if not head_only:
        return replace(config, learning_rate=config.learning_rate * factor)
    head = config.head_learning_rate  # resolved (salf.training.recipes.resolve_recipe)
    return replace(config, learning_rate=config.learning_rate * factor,
                   head_learning_rate=None if head is None else head * factor)


def validation_accuracy(metrics: dict) -> float | None:
    """What a candidate is ranked by before its loss: a classifier's accuracy, a completion task's exact
    match (teacher-forced, ``salf.training.eval_metrics``); None for plain text, which has only its loss."""
    return metrics.get("eval_accuracy", metrics.get("eval_exact_match"))


def _rank(c: Candidate) -> tuple:
    """Sort key, best first. A diverged candidate (non-finite loss) is last. With an accuracy (classification,
    or a completion's exact match), the higher validation accuracy wins, and among equal accuracies the
    configured rate (x1), then the lower loss: a short candidate run that has not yet changed what the model
    predicts says only how fast the loss moves, which favours the largest rate. Measured at 150 steps (5 steps
    a candidate, BENCHMARKS.md), ranking by loss alone chose 3x on all 8 benchmark tasks, and 3x left e5-small's
    word-order task at chance (50.0% against 78.9% at x1) while every candidate had the same validation
    accuracy; on the causal fixture's label-word tasks it chose 3x for LoRA, which reached 25.0% on the name
    task against the configured rate's 61.0%. Without an accuracy (plain text), the lower loss wins; ties go
    to the smaller rate."""
    diverged = not math.isfinite(c.val_loss)
    if c.val_accuracy is None:
        return (diverged, c.val_loss, c.factor)
    return (diverged, -round(c.val_accuracy, 9), c.factor != 1.0, c.val_loss, c.factor)


@dataclass(frozen=True)
class TunedModel:
    """The model the search tunes: a source of fresh copies, and how its batches are padded."""

    load: Callable[[], nn.Module]
    """Returns a fresh copy of the model (the same initial weights every call: the global torch seed is
    reset to the run's seed before each call, so a fresh head starts the same)."""
    tokenizer_or_pad_id: Any
    """The model's tokenizer, or the pad token id, as ``salf.training.run.train`` takes it."""

    def __post_init__(self) -> None:
        if not callable(self.load):
            raise SalfError(f"TunedModel.load must be callable, got a {type(self.load).__name__}",
                            "pass a function that returns a fresh copy of the model")


def search_learning_rate(
    model: TunedModel,
    train_data: Sequence[dict],
    spec: FreezeSpec | None,
    config: TrainConfig,
    work_dir: str | Path,
    task: str = "lm",
    search: LRSearchConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> LRSearchResult:
    """Successive halving over ``search.factors`` x the configured rates; returns the best by ``_rank``.

    ``model.load`` returns a fresh copy of the model to tune (the same initial weights every call: the
    global torch seed is reset to ``config.seed`` before each call, so a fresh head starts the same).
    ``work_dir`` holds the candidates' outputs (replaced on every call).
    """
    load_model, tokenizer_or_pad_id = model.load, model.tokenizer_or_pad_id
    search = search or LRSearchConfig()
    plan = plan_search(len(train_data), config, search)
    rest, val = split_validation(train_data, plan.val_size, config.seed)
    # A candidate that diverges is scored (inf), not raised; a prefix cache is built for the run itself only
    # (its keys cover the whole training data, not the candidates' share).
    base = replace(config, save_steps=None, eval_steps=None, resume=False, overwrite=True, prefix_cache=None,
                   show_progress=False, save_model=False, nan_check=False, max_flops=None, epochs=1.0)
    work = Path(work_dir)
    start = time.perf_counter()
    alive = list(search.factors)
    head_only = spec is not None and spec.lowest is None and not spec.embeddings  # no block to tune
    tried: list[Candidate] = []
    spent_eval = 0
    for rung, (size, n_steps) in enumerate(zip(plan.sizes, plan.steps)):
        scored: list[Candidate] = []
        for factor in alive[:size]:
            cfg = _scaled(replace(base, max_steps=n_steps), factor, task, head_only)
            if progress is not None:
                progress(f"lr search: rung {rung + 1}/{len(plan.sizes)}, lr {cfg.learning_rate:.3g} for {n_steps} steps")
            torch.manual_seed(config.seed)
            candidate = load_model()
            t0 = time.perf_counter()
            metrics = train(candidate, tokenizer_or_pad_id, TrainingData(rest, val, task), spec, cfg, work / f"rung{rung}-x{factor:g}")
            spent_eval += plan.eval_batches
            loss = metrics.get("eval_loss")
            scored.append(Candidate(
                factor=factor, learning_rate=cfg.learning_rate, head_learning_rate=cfg.head_learning_rate,
                rung=rung, steps=int(metrics["steps"]),
                val_loss=float(loss) if loss is not None and math.isfinite(loss) else math.inf,
                val_accuracy=validation_accuracy(metrics), seconds=time.perf_counter() - t0,
                flops=metrics.get("train_flops"),
            ))
            del candidate
        tried += scored
        scored.sort(key=_rank)
        alive = [c.factor for c in scored]
        if len(plan.sizes) > rung + 1:
            alive = alive[: plan.sizes[rung + 1]]
    best = min((c for c in tried if c.rung == len(plan.sizes) - 1), key=_rank)
    if not math.isfinite(best.val_loss):
        raise SalfError("every learning rate of the search diverged (non-finite validation loss)",
                        "lower --lr (the grid is 1/3x to 3x of it) or check the data")
    flops = [c.flops for c in tried]
    return LRSearchResult(
        factor=best.factor, learning_rate=best.learning_rate, head_learning_rate=best.head_learning_rate,
        run_steps=plan.run_steps, budget_steps=plan.budget_steps, steps=sum(c.steps for c in tried),
        eval_batches=spent_eval,
        seconds=time.perf_counter() - start, flops=sum(flops) if all(f is not None for f in flops) else None,
        val_size=len(val), candidates=tried,
    )


__all__ = ["LRSearchConfig", "LRSearchResult", "SearchPlan", "TunedModel", "plan_search", "search_learning_rate", "split_validation",
           "rung_sizes", "rung_steps", "run_steps"]
