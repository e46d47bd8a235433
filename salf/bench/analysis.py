"""From the runs of a suite to numbers: per task the oracle, plans, baselines and per-datum variants
over seeds (``analyze``), and every plan's and baseline's regret per model, pooled over tasks and seeds
(``regret_by_model``, ``combined_regret`` over several output directories).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from salf.bench.records import (
    BaselineDecision,
    MetaRecord,
    PerDatumRun,
    PlanRecord,
    Record,
    TrainedRun,
    Variant,
    salf_variant,
)
from salf.bench.scoring import (
    REGRET_KEYS,
    TRADEOFF_LAMBDAS,
    pareto_frontier,
    ratio,
    regret,
    regret_key,
    tradeoff_fields,
)
from salf.bench.scoring import stats as _stats
from salf.bench.store import complete_records, load_records
from salf.bench.suite import LOSS, QUALITY, TARGET_FLOPS, TARGET_QUALITY
from salf.bench.sweeps_report import analyze_sweeps
from salf.config.plan import DEFAULT_CELLS

PER_SEED_FIELDS = ("boundary", "regret", *REGRET_KEYS, "share_kept", "flops_ratio", "memory_ratio")
"""What ``analyze`` keeps of every seed of a variant (beside the mean and std over seeds)."""


def analyze(records: Iterable[Record], target_flops: float = TARGET_FLOPS) -> dict[str, Any]:
    """Per task: the oracle per boundary, and plans / baselines with quality, cost and regret, over seeds
    (``target_flops``: the headline target's share of full fine-tuning's FLOPs)."""
    by_task: dict[str | None, list[Record]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r)
    return {task: _analyze_task(rs, target_flops) for task, rs in by_task.items()}


def _analyze_task(records: list[Record], target_flops: float) -> dict[str, Any]:
    meta = next((r for r in records if r.variant == "meta" and isinstance(r, MetaRecord)), None)
    if meta is None:
        return {}
    n, data_task = meta.num_layers, meta.data_task
    q_name, q_high = QUALITY[data_task]
    seeds = sorted({r.seed for r in records if r.seed is not None})
    oracle: dict[int, dict[int, dict]] = {s: {} for s in seeds}
    for r in records:
        if isinstance(r, TrainedRun) and r.kind == "oracle" and r.done and r.seed is not None and r.boundary is not None:
            oracle[r.seed][r.boundary] = r.metrics

    def point(seed: int, metrics: dict) -> dict[str, Any]:
        full = oracle[seed].get(0, {})
        ks = sorted(oracle[seed])
        costs = [oracle[seed][k].get("train_flops") for k in ks]
        cost = metrics.get("train_flops")
        quality, loss = metrics.get(q_name), metrics.get(LOSS[0])
        return {
            "quality": quality, "loss": loss,
            # share of full fine-tuning's quality kept (same seed); for higher-is-better metrics only
            "quality_ratio": ratio(quality, full.get(q_name)) if q_high else None,
            "flops_ratio": ratio(cost, full.get("train_flops")),
            "step_time_ratio": ratio(metrics.get("step_seconds_median"), full.get("step_seconds_median")),
            # measured peak resident memory of the run (a process that trained a larger run before may keep some
            # of it: a ceiling, noisier than the FLOPs); None for records from before it was measured
            "memory_ratio": ratio(metrics.get("run_peak_rss_bytes"), full.get("run_peak_rss_bytes")),
            "regret": regret(cost, quality, costs, [oracle[seed][k].get(q_name) for k in ks], q_high),
            "regret_loss": regret(cost, loss, costs, [oracle[seed][k].get(LOSS[0]) for k in ks], LOSS[1]),
            **tradeoff_fields(metrics, oracle[seed], q_name, q_high),
            "full_train_seconds": full.get("train_seconds"),
        }

    rows: dict[str, list[dict]] = {}
    for r in records:
        kind = r.kind
        if (kind not in ("plan", "per-datum", "baseline", "ceiling", "equal-compute") or not r.done
                or not isinstance(r, (PlanRecord, TrainedRun, BaselineDecision)) or r.seed is None):
            continue
        own = r.metrics if isinstance(r, TrainedRun) else {}
        if own:  # its own run
            metrics = own
        elif r.boundary is not None and r.boundary in oracle.get(r.seed, {}):
            metrics = oracle[r.seed][r.boundary]  # the oracle run at its boundary: identical by construction
        else:
            continue
        p = point(r.seed, metrics)
        boundary = r.mean_boundary if isinstance(r, PerDatumRun) and kind == "per-datum" else r.boundary
        profiling = getattr(r, "profiling_seconds", None)  # a plan's, a baseline's decision's, a per-datum run's
        p.update(seed=r.seed, boundary=boundary, kind=kind, profiling_seconds=profiling, reuses_oracle=not own,
                 profiling_fraction=ratio(profiling, p["full_train_seconds"]))
        rows.setdefault(r.variant, []).append(p)

    unavailable = [{"variant": r.variant, "seed": r.seed, "status": status, "error": getattr(r, "error", None)}
                   for r in records if (status := getattr(r, "status", None)) not in (None, "done")]
    fields = ("quality", "quality_ratio", "loss", "flops_ratio", "step_time_ratio", "regret", "regret_loss",
              *REGRET_KEYS, "share_kept", "profiling_seconds", "profiling_fraction", "boundary")
    variants = {}
    for variant, ps in sorted(rows.items()):
        variants[variant] = {"kind": ps[0]["kind"], "boundaries": [p["boundary"] for p in ps],
                             "seeds": [p["seed"] for p in ps], "reuses_oracle": ps[0]["reuses_oracle"],
                             **{f: _stats(p[f] for p in ps) for f in fields},
                             # per seed, so that tables over several tasks (``regret_by_model``) pool seeds
                             "per_seed": [{f: p[f] for f in ("seed", *PER_SEED_FIELDS)} for p in ps]}

    predicted = meta.predicted_step_flops_ratio
    per_k = []
    for k in range(n + 1):
        ms = [oracle[s][k] for s in seeds if k in oracle[s]]
        pts = [point(s, oracle[s][k]) for s in seeds if k in oracle[s]]
        per_k.append({
            "k": k, "predicted_flops_ratio": predicted[k], "predicted_memory_ratio": meta.predicted_memory_ratio[k],
            "n": len(ms), **{f: _stats(p[f] for p in pts) for f in ("quality", "quality_ratio", "loss", "flops_ratio",
                                                                   "step_time_ratio", *REGRET_KEYS, "share_kept")},
            "train_seconds": _stats(m.get("train_seconds") for m in ms),
            "run_rss_growth_bytes": _stats(m.get("run_rss_growth_bytes") for m in ms),
        })
    mean_cost = [row["flops_ratio"]["mean"] for row in per_k]
    mean_quality = [row["quality"]["mean"] for row in per_k]
    on_frontier = set(pareto_frontier(mean_cost, mean_quality, q_high))
    for row in per_k:
        row["on_frontier"] = row["k"] in on_frontier
    return {"data_task": data_task, "default_cell": meta.default_cell or data_task, "num_layers": n, "quality_metric": q_name, "higher_is_better": q_high,
            "seeds": seeds, "oracle": per_k, "variants": variants, "model": meta.model,
            "unavailable": unavailable, "plan_regret": _plan_regret(rows),
            "per_datum": _per_datum_comparison(records, oracle, point),
            "n_train": meta.n_train, "n_eval": meta.n_eval,
            "recipe": meta.task_config, "target": _target_check(per_k, variants, target_flops),
            # extra sweeps (searched rates, untied head): their own tables, never in the regret tables
            "sweeps": analyze_sweeps(records, oracle, point, meta)}


def _target_check(per_k: list[dict], variants: dict[str, dict], target_flops: float = TARGET_FLOPS) -> dict[str, Any]:
    """Which oracle boundaries and which rows meet the headline target (None where quality has no ratio)."""

    def meets(row: dict) -> bool:
        q, c = (row.get("quality_ratio") or {}).get("mean"), (row.get("flops_ratio") or {}).get("mean")
        return q is not None and c is not None and q >= TARGET_QUALITY and c <= target_flops + 1e-9

    keeping = [row for row in per_k if (row.get("quality_ratio") or {}).get("mean") is not None
               and row["quality_ratio"]["mean"] >= TARGET_QUALITY]
    cheapest = min(keeping, key=lambda row: row["flops_ratio"]["mean"], default=None)
    return {"quality": TARGET_QUALITY, "flops": target_flops,
            "cheapest_oracle_keeping_quality": None if cheapest is None else
            {"k": cheapest["k"], "flops_ratio": cheapest["flops_ratio"]["mean"],
             "quality_ratio": cheapest["quality_ratio"]["mean"]},
            "oracle_meeting": [row["k"] for row in per_k if meets(row)],
            "variants_meeting": sorted(name for name, v in variants.items() if meets(v))}


def _per_datum_comparison(records: list[Record], oracle: dict[int, dict[int, dict]],
                          point: Callable[[int, dict], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each per-datum variant against its single-boundary plan (the oracle run at the global boundary)."""
    fields = ("quality", "loss", "flops_ratio", "step_time_ratio", "regret", "regret_loss", *REGRET_KEYS, "share_kept")
    out: dict[str, dict[str, Any]] = {}
    runs = [r for r in records if isinstance(r, PerDatumRun) and r.kind == "per-datum" and r.done and r.seed is not None]
    for r in sorted(runs, key=lambda r: (r.variant, r.seed)):
        seed, k = r.seed, r.global_boundary
        assert seed is not None
        single = point(seed, oracle[seed][k]) if k in oracle.get(seed, {}) else {}
        entry = out.setdefault(r.variant, {
            "lens": r.lens, "estimator": r.estimator, "policy": r.policy,
            "single_variant": salf_variant(str(r.lens), str(r.estimator), str(r.policy)), "per_seed": []})
        entry["per_seed"].append({
            "seed": seed, "global_boundary": k, "mean_boundary": r.mean_boundary,
            "mean_boundary_trained": r.mean_boundary_trained, "boundary_histogram": r.boundary_histogram,
            "per_datum": {f: point(seed, r.metrics)[f] for f in fields},
            "single": {f: single.get(f) for f in fields}})
    for entry in out.values():
        seeds = entry["per_seed"]
        entry["per_datum"] = {f: _stats(s["per_datum"][f] for s in seeds) for f in fields}
        entry["single"] = {f: _stats(s["single"][f] for s in seeds) for f in fields}
        entry["quality_gain"] = _stats(None if s["per_datum"]["quality"] is None or s["single"]["quality"] is None
                                       else s["per_datum"]["quality"] - s["single"]["quality"] for s in seeds)
        entry["mean_boundary"] = _stats(s["mean_boundary"] for s in seeds)
        entry["global_boundary"] = _stats(s["global_boundary"] for s in seeds)
    return out


def _plan_regret(rows: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Regret of salf plans by '<lens>/<estimator>' (rows) and policy (columns), over seeds."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, ps in rows.items():
        if ps[0]["kind"] != "plan":
            continue
        lens, estimator, policy = Variant.parse(variant).rest.split("/", 2)
        table.setdefault(f"{lens}/{estimator}", {})[policy] = {
            f: _stats(p[f] for p in ps) for f in ("regret", "regret_loss", *REGRET_KEYS)}
    return table


ALL_MODELS = "all models"
"""The per-model table's key for every task of every model pooled (present when there are several models)."""


REGRET_TABLE_KINDS = ("plan", "per-datum", "baseline")
"""Rows of the per-model table: ways of choosing what to train. Ceiling and equal-compute runs train the same
boundaries on other budgets, so they stay in the per-task tables."""


REGRET_TABLE_ORDER = regret_key(max(TRADEOFF_LAMBDAS))
"""The per-model table is sorted by the trade-off regret that weighs cost most (the largest lambda: salf is
there to save compute, and this one still charges a point of quality at a tenth of full fine-tuning's FLOPs),
then by name."""


def default_plan(default_cell: str) -> str:
    """The variant name of the default salf plan for a row of ``DEFAULT_CELLS`` (a task's ``default_cell``; e.g.
    'salf/probe/sufficiency-uniform/unsolved=0.75')."""
    cell = DEFAULT_CELLS[default_cell]
    return salf_variant(cell.lens, cell.estimator, cell.policy)


def _pooled_row(variant: str, entry: dict[str, Any]) -> dict[str, Any]:
    """One row of the per-model table: means over every (task, seed) of the variant."""
    seeds = entry["per_seed"]
    return {"variant": variant, "kind": entry["kind"], "default": entry["default"], "tasks": entry["tasks"],
            "n": len(seeds),
            # the plain regret in points too (x 100; for a loss task: 100 x the loss regret), like the lambda columns
            "regret_points": _stats(None if s["regret"] is None else 100.0 * s["regret"] for s in seeds),
            **{f: _stats(s[f] for s in seeds) for f in (*REGRET_KEYS, "share_kept", "flops_ratio", "memory_ratio")}}


def _table_order(row: dict[str, Any]) -> tuple[Any, ...]:
    mean = row[REGRET_TABLE_ORDER]["mean"]
    return (mean is None, mean if mean is not None else 0.0, row["variant"])


DEFAULT_ROW = "salf/default (each task's default cell)"
"""The per-model table's row for the default plan when its tasks have different default cells (``DEFAULT_CELLS``
is keyed by the data's task and answers): each task's own default, pooled."""


def regret_by_model(analyses: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model (a task's ``model``), every plan, per-datum variant and baseline pooled over all its tasks and
    seeds: mean regret (points), trade-off regrets, share kept and FLOPs, sorted by ``REGRET_TABLE_ORDER``.

    ``analyses``: one ``analyze`` result per result directory, so that one table may span several benchmarks.
    A per-task table answers "which boundary here"; this one answers "which way of choosing, across tasks".
    Every (task, seed) weighs the same; ``tasks`` and ``n`` say how many a row holds (a baseline unavailable
    on a task has fewer). With tasks of several models, one more table, ``ALL_MODELS``, pools them all.
    """
    pooled: dict[str, dict[str, dict[str, Any]]] = {}
    tasks: dict[str, list[str]] = {}
    defaults: dict[str, list[tuple[str, str, dict]]] = {}  # per group: (task, its default variant, that variant's row)
    for analysis in analyses:
        for name, task in analysis.items():
            if not task:
                continue
            model = str(task.get("model"))
            default = default_plan(task["default_cell"])
            for group in (model, ALL_MODELS):
                tasks.setdefault(group, []).append(name)
                if default in task["variants"]:
                    defaults.setdefault(group, []).append((name, default, task["variants"][default]))
                for variant, v in task["variants"].items():
                    if v["kind"] not in REGRET_TABLE_KINDS:
                        continue
                    entry = pooled.setdefault(group, {}).setdefault(
                        variant, {"kind": v["kind"], "default": False, "tasks": [], "per_seed": []})
                    entry["default"] = entry["default"] or variant == default
                    entry["tasks"].append(name)
                    entry["per_seed"] += v["per_seed"]
    for group, rows in defaults.items():
        if len({variant for _, variant, _ in rows}) > 1:
            # Tasks of several kinds have different default cells: one row pools each task's own default
            # (what a user who never names a lens, estimator or policy gets), and no single cell is bold.
            for entry in pooled[group].values():
                entry["default"] = False
            pooled[group][DEFAULT_ROW] = {"kind": "plan", "default": True, "tasks": [name for name, _, _ in rows],
                                          "per_seed": [p for _, _, v in rows for p in v["per_seed"]]}
    if len(tasks) <= 2:  # one model (or none): the pooled table would repeat it
        pooled.pop(ALL_MODELS, None)
        tasks.pop(ALL_MODELS, None)
    return {model: {"tasks": tasks[model], "sort_by": REGRET_TABLE_ORDER, "lambdas": list(TRADEOFF_LAMBDAS),
                    "rows": sorted((_pooled_row(v, e) for v, e in variants.items()), key=_table_order)}
            for model, variants in pooled.items()}


def finished_analyses(dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """``analyze`` of the finished seeds of each benchmark output directory."""
    return [analyze(complete_records(load_records(d))) for d in dirs]


def combined_regret(dirs: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """``regret_by_model`` over the finished seeds of several benchmark output directories at once."""
    return regret_by_model(finished_analyses(dirs))


__all__ = ["ALL_MODELS", "DEFAULT_ROW", "PER_SEED_FIELDS", "REGRET_TABLE_KINDS", "REGRET_TABLE_ORDER", "TARGET_FLOPS", "TARGET_QUALITY", "analyze", "combined_regret", "default_plan", "finished_analyses", "regret_by_model"]
