"""From a transition trace to the gain of each layer (METHOD.md section 2).

A depth scaling law D(l) = E_inf + A * (l + 1)^(-alpha) is fitted to the trace D_0..D_L. Estimators
in ``ESTIMATORS`` turn the trace and its fit into L non-negative gains, one per block:
``gains[j]`` belongs to block j, the change from trace[j] (its input) to trace[j+1] (its output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from salf.errors import SalfError
from salf.registry import Registry

Estimator = Callable[[np.ndarray, "DepthFit", "float | None"], "np.ndarray | Estimate"]
"""(trace D_0..D_L, its depth fit, the trace's chance level or None) -> L gains, or an ``Estimate``."""
ESTIMATORS: Registry[Estimator] = Registry("estimator")
# Chosen by the benchmark's regret table (BENCHMARKS.md, "Choosing the defaults"). 'transition' planned full
# fine-tuning on every real task; 'headroom' (the default until 12-block e5-small) planned 7 of 12 on the
# word-order task, where freezing past block 3 cost 1-20 points; 'sufficiency-uniform' with the 'unsolved'
# policy trains as much of the depth as the frozen top layer leaves unsolved, and had the lowest trade-off
# regret of every plan and fixed rule over both real models.
# (The default estimator per task is in salf.config.plan.DEFAULT_CELLS, with the other plan options.)

# Starting exponents for the fit: the cost surface has several basins on short or noisy traces
# (a sharp early drop wants a large alpha, a slow decline a small one), so a few starts are tried.
_ALPHA_STARTS = (0.25, 1.0, 4.0)
_ALPHA_BOUNDS = (1e-3, 50.0)
# Differences this small relative to the trace's magnitude are rounding, not signal.
_RELATIVE_ZERO = 1e-9


@dataclass
class DepthFit:
    """The fitted depth law D(l) = e_inf + a * (l + 1)^(-alpha), l = 0..L."""

    e_inf: float
    """Deviation an infinitely deep model would reach (>= 0)."""
    a: float
    """Deviation removed by depth: D(0) - e_inf when alpha is large (>= 0)."""
    alpha: float
    """How fast depth removes deviation (> 0)."""
    r2: float
    """Coefficient of determination of the fit on the trace (1 is perfect; <= 0 is no better than the mean)."""

    def predict(self, layer: np.ndarray | float) -> np.ndarray:
        """D(l) for latent space index l (scalar or array)."""
        return self.e_inf + self.a * (np.asarray(layer, dtype=np.float64) + 1.0) ** (-self.alpha)

    def to_dict(self) -> dict[str, float]:
        return {"e_inf": self.e_inf, "a": self.a, "alpha": self.alpha, "r2": self.r2}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DepthFit:
        return cls(e_inf=float(d["e_inf"]), a=float(d["a"]), alpha=float(d["alpha"]), r2=float(d["r2"]))


@dataclass
class Estimate:
    """What an estimator returns when it knows more than the shape of the gains."""

    values: np.ndarray
    """[L] non-negative gains."""
    frozen_share: float = 0.0
    """Share of the task the frozen model already solves without training any block (see ``Gains``)."""


@dataclass
class Gains:
    """Gain of each block in reducing the deviation, from one estimator."""

    estimator: str
    """Name of the estimator in ``ESTIMATORS``."""
    values: np.ndarray
    """[L] non-negative gains; values[j] belongs to block j."""
    fit: DepthFit
    """The depth law fitted to the trace."""
    note: str = ""
    """Anything the reader should know about these gains (e.g. a uniform fallback); '' when nothing."""
    frozen_share: float = 0.0
    """Share (0..1) of the benefit a plan can have that the frozen model already delivers with only its head
    trained: the benefit of boundary k is frozen_share + (1 - frozen_share) x (share of the gains in blocks
    >= k) (``salf.method.plan.benefit_curve``). 0 (every estimator but ``sufficiency``): all benefit comes from
    trained blocks, as in the paper."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator,
            "values": np.asarray(self.values).tolist(),
            "fit": self.fit.to_dict(),
            "note": self.note,
            "frozen_share": self.frozen_share,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gains:
        return cls(
            estimator=d["estimator"],
            values=np.asarray(d["values"], dtype=np.float64),
            fit=DepthFit.from_dict(d["fit"]),
            note=d.get("note", ""),
            frozen_share=float(d.get("frozen_share", 0.0)),
        )


def _as_trace(trace_mean: np.ndarray) -> np.ndarray:
    trace = np.asarray(trace_mean, dtype=np.float64).ravel()
    if trace.size < 2:
        raise SalfError(
            f"a trace needs at least 2 latent spaces (a model with >= 1 block), got {trace.size}",
            "trace a model with at least one transformer block",
        )
    if not np.all(np.isfinite(trace)):
        raise SalfError(
            "the trace contains NaN or infinite deviations", "re-run the trace; check the data's labels"
        )
    return trace


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    ss_res = float(np.sum((observed - predicted) ** 2))
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    if ss_tot <= _RELATIVE_ZERO * float(np.sum(observed**2)):
        # A flat trace is fitted exactly by a flat law (A = 0); anything else explains nothing.
        return 1.0 if ss_res <= _RELATIVE_ZERO * float(np.sum(observed**2)) else 0.0
    return 1.0 - ss_res / ss_tot


def fit_depth_law(trace_mean: np.ndarray) -> DepthFit:
    """Least-squares fit of D(l) = E_inf + A (l+1)^(-alpha) with E_inf >= 0, A >= 0, alpha > 0."""
    trace = _as_trace(trace_mean)
    x = np.arange(trace.size, dtype=np.float64) + 1.0
    # Fit in units of the trace's magnitude so tolerances mean the same for CE ~ 10 and cosine ~ 0.1.
    scale = float(np.max(np.abs(trace))) or 1.0
    y = trace / scale

    def residual(p: np.ndarray) -> np.ndarray:
        return p[0] + p[1] * x ** (-p[2]) - y

    floor = max(0.0, float(y.min()))
    lower, upper = [0.0, 0.0, _ALPHA_BOUNDS[0]], [np.inf, np.inf, _ALPHA_BOUNDS[1]]
    best = None
    for e0 in (0.9 * floor, 0.0):
        for alpha0 in _ALPHA_STARTS:
            a0 = max(float(y[0]) - e0, 1e-3)
            result = least_squares(residual, [e0, a0, alpha0], bounds=(lower, upper), method="trf")
            if best is None or result.cost < best.cost:
                best = result
    e_inf, a, alpha = (float(v) for v in best.x)
    fit = DepthFit(e_inf=e_inf * scale, a=a * scale, alpha=alpha, r2=0.0)
    fit.r2 = _r2(trace, fit.predict(np.arange(trace.size)))
    return fit


def _observed_drop(trace: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, trace[:-1] - trace[1:])


def _law_drop(trace: np.ndarray, fit: DepthFit) -> np.ndarray:
    law = fit.predict(np.arange(trace.size))
    return np.maximum(0.0, law[:-1] - law[1:])


@ESTIMATORS.register("transition")
def transition_gains(trace: np.ndarray, fit: DepthFit, chance: float | None = None) -> np.ndarray:
    """The law's drop D(l-1) - D(l), blended with the observed drop; the weight on the law is R²."""
    weight = float(np.clip(fit.r2, 0.0, 1.0))
    return weight * _law_drop(trace, fit) + (1.0 - weight) * _observed_drop(trace)


@ESTIMATORS.register("headroom")
def headroom_gains(trace: np.ndarray, fit: DepthFit, chance: float | None = None) -> np.ndarray:
    """How much further each block falls short of the law than its input did."""
    shortfall = trace - fit.predict(np.arange(trace.size))
    return np.maximum(0.0, shortfall[1:] - shortfall[:-1])


@ESTIMATORS.register("observed")
def observed_gains(trace: np.ndarray, fit: DepthFit, chance: float | None = None) -> np.ndarray:
    """The observed drop max(0, D_{l-1} - D_l), ignoring the law."""
    return _observed_drop(trace)


@ESTIMATORS.register("best-layer")
def best_layer_gains(trace: np.ndarray, fit: DepthFit, chance: float | None = None) -> np.ndarray:
    """All gain in the blocks that lead to the best latent space (argmin of the trace), plus one more.

    Blocks before the best latent space share the gain by their observed drop; blocks after it get
    none, except the first of them: a capacity margin, given the mean gain of the blocks before it.
    When the embeddings are the best latent space no block gains anything.
    """
    num_blocks = trace.size - 1
    best = int(np.argmin(trace))
    gains = np.zeros(num_blocks)
    gains[:best] = _observed_drop(trace)[:best]
    if 0 < best < num_blocks:
        gains[best] = gains[:best].mean()
    return gains


def frozen_share(trace: np.ndarray, chance: float | None) -> float:
    """Share of the task that the frozen model's top latent space already solves: 1 - D_L / chance, in [0, 1].

    ``chance`` is the trace's deviation of knowing nothing (``salf.method.trace.Trace.chance``; for the probe, the
    entropy of the class frequencies). Without one, D_0 stands in: exact for a first-token probe, whose
    latent 0 is one constant vector, and an underestimate otherwise (so the share errs low: more training).
    """
    reference = chance if chance is not None and chance > 0 else float(trace[0])
    if not reference > 0:
        return 0.0
    return float(np.clip(1.0 - float(trace[-1]) / reference, 0.0, 1.0))


@ESTIMATORS.register("sufficiency")
def sufficiency_gains(trace: np.ndarray, fit: DepthFit, chance: float | None = None) -> Estimate:
    """``headroom``'s gains, with the benefit the frozen features already deliver counted in.

    The paper's benefit is relative: the blocks share 100% of it whatever the task, so a task the frozen
    top layer already solves (a linear probe there is nearly right) plans as deep as one it does not
    solve at all. Here the head-only plan starts with the share of the task its frozen input solves
    (``frozen_share``), and the blocks share the rest: training pays only for what the frozen model leaves
    unsolved. On MiniLM this separated the docstring task (the frozen top layer solves half of it; the
    head-only boundary kept 96% of full fine-tuning's accuracy) from the Debian-section task (a third;
    head-only kept 84%), which the relative gains planned alike.
    """
    return Estimate(headroom_gains(trace, fit), frozen_share(trace, chance))


@ESTIMATORS.register("sufficiency-uniform")
def sufficiency_uniform_gains(trace: np.ndarray, fit: DepthFit, chance: float | None = None) -> Estimate:
    """Every block an equal share of the gain, plus the frozen share: the trace speaks only through how much
    of the task its top latent space already solves. With the ``unsolved`` policy this trains the top
    (1 - frozen share) of the blocks."""
    num_blocks = trace.size - 1
    return Estimate(np.full(num_blocks, 1.0 / num_blocks), frozen_share(trace, chance))


def estimate_gains(trace_mean: np.ndarray, estimator: str, fit: DepthFit | None = None,
                   chance: float | None = None) -> Gains:
    """Fit the depth law to the trace and turn it into per-block gains with the named estimator.

    ``fit``: the law already fitted to this trace (sweeping estimators over one trace fits it once).
    ``chance``: the trace's chance level (``salf.method.trace.Trace.chance``), for estimators that use it.
    A trace with no gain anywhere (flat, or rising everywhere) gets uniform gains, with a note.
    """
    compute = ESTIMATORS.get(estimator)
    trace = _as_trace(trace_mean)
    fit = fit if fit is not None else fit_depth_law(trace)
    estimate = compute(trace, fit, chance)
    if not isinstance(estimate, Estimate):
        estimate = Estimate(np.asarray(estimate))
    values = np.asarray(estimate.values, dtype=np.float64)
    num_blocks = trace.size - 1
    if values.shape != (num_blocks,) or not np.all(np.isfinite(values)):
        raise ValueError(f"estimator {estimator!r} returned {values!r}; expected {num_blocks} finite gains")
    # Rounding can leave -1e-17 where a gain is zero; gains are non-negative by contract.
    values = np.maximum(values, 0.0)
    note = ""
    # Gains below rounding noise of the trace (a flat law still drops by ~1e-13) count as none.
    if not values.sum() > _RELATIVE_ZERO * float(np.max(np.abs(trace))):
        values = np.full(num_blocks, 1.0 / num_blocks)
        note = f"estimator {estimator!r} found no gain in any block (flat or rising trace); gains set uniform"
    return Gains(estimator=estimator, values=values, fit=fit, note=note, frozen_share=float(estimate.frozen_share))
