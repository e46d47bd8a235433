"""Scoring a plan against the oracle sweep: the cost-quality Pareto frontier, regret, trade-off regret
at the ``TRADEOFF_LAMBDAS`` and the share of the best quality kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def stats(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean, std (n-1) and count of the finite values (None where there is none)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(v)}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def pareto_frontier(costs: Sequence[float], qualities: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points on the cost-quality frontier, cheapest first.

    A point is on it when no other point is at most as costly and at least as good with one of the two
    strictly; of several identical points the first is kept. Non-finite points are ignored.
    """
    sign = 1.0 if higher_is_better else -1.0
    points = [(float(c), sign * float(q), i) for i, (c, q) in enumerate(zip(costs, qualities))
              if c is not None and q is not None and math.isfinite(c) and math.isfinite(q)]
    points.sort(key=lambda p: (p[0], -p[1], p[2]))
    best, frontier = -math.inf, []
    for _, q, i in points:
        if q > best:
            frontier.append(i)
            best = q
    return frontier


def regret(plan_cost: float, plan_quality: float, oracle_costs: Sequence[float], oracle_qualities: Sequence[float],
           higher_is_better: bool = True, rtol: float = 1e-9) -> float | None:
    """Quality of the best oracle boundary costing no more than the plan, minus the plan's quality,
    signed so that positive is worse (for a loss: the plan's loss minus the best oracle loss).

    None when every oracle boundary costs more than the plan (nothing to compare with).
    """
    if plan_cost is None or plan_quality is None:
        return None
    affordable = [float(q) for c, q in zip(oracle_costs, oracle_qualities)
                  if c is not None and q is not None and math.isfinite(q) and c <= plan_cost * (1 + rtol)]
    if not affordable:
        return None
    return max(affordable) - plan_quality if higher_is_better else plan_quality - min(affordable)


TRADEOFF_LAMBDAS = (2.0, 10.0)
"""The lambdas of the trade-off regret (``tradeoff_regret``): points of quality that the whole of full
fine-tuning's FLOPs is worth. lambda = 2: one point of accuracy is worth 50% of full fine-tuning's FLOPs;
lambda = 10: 10%. ``regret`` never charges a cheap plan for the quality it gives up (the head-only boundary
has regret 0 whatever its accuracy: nothing is cheaper); these do."""


def regret_key(lam: float) -> str:
    """Field name of the trade-off regret at ``lam`` ('regret_2', 'regret_10')."""
    return f"regret_{lam:g}"


REGRET_KEYS = tuple(regret_key(lam) for lam in TRADEOFF_LAMBDAS)


def quality_points(value: float | None, higher_is_better: bool) -> float | None:
    """A quality in points, higher better: 100 x an accuracy or exact match, -100 x a loss (for 'lm' tasks,
    whose only quality is the eval loss), so that a point means the same in every regret."""
    if value is None or not math.isfinite(float(value)):
        return None
    return 100.0 * float(value) if higher_is_better else -100.0 * float(value)


def tradeoff_regret(plan_cost: float | None, plan_points: float | None, oracle_costs: Sequence[float | None],
                    oracle_points: Sequence[float | None], lam: float) -> float | None:
    """max over oracle boundaries k of [q(k) - lam c(k)], minus [q(plan) - lam c(plan)].

    q in points (``quality_points``), c the measured FLOPs as a fraction of full fine-tuning's (same seed).
    Every boundary competes, not only the cheaper ones: 0 for the boundary with the best trade-off,
    positive for any other, negative only for an own run (LoRA, per-datum) that beats every boundary.
    None when the plan, or every boundary, lacks a cost or a quality.
    """
    if plan_cost is None or plan_points is None:
        return None
    utilities = [q - lam * c for c, q in zip(oracle_costs, oracle_points)
                 if c is not None and q is not None and math.isfinite(c) and math.isfinite(q)]
    if not utilities:
        return None
    return max(utilities) - (plan_points - lam * plan_cost)


def share_kept(plan_quality: float | None, oracle_qualities: Sequence[float | None]) -> float | None:
    """The plan's quality over the best oracle boundary's (higher-is-better metrics; None without a positive best)."""
    best = max((float(q) for q in oracle_qualities if q is not None and math.isfinite(q)), default=None)
    return plan_quality / best if plan_quality is not None and best else None


def tradeoff_fields(metrics: dict[str, Any], oracle_runs: dict[int, dict], q_name: str,
                    q_high: bool) -> dict[str, float | None]:
    """Share kept and the trade-off regret at every lambda of one run, against the oracle runs of its seed."""
    full = oracle_runs.get(0, {}).get("train_flops")
    runs = list(oracle_runs.values())
    costs = [ratio(m.get("train_flops"), full) for m in runs]
    points = [quality_points(m.get(q_name), q_high) for m in runs]
    cost, own = ratio(metrics.get("train_flops"), full), quality_points(metrics.get(q_name), q_high)
    return {"share_kept": share_kept(metrics.get(q_name), [m.get(q_name) for m in runs]) if q_high else None,
            **{regret_key(lam): tradeoff_regret(cost, own, costs, points, lam) for lam in TRADEOFF_LAMBDAS}}


__all__ = ["ratio", "stats", "REGRET_KEYS", "TRADEOFF_LAMBDAS", "pareto_frontier", "quality_points", "regret", "regret_key", "share_kept", "tradeoff_fields", "tradeoff_regret"]
