"""Extra oracle sweeps a task may ask for (``SWEEPS``), run after a seed's main units.

- **lr-search** (``BenchTask.lr_search``): every boundary k = 0..L trained again at its own searched
  rate (``oracle-searched/k=K``): ``salf.training.lrsearch.search_learning_rate`` for that boundary's
  ``FreezeSpec`` on a held-out split of the training data, then the run at the chosen rate. The record
  holds the chosen rate, every candidate and what the search cost (steps, FLOPs, seconds).
- **untied-head** (``BenchTask.head_modes`` with 'untie'): the sweep with a tied output head untied
  (``oracle-untied/k=K``, k > 0; k = 0 trains the tied head with the embeddings, so it is the main run)
  and salf's default plan chosen on the untied cost model (``boundary_costs(..., untie_head=True)``)
  from the tied plan's own gains, scored with the untied run at its boundary (``salf-untied/...``).

Neither changes the main (shared-rate, tied) sweep, which every regret table is scored against.
``TaskBench`` calls ``run(bench, seed, oracle)``; ``check(bench)`` refuses what the model cannot do
before anything trains. The bench is passed in (not imported: ``salf.bench.taskbench`` imports this).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from salf.bench.records import PlanRecord, Record, Variant, boundary_variant
from salf.bench.store import RunStore
from salf.bench.suite import BenchTask
from salf.bench.sweeps_report import SEARCHED, UNTIED, UNTIED_PLAN
from salf.errors import SalfError
from salf.fileio import fingerprint
from salf.method.freeze import FreezeSpec
from salf.registry import Registry


@dataclass(frozen=True)
class ExtraSweep:
    """One extra sweep: when it runs, what it trains, and what it costs in progress weight."""

    enabled: Callable[[BenchTask], bool]
    """Whether the task's options ask for it."""
    run: Callable[[Any, int, dict[int, Record]], None]
    """(TaskBench, seed, the main sweep's records by k): run (or skip, when stored) every unit of one seed."""
    weight: Callable[[Any], float]
    """Progress weight of one seed's units (a training step weighs 1)."""
    check: Callable[[Any], None] = lambda bench: None
    """Raise ``SalfError`` when the task's model cannot run the sweep (called before anything trains)."""


SWEEPS: Registry[ExtraSweep] = Registry("extra sweep")


def active_sweeps(task: BenchTask) -> list[ExtraSweep]:
    """The extra sweeps ``task``'s options turn on, in registry order."""
    return [s for s in (SWEEPS.get(n) for n in SWEEPS.names()) if s.enabled(task)]


# -- per-boundary searched learning rate ---------------------------------------------------------------
def search_recipe(bench: Any) -> str:
    """The searched runs' recipe: the task's, plus the search settings (changing them reruns only these)."""
    return f"{bench.recipe}+lr-search={fingerprint(asdict(bench.task.lr_search))}"


def _searched_unit(bench: Any, seed: int, k: int) -> Record:
    t, n = bench.task, bench.prepared.num_layers
    variant, spec = boundary_variant(SEARCHED, k), FreezeSpec.from_boundary(k, n)
    weight = t.steps * (1 + t.lr_search.budget)

    def make() -> dict[str, Any]:
        from salf.training.config import TrainingInterrupted
        from salf.training.lrsearch import TunedModel, search_learning_rate

        search = t.lr_search
        run_dir = bench.run_dir(seed, variant)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = bench.train_config(seed, t.steps)
        settings = {"lr_search_config": asdict(search), "shared_lr": t.lr, "shared_head_lr": t.head_lr}
        started = time.perf_counter()
        with open(run_dir / "lr-search.log", "w") as log, contextlib.redirect_stdout(log):
            try:
                tuned = TunedModel(lambda: bench.fresh_model(seed).model, bench.loaded.model.tokenizer)
                result = search_learning_rate(tuned, bench.loaded.data.data, spec, config, run_dir / "lr-search",
                                              task=bench.loaded.data.task, search=search)
            except TrainingInterrupted:
                raise
            except SalfError as e:  # e.g. a budget too small for the grid: recorded, shown as not available
                return {"kind": SEARCHED, "boundary": k, "status": "failed", "error": f"learning-rate search: {e}",
                        "steps": t.steps, "spec": spec.to_dict(), "metrics": {}, "details": settings,
                        "search_seconds": time.perf_counter() - started}
            finally:
                shutil.rmtree(run_dir / "lr-search", ignore_errors=True)
        found = result.to_dict()
        body = bench._do_train(seed, variant, SEARCHED, spec, k, t.steps, None, settings,
                               rates=(result.learning_rate, result.head_learning_rate))
        body.update(learning_rate=result.learning_rate, head_learning_rate=result.head_learning_rate,
                    lr_factor=result.factor, lr_search=found, search_steps=result.steps,
                    search_step_share=found["step_share"], search_flops=result.flops, search_seconds=result.seconds)
        return body

    return bench._unit(seed, variant, weight, make, recipe=search_recipe(bench))


def _check_search(bench: Any) -> None:
    """The search's budget must fit its grid on this task's data (else every boundary would fail, hours in)."""
    from salf.training.config import TrainConfig
    from salf.training.lrsearch import plan_search

    config = TrainConfig(max_steps=bench.task.steps, batch_size=bench.task.batch_size)
    try:
        plan_search(len(bench.loaded.data.data), config, bench.task.lr_search)
    except SalfError as e:
        raise SalfError(f"task {bench.task.name}: lr_search: {e.problem} ({bench.task.steps} steps)",
                        'raise lr_search\'s "budget" or use fewer "factors"') from None


def _run_searched(bench: Any, seed: int, oracle: dict[int, Record]) -> None:
    for k in range(bench.prepared.num_layers + 1):
        _searched_unit(bench, seed, k)


SWEEPS.register("lr-search")(ExtraSweep(
    enabled=lambda task: task.lr_search is not None,
    run=_run_searched,
    weight=lambda bench: (bench.prepared.num_layers + 1) * bench.task.steps * (1 + bench.task.lr_search.budget),
    check=_check_search,
))


# -- untied output head -----------------------------------------------------------------------------------
def _check_untie(bench: Any) -> None:
    from salf.models.heads import has_tied_head

    if not has_tied_head(bench.loaded.model.model):
        raise SalfError(
            f"task {bench.task.name}: head_modes asks for 'untie', but the output head of {bench.task.model} is not tied "
            "to its input embeddings (there is nothing to untie)",
            'drop "untie" from the task\'s head_modes (keep ["tied"]); only models with tied embeddings '
            "(GPT-2, Gemma, Qwen2 0.5B/1.5B, Llama 3.2 1B/3B) have a head to untie")


def untied_spec(k: int, num_layers: int) -> FreezeSpec:
    """Boundary ``k`` with the tied head untied (k = 0 trains the tied head with the embeddings anyway)."""
    spec = FreezeSpec.from_boundary(k, num_layers)
    return replace(spec, untie_head=True) if k > 0 else spec


def _run_untied(bench: Any, seed: int, oracle: dict[int, Record]) -> None:
    from salf.bench.analysis import default_plan

    n, t = bench.prepared.num_layers, bench.task
    tied, untied = bench.costs, bench.costs_untied
    for k in range(1, n + 1):
        extra = {"head": "untie", "predicted_step_flops_ratio": float(untied["ratio"][k]),
                 "predicted_memory_ratio": float(untied["memory_ratio"][k]),
                 "tied_predicted_step_flops_ratio": float(tied["ratio"][k])}
        bench._train(seed, boundary_variant(UNTIED, k), UNTIED, untied_spec(k, n), boundary=k, extra=extra)

    default = default_plan(bench.default_cell)
    plan = bench.store.get(RunStore.key(t.name, seed, default), bench.recipe)
    if not isinstance(plan, PlanRecord):  # the suite's lenses, estimators or policies leave the default plan out
        return

    def make() -> dict[str, Any]:
        import numpy as np

        from salf.method.plan import choose_boundary

        started = time.perf_counter()
        details = plan.details
        k = choose_boundary(np.asarray(details["gains"], dtype=float), untied["ratio"], plan.policy, seed=seed,
                            frozen_share=details.get("frozen_share") or 0.0)
        seconds = time.perf_counter() - started + untied["seconds"]
        return {"kind": UNTIED_PLAN, "boundary": int(k), "status": "done", "lens": plan.lens,
                "estimator": plan.estimator, "policy": plan.policy, "head": "untie",
                "spec": untied_spec(int(k), n).to_dict(), "tied_variant": default, "tied_boundary": plan.boundary,
                # the tied plan's trace and gains, costed untied: only the cost model and the choice are new
                "profiling_seconds": (plan.profiling_seconds or 0.0) - (plan.cost_seconds or 0.0) + seconds,
                "details": {"predicted_step_flops_ratio": float(untied["ratio"][k]),
                            "predicted_memory_ratio": float(untied["memory_ratio"][k]),
                            "tied_predicted_step_flops_ratio": float(tied["ratio"][k])}}

    bench._unit(seed, str(Variant(UNTIED_PLAN, Variant.parse(default).rest)), 0.0, make)


SWEEPS.register("untied-head")(ExtraSweep(
    enabled=lambda task: "untie" in task.head_modes,
    run=_run_untied,
    weight=lambda bench: bench.prepared.num_layers * bench.task.steps,
    check=_check_untie,
))


__all__ = ["SEARCHED", "SWEEPS", "UNTIED", "UNTIED_PLAN", "ExtraSweep", "active_sweeps", "search_recipe", "untied_spec"]
