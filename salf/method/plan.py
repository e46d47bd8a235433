"""The cost-benefit balance: pick the boundary, and the plan file that records why.

Boundary k (0-based) is the first trainable block: embeddings and blocks 0..k-1 are frozen,
blocks k..L-1 are trained, k = 0 is full fine-tuning, k = L trains only the head (and final norm).

benefit[k] = sum(gains[k:]) / sum(gains)   (share of the estimated deviation reduction trained)
cost[k]    = step FLOPs of boundary k / step FLOPs of full fine-tuning

Policies (registered in ``POLICIES``) map these curves to a boundary. A policy is written
``name`` or ``name=value`` (``budget=0.5``, ``coverage=0.9``). Baselines that only need the depth
(full, freeze-first-half, train-last-quarter, random) live in the same registry so the benchmark
treats them alike.
"""

from __future__ import annotations

import datetime as _dt
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from salf import __version__
from salf.errors import SalfError
from salf.fileio import fingerprint, write_json
from salf.method.freeze import FreezeSpec
from salf.registry import Registry

PLAN_FORMAT = 1


@dataclass(frozen=True)
class PolicyContext:
    """What a policy sees: the two curves over k = 0..L and a seed for random baselines."""

    benefit: np.ndarray
    cost: np.ndarray
    seed: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.benefit) - 1


class Policy(Protocol):
    def __call__(self, ctx: PolicyContext, value: float | None) -> int: ...


POLICIES: Registry[Policy] = Registry("policy")


def _fraction(name: str, value: float | None) -> float:
    if value is None:
        raise SalfError(f"policy {name!r} needs a value", f"write it as {name}=0.5 (a number in (0, 1])")
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise SalfError(f"{name}={value} is outside (0, 1]", f"give {name} as a fraction of full fine-tuning, e.g. {name}=0.5")
    return value


def _scale(name: str, value: float) -> float:
    if not (0.0 < value <= 10.0) or math.isnan(value):
        raise SalfError(f"{name}={value} is outside (0, 10]",
                        f"give {name} as a multiple of its default target, e.g. {name}=0.75 (cheaper) or {name}=1.5")
    return value


def _no_value(name: str, value: float | None) -> None:
    if value is not None:
        raise SalfError(f"policy {name!r} takes no value (got {value})", f"write it as plain {name!r}")


@POLICIES.register("knee")
def knee(ctx: PolicyContext, value: float | None) -> int:
    """Largest net benefit: benefit minus the cost share of the tunable range.

    On the (cost, benefit) curve this is the point farthest above the straight line from
    "train nothing" to "train everything": past it, each extra layer costs more than it buys.
    Ties go to the deeper (more beneficial) boundary, so a flat trace means full fine-tuning.
    """
    _no_value("knee", value)
    span = ctx.cost[0] - ctx.cost[-1]
    scaled = (ctx.cost - ctx.cost[-1]) / span if span > 0 else np.zeros_like(ctx.cost)
    net = ctx.benefit - scaled
    return int(np.flatnonzero(net >= net.max() - 1e-9)[0])


@POLICIES.register("budget")
def budget(ctx: PolicyContext, value: float | None) -> int:
    """Most benefit at cost[k] <= value; among equal benefit, the one that trains the most (spends the budget).

    An estimated gain of zero is not evidence that a block is useless: headroom-style estimators give many
    blocks exactly zero, and the cheapest tie is then the head-only floor, which on a real task here
    (MiniLM, Debian description -> section) lost 11 points of accuracy (3 seeds) against the next boundary up.
    The user granted the budget, so the tie goes to the most trainable boundary inside it.
    """
    c = _fraction("budget", value)
    affordable = np.flatnonzero(ctx.cost <= c + 1e-12)
    if affordable.size == 0:
        raise SalfError(
            f"budget={c} is below the cheapest plan ({ctx.cost.min():.3f} of full fine-tuning: the forward pass alone)",
            f"raise the budget to at least {math.ceil(ctx.cost.min() * 100) / 100:.2f}",
        )
    best = ctx.benefit[affordable].max()
    return int(min(k for k in affordable if ctx.benefit[k] >= best - 1e-12))


@POLICIES.register("coverage")
def coverage(ctx: PolicyContext, value: float | None) -> int:
    """Cheapest boundary whose trained layers hold at least ``value`` of the total gain."""
    tau = _fraction("coverage", value)
    return int(np.flatnonzero(ctx.benefit >= tau - 1e-12).max())


@POLICIES.register("unsolved")
def unsolved(ctx: PolicyContext, value: float | None) -> int:
    """Train the blocks that hold the share of the gain the frozen model leaves unsolved.

    The frozen share is ``benefit[L]`` (what the head-only plan already has; 0 unless the estimator counts
    it, see ``salf.method.gain.sufficiency_gains``). The boundary is the one whose trained blocks hold the share of
    the gains closest to 1 - frozen share: with equal gains per block it trains round(L x (1 - frozen share))
    blocks, all of them when nothing is solved, none when all is. Of two equally close boundaries the one
    holding more than the target wins (a half-way share trains the extra block); of boundaries holding the
    same share (blocks without gain between them), the cheapest.

    ``unsolved=S`` scales the target to S x (1 - frozen share) (at most all of the gain): S < 1 saves more
    compute, S > 1 buys quality. ``salf.config.plan.DEFAULT_CELLS`` gives classifiers S = 0.75 (BENCHMARKS.md,
    "the unsolved scale").
    """
    scale = 1.0 if value is None else _scale("unsolved", value)
    frozen = float(ctx.benefit[-1])
    if frozen >= 1.0 - 1e-12:
        return len(ctx.benefit) - 1
    blocks_share = (ctx.benefit - frozen) / (1.0 - frozen)
    target = min(1.0, scale * (1.0 - frozen))
    gap = np.abs(blocks_share - target)
    ties = np.flatnonzero(gap <= gap.min() + 1e-9)
    covering = [k for k in ties if blocks_share[k] >= target - 1e-9]
    return int(max(covering) if covering else max(ties))


@POLICIES.register("full")
def full(ctx: PolicyContext, value: float | None) -> int:
    """Baseline: full fine-tuning."""
    _no_value("full", value)
    return 0


@POLICIES.register("freeze-first-half")
def freeze_first_half(ctx: PolicyContext, value: float | None) -> int:
    """Baseline: freeze the lower half of the blocks."""
    _no_value("freeze-first-half", value)
    return ctx.num_layers // 2


@POLICIES.register("train-last-quarter")
def train_last_quarter(ctx: PolicyContext, value: float | None) -> int:
    """Baseline: train only the top quarter of the blocks (at least one)."""
    _no_value("train-last-quarter", value)
    return ctx.num_layers - max(1, math.ceil(ctx.num_layers / 4))


@POLICIES.register("train-last-2")
def train_last_2(ctx: PolicyContext, value: float | None) -> int:
    """Baseline: train only the top 2 blocks (LLaMA-Factory's ``finetuning_type: freeze`` default,
    ``freeze_trainable_layers: 2``), or every block of a shallower model."""
    _no_value("train-last-2", value)
    return max(0, ctx.num_layers - 2)


@POLICIES.register("random")
def random_boundary(ctx: PolicyContext, value: float | None) -> int:
    """Baseline: a seeded random boundary in 1..L-1."""
    _no_value("random", value)
    return int(np.random.default_rng(ctx.seed).integers(1, max(2, ctx.num_layers)))


def parse_policy(text: str) -> tuple[str, float | None]:
    name, _, raw = text.partition("=")
    name = name.strip()
    POLICIES.get(name)  # unknown name -> SalfError listing the known ones
    if not raw:
        return name, None
    try:
        return name, float(raw)
    except ValueError:
        raise SalfError(f"policy value {raw!r} is not a number", f"write e.g. {name}=0.5") from None


def check_policy(text: str) -> None:
    """Reject a bad policy before any expensive work: run it on a trivial one-block curve."""
    name, value = parse_policy(text)
    POLICIES.get(name)(PolicyContext(benefit=np.array([1.0, 0.0]), cost=np.array([1.0, 0.0])), value)


def benefit_curve(gains: np.ndarray, frozen_share: float = 0.0) -> np.ndarray:
    """benefit[k] for k = 0..L: frozen_share + (1 - frozen_share) x share of the total gain held by blocks k..L-1.

    ``frozen_share`` (``salf.method.gain.Gains.frozen_share``) is what the frozen model delivers with only its head
    trained; 0 gives the paper's relative benefit (benefit[L] = 0, benefit[0] = 1).
    """
    gains = np.clip(np.asarray(gains, dtype=float), 0.0, None)
    total = gains.sum()
    if total <= 0:
        gains, total = np.ones_like(gains), float(len(gains))
    tail = np.concatenate([np.cumsum(gains[::-1])[::-1], [0.0]])
    share = float(np.clip(frozen_share, 0.0, 1.0))
    return share + (1.0 - share) * tail / total


def choose_boundary(gains: np.ndarray, cost: np.ndarray, policy: str, seed: int = 0, frozen_share: float = 0.0) -> int:
    name, value = parse_policy(policy)
    ctx = PolicyContext(benefit=benefit_curve(gains, frozen_share), cost=np.asarray(cost, dtype=float), seed=seed)
    if len(ctx.cost) != len(ctx.benefit):
        raise ValueError(f"cost has {len(ctx.cost)} entries, expected {len(ctx.benefit)} (k = 0..L)")
    return POLICIES.get(name)(ctx, value)


def warn_unknown_keys(where: str, unknown: set[str]) -> None:
    """Say which keys of a stored object this version ignores (peft's rule: never drop them silently)."""
    if unknown:
        warnings.warn(f"{where} has keys this salf does not know, ignored: {', '.join(sorted(unknown))} "
                      "(written by a newer salf? upgrade to use them)", stacklevel=3)


@dataclass(frozen=True)
class Prediction:
    """The predicted cost of one training step at the plan's boundary (``Plan.predicted``), from the cost
    model (``salf.method.cost.StepCost`` of the chosen boundary against that of boundary 0). Every ratio is
    relative to full fine-tuning of the same model on the same batch shape (1.0 = as dear as full)."""

    step_flops_ratio: float
    """Step FLOPs (forward + backward) of the plan / those of full fine-tuning: ``Plan.cost[boundary]``."""
    step_flops_saving: float
    """1 - ``step_flops_ratio``: the share of full fine-tuning's step FLOPs the plan saves."""
    backward_flops_ratio: float
    """Backward FLOPs of the plan / those of full fine-tuning (0.0 where full fine-tuning has none)."""
    activation_memory_ratio: float
    """Bytes of activations saved for backward / those of full fine-tuning."""
    training_memory_ratio: float
    """Parameters + gradients + optimizer state + saved activations, in bytes / those of full fine-tuning."""
    trainable_params_ratio: float
    """Parameters that get gradients and optimizer updates / those of full fine-tuning (all of them)."""
    step_flops: float
    """Step FLOPs of the plan, absolute (one optimizer step on the profiled batch shape)."""
    full_step_flops: float
    """Step FLOPs of full fine-tuning, absolute (same batch shape): ``step_flops / step_flops_ratio``."""

    @classmethod
    def of(cls, chosen, full) -> Prediction:
        """The prediction for the boundary costing ``chosen`` against full fine-tuning's ``full``
        (both ``salf.method.cost.StepCost``)."""
        ratio = float(chosen.total / full.total)
        return cls(
            step_flops_ratio=ratio,
            step_flops_saving=float(1.0 - ratio),
            backward_flops_ratio=float(chosen.backward / full.backward) if full.backward else 0.0,
            activation_memory_ratio=float(chosen.activation_bytes / max(full.activation_bytes, 1)),
            training_memory_ratio=float(chosen.memory_bytes / full.memory_bytes),
            trainable_params_ratio=float(chosen.trainable_params / full.trainable_params),
            step_flops=float(chosen.total),
            full_step_flops=float(full.total),
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Prediction:
        """The prediction a plan file stores under ``predicted``. Every plan ``make_plan`` wrote, since plans
        first carried one, has all eight keys, so all are required. Keys this version does not know (from a
        newer salf) are ignored with a warning: absent from the plan if this version saves it again."""
        if not isinstance(d, dict):
            raise SalfError("the plan file's 'predicted' is not a JSON object", "regenerate it with `salf plan`")
        names = [f.name for f in fields(cls)]
        warn_unknown_keys("the plan file's 'predicted'", set(d) - set(names))
        missing = [n for n in names if n not in d]
        if missing:
            raise SalfError(f"the plan file's 'predicted' lacks {', '.join(missing)}", "regenerate it with `salf plan`")
        try:
            return cls(**{n: float(d[n]) for n in names})
        except (TypeError, ValueError) as e:
            raise SalfError(f"the plan file's 'predicted' holds a value that is not a number ({e})",
                            "regenerate it with `salf plan`") from None


@dataclass
class Plan:
    """Everything needed to apply, audit and reproduce a freezing decision."""

    boundary: int
    num_layers: int
    trainable: dict[str, Any]
    trace: list[float]
    trace_std: list[float]
    gains: list[float]
    fit: dict[str, Any]
    lens: str
    estimator: str
    policy: str
    benefit: list[float]
    cost: list[float]
    predicted: Prediction
    """The predicted cost of a training step at ``boundary``, relative to full fine-tuning."""
    model: dict[str, Any]
    data: dict[str, Any]
    per_datum_boundaries: list[int] | None = None
    """Per-datum policy: one boundary per traced datum (from its own deviation trace)."""
    per_datum_indices: list[int] | None = None
    """Positions, in the planned data file, of the data ``per_datum_boundaries`` belong to."""
    head: str | None = None
    """For a model whose output head is tied to its input embeddings: 'tied' (the head stays tied, so it
    is frozen with the embeddings when k > 0) or 'untie' (it gets its own trainable copy; see
    ``salf.models.heads``). None for a model without a tied head."""
    format: int = PLAN_FORMAT
    salf_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if not isinstance(self.predicted, Prediction):
            raise TypeError(f"Plan.predicted must be a Prediction, not {type(self.predicted).__name__} "
                            "(Plan.from_dict reads the dict a plan file stores)")
        if not 0 <= self.boundary <= self.num_layers:
            raise SalfError(f"plan boundary {self.boundary} is outside 0..{self.num_layers}", "regenerate the plan with `salf plan`")
        if len(self.trace) != self.num_layers + 1 or len(self.gains) != self.num_layers:
            raise SalfError(
                f"plan has {len(self.trace)} trace values and {len(self.gains)} gains for {self.num_layers} layers",
                "the plan file is damaged; regenerate it with `salf plan`",
            )

    def freeze_spec(self) -> FreezeSpec:
        t = self.trainable
        return FreezeSpec(
            trainable_blocks=tuple(t["blocks"]), embeddings=bool(t["embeddings"]),
            norm=bool(t.get("norm", True)), head=bool(t.get("head", True)),
            untie_head=bool(t.get("untie_head", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict):
            raise SalfError("the plan file does not hold a JSON object", "regenerate it with `salf plan`")
        missing = [f for f in ("boundary", "num_layers", "trainable", "trace", "gains") if f not in d]
        if missing:
            raise SalfError(f"the plan file lacks {', '.join(missing)}", "regenerate it with `salf plan`")
        if d.get("format", PLAN_FORMAT) > PLAN_FORMAT:
            raise SalfError(f"plan format {d['format']} is newer than this salf understands", "upgrade salf")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in d.items() if k in known}
        warn_unknown_keys("the plan file", set(d) - known)
        if "predicted" in values:
            values["predicted"] = Prediction.from_dict(values["predicted"])
        try:
            return cls(**values)
        except TypeError as e:
            raise SalfError(f"the plan file is incomplete ({e})", "regenerate it with `salf plan`") from None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        import json

        path = Path(path)
        if not path.is_file():
            raise SalfError(f"plan file {path} not found", "create one with `salf plan --model M --data D --out plan.json`")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SalfError(f"plan file {path} is not valid JSON (line {e.lineno}: {e.msg})", "regenerate it with `salf plan`") from None
        return cls.from_dict(d)

    def check_model(self, model_info: dict[str, Any]) -> None:
        """Refuse to apply a plan made for another model (layer count, type, weights or head pooling)."""
        want, got = self.model.get("head_pooling"), model_info.get("head_pooling")
        if want is not None and got is not None and want != got:
            raise SalfError(
                f"this plan was made for a head that reads {want!r} (head pooling), but this model's head reads {got!r}",
                f"train the model the plan was made for with --classifier-pooling {want}, or make a new plan with `salf plan`",
            )
        for key in ("model_type", "num_layers", "fingerprint"):
            want, got = self.model.get(key), model_info.get(key)
            if want is not None and got is not None and want != got:
                raise SalfError(
                    f"this plan was made for another model: {key} is {want!r} in the plan but {got!r} here",
                    "make a new plan for this model with `salf plan`, or pass the model the plan was made for",
                )


def model_fingerprint(model) -> dict[str, Any]:
    """Identity of a model for plans: type, depth and a hash of its config and parameter shapes."""
    from salf.models.arch import find_parts

    parts = find_parts(model)
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "id2label", "label2id"):
        config.pop(volatile, None)
    shapes = [[n, list(p.shape)] for n, p in model.named_parameters()]
    return {
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
        "model_type": parts.model_type,
        "num_layers": parts.num_layers,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "fingerprint": fingerprint(config, shapes),
    }


@dataclass(frozen=True)
class PolicyChoice:
    """How ``make_plan`` chooses the boundary: the policy, the seed of random baselines, and whether to
    also choose one boundary per datum."""

    policy: str
    """A policy as ``name`` or ``name=value`` (a name in ``POLICIES``; e.g. 'unsolved=0.75')."""
    seed: int = 0
    """Seed of the random baselines (``random``)."""
    per_datum: bool = False
    """Also choose each traced datum's boundary from its own deviation trace (``per_datum_boundaries``)."""

    def __post_init__(self) -> None:
        parse_policy(self.policy)  # unknown name or non-numeric value -> SalfError


def make_plan(trace, gains, costs: list, choice: PolicyChoice, model_info: dict[str, Any], data_info: dict[str, Any],
              head: str | None = None) -> Plan:
    """Choose the boundary and record the evidence.

    ``trace`` is a ``salf.method.trace.Trace``, ``gains`` a ``salf.method.gain.Gains``, ``costs`` the
    ``salf.method.cost.StepCost`` of every boundary k = 0..L (``salf.method.cost.boundary_costs``, made
    with the same head choice). ``head``: 'tied' or 'untie' for a model with a tied head, else None.
    """
    policy, seed, per_datum = choice.policy, choice.seed, choice.per_datum
    full_cost = costs[0]
    cost = np.array([c.total / full_cost.total for c in costs])
    k = choose_boundary(gains.values, cost, policy, seed=seed, frozen_share=gains.frozen_share)
    num_layers = len(gains.values)
    trainable = {"blocks": list(range(k, num_layers)), "embeddings": k == 0, "norm": True, "head": True}
    if head == "untie" and k > 0:  # at k = 0 the tied head trains with the embeddings anyway
        trainable["untie_head"] = True
    return Plan(
        boundary=k,
        num_layers=num_layers,
        trainable=trainable,
        trace=[float(v) for v in trace.mean],
        trace_std=[float(v) for v in trace.std],
        gains=[float(v) for v in gains.values],
        fit=gains.fit.to_dict(),
        lens=trace.lens,
        estimator=gains.estimator,
        policy=policy,
        benefit=[float(v) for v in benefit_curve(gains.values, gains.frozen_share)],
        cost=[float(v) for v in cost],
        predicted=Prediction.of(costs[k], full_cost),
        model=model_info,
        data=data_info,
        per_datum_boundaries=per_datum_boundaries(trace, cost, policy, seed) if per_datum else None,
        per_datum_indices=[int(i) for i in trace.indices] if per_datum else None,
        head=head,
    )


def per_datum_boundaries(trace, cost: np.ndarray, policy: str, seed: int = 0) -> list[int]:
    """METHOD §4 per-datum: each datum's boundary from its own deviation trace (observed drops)."""
    drops = np.clip(-np.diff(np.asarray(trace.per_datum, dtype=float), axis=1), 0.0, None)
    return [choose_boundary(row, cost, policy, seed=seed) for row in drops]
