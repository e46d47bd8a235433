"""The plan units of a ``TaskBench`` (``PlanUnits``, a base class of it): trace the task once per lens, plan
with every estimator x policy from that trace, and record the per-datum boundaries when the suite asks for
them. Every plan is a record in ``runs.json`` that trains nothing: its quality is the oracle run at its boundary.
"""

from __future__ import annotations

import time
from typing import Any

from salf.bench.progress import now
from salf.bench.records import Record, record_from_dict, salf_variant
from salf.bench.store import RunStore
from salf.bench.suite import PER_DATUM_ESTIMATOR, PER_DATUM_POLICY


class PlanUnits:
    """The methods of ``TaskBench`` that trace and plan; they read its task, suite, store, progress and model."""

    def _plans(self, seed: int) -> list[Record]:
        from salf.method.gain import ESTIMATORS

        estimators = self.suite.estimators or ESTIMATORS.names()
        per_datum_lens = self._per_datum_lens()
        records: list[Record] = []
        for lens in self.lenses():
            variants = [salf_variant(lens, e, p) for e in estimators for p in self.suite.policies]
            keys = [RunStore.key(self.task.name, seed, v) for v in variants]
            planned = all(self.store.get(k, self.recipe) for k in keys)
            # The per-datum boundaries come from this lens's trace: trace again only when they are lost
            # (a runs.json from before the per-datum variant, whose plans are all finished).
            per_datum = lens == per_datum_lens and not any(
                self.store.get(RunStore.key(self.task.name, seed, v), self.recipe) for v in self.per_datum_variants(lens))
            if planned and not per_datum:
                self.progress.finish(RunStore.key(self.task.name, seed, f"trace/{lens}"), self._trace_weight(), None, "skip")
                records += [r for k in keys if (r := self.store.get(k, self.recipe)) is not None]
                self.skipped += len(keys)
                continue
            if planned:
                records += [r for k in keys if (r := self.store.get(k, self.recipe)) is not None]
                self.skipped += len(keys)
            records += self._trace_and_plan(seed, lens, [] if planned else estimators, per_datum)
        return records

    def lenses(self) -> list[str]:
        """The lenses traced: those that fit the task's labels and model and can read its data (the answer probe
        reads only completions with a closed set of answers)."""
        from salf.method.lenses import LENSES

        return [lens for lens in self.prepared.lenses(self.suite.lenses) if LENSES.get(lens).applies(self.loaded.data.data)]

    def _trace_and_plan(self, seed: int, lens: str, estimators: list[str], per_datum: bool = False) -> list[Record]:
        """Trace ``lens`` once; plan with every estimator x policy, and the per-datum boundaries if asked."""
        from salf.api import data_info, model_info
        from salf.method.gain import estimate_gains, fit_depth_law
        from salf.method.lenses import TraceConfig
        from salf.method.plan import PolicyChoice, make_plan
        from salf.method.trace import trace_model

        costs = self.costs
        lm = self.fresh_model(seed)
        config = TraceConfig(lens=lens, sample_size=self.task.trace_sample, batch_size=self.task.batch_size, seed=seed,
                             show_progress=False)
        began = started = time.perf_counter()
        trace = trace_model(lm.model, self.loaded.data.data, config, lm.pad_token_id)
        trace_seconds = time.perf_counter() - started
        info_model, info_data = model_info(lm), data_info(self.loaded.data)
        out = []
        gains_of: dict[str, tuple[Any, float]] = {}
        started = time.perf_counter()
        fit = fit_depth_law(trace.mean)  # one fit per trace, shared by every estimator
        fit_seconds = time.perf_counter() - started
        for estimator in estimators:
            started = time.perf_counter()
            gains = estimate_gains(trace.mean, estimator, fit, trace.chance)  # the same for every policy
            gains_of[estimator] = gains, fit_seconds + time.perf_counter() - started
            for policy in self.suite.policies:
                variant = salf_variant(lens, estimator, policy)
                key = RunStore.key(self.task.name, seed, variant)
                started = time.perf_counter()
                plan = make_plan(trace, gains, costs["step_costs"], PolicyChoice(policy, seed), info_model, info_data)
                plan_seconds = gains_of[estimator][1] + time.perf_counter() - started
                profiling = trace_seconds + costs["seconds"] + plan_seconds
                record = {"key": key, "task": self.task.name, "seed": seed, "variant": variant, "recipe": self.recipe,
                          "kind": "plan", "boundary": plan.boundary, "status": "done", "lens": lens,
                          "estimator": estimator, "policy": policy, "profiling_seconds": profiling,
                          "trace_seconds": trace_seconds, "cost_seconds": costs["seconds"], "plan_seconds": plan_seconds,
                          "details": {"trace": plan.trace, "gains": plan.gains, "fit": plan.fit,
                                      "predicted": plan.predicted.to_dict(), "note": gains.note,
                                      "chance": trace.chance, "frozen_share": gains.frozen_share},
                          "seconds": profiling, "finished": now()}
                out.append(record_from_dict(record))
        if per_datum:
            started = time.perf_counter()
            if PER_DATUM_ESTIMATOR in gains_of:
                gains, gain_seconds = gains_of[PER_DATUM_ESTIMATOR]
            else:
                gains = estimate_gains(trace.mean, PER_DATUM_ESTIMATOR, fit, trace.chance)
                gain_seconds = fit_seconds + time.perf_counter() - started
            started = time.perf_counter()
            plan = make_plan(trace, gains, costs["step_costs"], PolicyChoice(PER_DATUM_POLICY, seed, per_datum=True),
                             info_model, info_data)
            plan_seconds = gain_seconds + time.perf_counter() - started
            profiling = trace_seconds + costs["seconds"] + plan_seconds
            variant = self.per_datum_variants(lens)[0]
            out.append(record_from_dict({"key": RunStore.key(self.task.name, seed, variant), "task": self.task.name, "seed": seed,
                        "variant": variant, "recipe": self.recipe, "kind": "per-datum-plan", "status": "done",
                        "lens": lens, "estimator": PER_DATUM_ESTIMATOR, "policy": PER_DATUM_POLICY,
                        "boundary": plan.boundary, "n_train": len(self.loaded.data.data),
                        # rows of the trace are positions in the training data (trace_model read that list)
                        "traced_indices": plan.per_datum_indices, "traced_boundaries": plan.per_datum_boundaries,
                        "profiling_seconds": profiling, "trace_seconds": trace_seconds,
                        "cost_seconds": costs["seconds"], "plan_seconds": plan_seconds,
                        "details": {"trace": plan.trace, "gains": plan.gains, "predicted": plan.predicted.to_dict(),
                                    "note": gains.note},
                        "seconds": profiling, "finished": now()}))
        self.store.add(*out)
        plans = [r for r in out if r.kind == "plan"]
        self.progress.finish(RunStore.key(self.task.name, seed, f"trace/{lens}"), self._trace_weight(),
                             time.perf_counter() - began, f"traced and planned ({len(plans)} plans"
                             + (", per-datum boundaries)" if per_datum else ")"))
        del lm
        return plans
