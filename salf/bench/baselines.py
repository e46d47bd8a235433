"""The benchmark's baselines: other ways of deciding what to fine-tune, registered in ``BASELINES``.

A baseline gets a ``BaselineContext`` (the pretrained model, loaded on demand, and the training data)
and returns a ``BaselineChoice``: either a **boundary** k, whose quality is then the oracle run at k
(same recipe, seed and data, so no retraining), or a **training variant** that needs its own run
(LoRA, LISA).

- ``full``, ``freeze-first-half``, ``train-last-quarter``, ``train-last-2``, ``random``: the depth-only
  policies of ``salf.method.plan.POLICIES``, here.

The others live in modules of their own, each registered when the package ``salf.bench`` is imported:

- ``gradient-norm`` (AutoFreeze-style, one backward pass): ``salf.bench.baselines_gradient``;
- ``variability``, ``cosine-change``, ``cka-change`` (one forward pass, the pretrained representations):
  ``salf.bench.baselines_representation``;
- ``lora``, ``lisa`` (runs of their own): ``salf.bench.baselines_variants``;
- ``freeze-deep-half``, ``spectrum-25``, ``spectrum-50``, ``lora-plan``: the rules LLM tools use
  (``salf.bench.baselines_llm``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import TrainerCallback

from salf.data.tasks import TaskData
from salf.errors import SalfError
from salf.method.freeze import FreezeSpec
from salf.method.plan import POLICIES, PolicyContext
from salf.models.loading import LoadedModel
from salf.registry import Registry


@dataclass
class BaselineSettings:
    """Knobs of the baselines (part of a benchmark task, so changing them re-runs what they affect)."""

    gradnorm_batches: int = 4
    """Batches (of the task's batch size) in the gradient-norm baseline's one backward pass."""
    gradnorm_threshold: float = 0.1
    """Cumulative gradient-norm share, from the bottom block up, that the frozen prefix may hold."""
    variability_sample: int = 256
    """Data whose hidden states the variability and cosine-change baselines read (one knob for both: a new
    field would change every task's recipe fingerprint and so invalidate finished runs)."""
    variability_tol: float = 0.1
    """The variability ratio has stopped changing once it falls by at most this share of its range."""
    lisa_layers: int = 2
    """Blocks LISA trains at a time."""
    lisa_interval: int = 20
    """LISA draws new blocks every this many steps."""
    lora_rank: int = 8
    """Rank of the LoRA baseline's adapters."""
    lora_lr_factor: float = 10.0
    """LoRA's learning rate is this times the task's body learning rate (adapters start at zero and
    need a larger step; one recipe-wide factor, not tuned per task)."""

    def __post_init__(self) -> None:
        for name in ("gradnorm_batches", "variability_sample", "lisa_layers", "lisa_interval", "lora_rank"):
            if getattr(self, name) < 1:
                raise SalfError(f"baseline setting {name} must be at least 1, got {getattr(self, name)}")
        for name in ("gradnorm_threshold", "variability_tol"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SalfError(f"baseline setting {name} must be in [0, 1), got {getattr(self, name)}")
        if not self.lora_lr_factor > 0:
            raise SalfError(f"lora_lr_factor must be positive, got {self.lora_lr_factor}")


@dataclass
class BaselineContext:
    """What a baseline may look at: the pretrained model (on demand), the training data, the recipe."""

    load: Callable[[], LoadedModel]
    """Loads a fresh copy of the pretrained model (seeded, so its head is the oracle runs' head)."""
    data: TaskData
    """The tokenized training data."""
    num_layers: int
    """L, the number of blocks."""
    cost: np.ndarray
    """Predicted step cost of every boundary k = 0..L as a fraction of full fine-tuning."""
    seed: int
    batch_size: int
    learning_rate: float
    settings: BaselineSettings = field(default_factory=BaselineSettings)
    default_boundary: Callable[[], int | None] | None = None
    """The boundary of salf's default plan for this seed (None: not known here), for baselines built on it."""
    load_seconds: float = 0.0
    """Time spent loading models for this baseline (not part of its profiling time)."""

    def model(self) -> LoadedModel:
        started = time.perf_counter()
        loaded = self.load()
        self.load_seconds += time.perf_counter() - started
        return loaded


@dataclass
class TrainVariant:
    """A fine-tuning that is not an oracle boundary and so needs its own run."""

    spec: FreezeSpec
    """What is trainable at the start of training (the optimizer holds exactly these parameters)."""
    lora: bool = False
    """Train LoRA adapters on ``spec``'s blocks instead of their weights."""
    lora_rank: int = 8
    learning_rate: float | None = None
    """Body (or adapter) learning rate; None: the task's."""
    callbacks: Callable[[], Sequence[TrainerCallback]] = tuple
    """Makes the run's extra Trainer callbacks (a new set per run)."""
    describe: Callable[[Sequence[TrainerCallback]], dict[str, Any]] = lambda callbacks: {}
    """What to record about the run from its callbacks once it has finished."""


@dataclass
class BaselineChoice:
    """A baseline's answer: a boundary (reuses the oracle run) or a training variant (its own run)."""

    boundary: int | None = None
    variant: TrainVariant | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """What the baseline measured to decide (gradient norms, variability ratios, ...)."""

    def __post_init__(self) -> None:
        if (self.boundary is None) == (self.variant is None):
            raise ValueError("a baseline gives either a boundary or a training variant, not both or neither")


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: how it decides, and whether its answer is a run of its own."""

    decide: Callable[[BaselineContext], BaselineChoice]
    trains: bool = False
    """True when ``decide`` returns a training variant (its own run); False: a boundary."""

    @property
    def doc(self) -> str:
        return (self.decide.__doc__ or "").strip().splitlines()[0] if self.decide.__doc__ else ""


BASELINES: Registry[Baseline] = Registry("baseline")


def register(name: str, trains: bool = False) -> Callable[[Callable[[BaselineContext], BaselineChoice]], Any]:
    def add(decide: Callable[[BaselineContext], BaselineChoice]) -> Callable[[BaselineContext], BaselineChoice]:
        BASELINES.register(name)(Baseline(decide, trains))
        return decide

    return add


def _policy_baseline(name: str) -> Callable[[BaselineContext], BaselineChoice]:
    def choose(ctx: BaselineContext) -> BaselineChoice:
        benefit = np.linspace(1.0, 0.0, ctx.num_layers + 1)  # depth-only policies ignore the benefit
        k = POLICIES.get(name)(PolicyContext(benefit=benefit, cost=np.asarray(ctx.cost), seed=ctx.seed), None)
        return BaselineChoice(boundary=int(k))

    choose.__doc__ = POLICIES.get(name).__doc__
    return choose


for _name in ("full", "freeze-first-half", "train-last-quarter", "train-last-2", "random"):
    register(_name)(_policy_baseline(_name))
