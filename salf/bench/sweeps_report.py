"""Analysis and results.md sections of the extra sweeps (``salf.bench.sweeps``), one entry per sweep in
``SWEEP_TABLES``: the shared-rate oracle beside the per-boundary searched one, and the tied head beside
the untied one. Costs are relative to the main sweep's full fine-tuning (k = 0, same seed) and every
regret here is against the main (shared-rate, tied) oracle sweep, labelled as such; the regret tables of
``salf.bench.analysis`` do not read these records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from salf.bench.records import MetaRecord, Record, SearchedRun, TrainedRun, UntiedPlan
from salf.bench.scoring import ratio, stats
from salf.registry import Registry

SEARCHED, UNTIED, UNTIED_PLAN = "oracle-searched", "oracle-untied", "salf-untied"
"""Record kinds (and variant prefixes) of the extra sweeps (``salf.bench.sweeps``)."""

Point = Callable[[int, dict], dict[str, Any]]
"""``salf.bench.analysis``'s scorer: (seed, a run's metrics) -> quality, cost ratio and regret vs the main oracle."""

POINT_FIELDS = ("quality", "loss", "flops_ratio", "regret")


@dataclass(frozen=True)
class SweepTable:
    """How one extra sweep is summarised and shown."""

    analyze: Callable[[list[Record], dict[int, dict[int, dict]], Point, MetaRecord], dict[str, Any] | None]
    """(the task's records, the main oracle's metrics by seed and k, the scorer, the meta record) -> its
    summary, or None when the task has none of its records."""
    render: Callable[[dict[str, Any], str], list[str]]
    """(its summary, the quality metric's name) -> markdown lines."""


SWEEP_TABLES: Registry[SweepTable] = Registry("extra sweep table")


def analyze_sweeps(records: list[Record], oracle: dict[int, dict[int, dict]], point: Point,
                   meta: MetaRecord) -> dict[str, Any]:
    """Every extra sweep's summary for one task (only those with records)."""
    out = {}
    for name in SWEEP_TABLES.names():
        summary = SWEEP_TABLES.get(name).analyze(records, oracle, point, meta)
        if summary is not None:
            out[name] = summary
    return out


def render_sweeps(task: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    for name, summary in (task.get("sweeps") or {}).items():
        parts += SWEEP_TABLES.get(name).render(summary, task["quality_metric"])
    return parts


def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat.get("n", 0) > 1 else "")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _points(pts: list[dict[str, Any]]) -> dict[str, Any]:
    return {f: stats(p[f] for p in pts) for f in POINT_FIELDS}


def _done(records: list[Record], kind: str) -> dict[tuple[int | None, int | None], TrainedRun]:
    return {(r.seed, r.boundary): r for r in records
            if isinstance(r, TrainedRun) and r.kind == kind and r.done and r.metrics}


# -- shared vs searched rate --------------------------------------------------------------------------------
def _analyze_searched(records: list[Record], oracle: dict[int, dict[int, dict]], point: Point,
                      meta: MetaRecord) -> dict[str, Any] | None:
    runs = {key: r for key, r in _done(records, SEARCHED).items() if isinstance(r, SearchedRun)}
    failed = sum(1 for r in records if r.kind == SEARCHED and not r.done)
    if not runs and not failed:
        return None
    rows = []
    for k in range(meta.num_layers + 1):
        seeds = sorted(s for s in oracle if k in oracle[s] and (s, k) in runs)
        shared = [point(s, oracle[s][k]) for s in seeds]
        searched = [point(s, runs[(s, k)].metrics) for s in seeds]
        rs = [runs[(s, k)] for s in seeds]
        rows.append({
            "k": k, "seeds": seeds, "shared": _points(shared), "searched": _points(searched),
            "gain": stats(None if a["quality"] is None or b["quality"] is None else b["quality"] - a["quality"]
                          for a, b in zip(shared, searched)),
            "learning_rate": [r.learning_rate for r in rs], "lr_factor": [r.lr_factor for r in rs],
            "learning_rate_stats": stats(r.learning_rate for r in rs),
            "search_step_share": stats(r.search_step_share for r in rs),
            # the search's FLOPs as a share of the run it tunes (that run's measured FLOPs)
            "search_flops_share": stats(ratio(r.search_flops, r.metrics.get("train_flops")) for r in rs),
            "search_seconds": stats(r.search_seconds for r in rs)})
    return {"per_k": rows, "failed": failed}


def _render_searched(summary: dict[str, Any], q: str) -> list[str]:
    rows = []
    for row in summary["per_k"]:
        if not row["seeds"]:
            continue
        rates = ", ".join(f"{lr:.3g} (x{f:g})" for lr, f in zip(row["learning_rate"], row["lr_factor"])
                          if lr is not None and f is not None)
        rows.append([row["k"], _fmt(row["shared"]["quality"]), _fmt(row["searched"]["quality"]), _fmt(row["gain"]),
                     _fmt(row["shared"]["loss"]), _fmt(row["searched"]["loss"]), rates or "-",
                     _fmt(row["searched"]["flops_ratio"]), _fmt(row["searched"]["regret"]),
                     _fmt(row["search_step_share"], 2), _fmt(row["search_flops_share"], 2),
                     _fmt(row["search_seconds"], 1)])
    if not rows:
        return ["### Oracle at the shared rate vs at each boundary's searched rate", "",
                f"No finished searched run ({summary['failed']} failed; see 'Not available').", ""]
    return ["### Oracle at the shared rate vs at each boundary's searched rate", "",
            "`oracle-searched/k=K`: boundary k trained at its own rate, chosen by `salf.training.lrsearch` "
            "(successive halving over multiples of the task's rates on a held-out split of the training data, "
            "for that boundary's frozen layout), then trained with the same steps, seed and data as the shared-rate "
            "run. Chosen rate per seed (x the task's rate). Search cost: its training steps (validation counted) and "
            "measured FLOPs as a share of the run it tunes. 'regret vs shared oracle': the searched run scored "
            "against the shared-rate sweep (an extra row; the regret tables above stay on the shared-rate sweep).",
            "", _table(["k", f"{q} shared", f"{q} searched", "searched - shared", "eval loss shared",
                        "eval loss searched", "chosen lr per seed", "FLOPs x full", "regret vs shared oracle",
                        "search steps / run", "search FLOPs / run", "search s"], rows), ""]


SWEEP_TABLES.register("lr-search")(SweepTable(analyze=_analyze_searched, render=_render_searched))


# -- tied vs untied head ---------------------------------------------------------------------------------------
def _analyze_untied(records: list[Record], oracle: dict[int, dict[int, dict]], point: Point,
                    meta: MetaRecord) -> dict[str, Any] | None:
    runs = _done(records, UNTIED)
    plans = [r for r in records if isinstance(r, UntiedPlan) and r.kind == UNTIED_PLAN and r.done]
    if not runs and not plans:
        return None
    predicted = meta.predicted_step_flops_ratio
    rows = []
    for k in range(meta.num_layers + 1):
        # k = 0 trains the tied head with the embeddings: the main run is the untied sweep's k = 0 too
        untied = {s: oracle[s][0] if k == 0 else runs[(s, k)].metrics for s in oracle
                  if k in oracle[s] and (k == 0 or (s, k) in runs)}
        seeds = sorted(untied)
        predicted_untied = [runs[(s, k)].details.get("predicted_step_flops_ratio") for s in seeds if k > 0]
        rows.append({"k": k, "seeds": seeds, "tied": _points([point(s, oracle[s][k]) for s in seeds]),
                     "untied": _points([point(s, untied[s]) for s in seeds]),
                     "predicted_tied": predicted[k],
                     "predicted_untied": predicted_untied[0] if predicted_untied else predicted[k]})
    untied_by_seed = {s: {k: (oracle[s][0] if k == 0 else run.metrics if (run := runs.get((s, k))) else None)
                          for k in oracle[s]} for s in oracle}
    variants: dict[str, dict[str, Any]] = {}
    for r in sorted(plans, key=lambda r: (r.variant, r.seed)):
        s, k, k_tied = r.seed, r.boundary, r.tied_boundary
        metrics = untied_by_seed.get(s, {}).get(k)
        if metrics is None or k_tied not in oracle.get(s, {}):
            continue
        entry = variants.setdefault(r.variant, {"tied_variant": r.tied_variant, "boundaries": [],
                                                   "tied_boundaries": [], "untied_pts": [], "tied_pts": []})
        entry["boundaries"].append(k)
        entry["tied_boundaries"].append(k_tied)
        entry["untied_pts"].append(point(s, metrics))
        entry["tied_pts"].append(point(s, oracle[s][k_tied]))
    for entry in variants.values():
        entry["untied"] = _points(entry.pop("untied_pts"))
        entry["tied"] = _points(entry.pop("tied_pts"))
    return {"per_k": rows, "plans": variants}


def _render_untied(summary: dict[str, Any], q: str) -> list[str]:
    rows = [[row["k"], _fmt(row["tied"]["quality"]), _fmt(row["untied"]["quality"]), _fmt(row["tied"]["loss"]),
             _fmt(row["untied"]["loss"]), f"{row['predicted_tied']:.3f}", f"{row['predicted_untied']:.3f}",
             _fmt(row["tied"]["flops_ratio"]), _fmt(row["untied"]["flops_ratio"]), _fmt(row["untied"]["regret"])]
            for row in summary["per_k"] if row["seeds"]]
    parts = ["### Tied vs untied output head", "",
             "`oracle-untied/k=K`: boundary k with the output head untied from the frozen input embeddings (its own "
             "trainable copy of the matrix, `FreezeSpec(untie_head=True)`); k = 0 is the same run as tied (the tied "
             "head trains with the embeddings). Predicted: `boundary_costs(..., untie_head=True)`; measured: the runs' "
             "FLOPs, both relative to full fine-tuning. 'regret vs tied oracle': the untied run scored against the "
             "main (tied) sweep (an extra row; the regret tables above stay on the tied sweep).", "",
             _table(["k", f"{q} tied", f"{q} untied", "eval loss tied", "eval loss untied", "predicted FLOPs tied",
                     "predicted FLOPs untied", "measured FLOPs tied", "measured FLOPs untied",
                     "regret vs tied oracle"], rows), ""]
    if summary["plans"]:
        plan_rows = [[name, ",".join(map(str, e["tied_boundaries"])), ",".join(map(str, e["boundaries"])),
                      _fmt(e["tied"]["quality"]), _fmt(e["untied"]["quality"]), _fmt(e["tied"]["flops_ratio"]),
                      _fmt(e["untied"]["flops_ratio"]), _fmt(e["tied"]["regret"]), _fmt(e["untied"]["regret"])]
                     for name, e in summary["plans"].items()]
        parts += ["salf's default plan when the sweep ran (the variant names it) with the head untied: the tied "
                  "plan's trace and gains, the boundary chosen on the untied cost model, scored with the untied run "
                  "at that boundary.", "",
                  _table(["variant", "boundary tied", "boundary untied", f"{q} tied", f"{q} untied", "FLOPs x full tied",
                          "FLOPs x full untied", "regret tied", "regret untied (vs tied oracle)"], plan_rows), ""]
    return parts


SWEEP_TABLES.register("untied-head")(SweepTable(analyze=_analyze_untied, render=_render_untied))


__all__ = ["SEARCHED", "UNTIED", "UNTIED_PLAN", "SWEEP_TABLES", "SweepTable", "analyze_sweeps", "render_sweeps"]
