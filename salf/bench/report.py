"""The benchmark's report writer: ``results.md`` (tables per model and per task), ``summary.json``,
``frontier.png``; and ``salf bench-table`` (``bench_table``), the per-model regret table over several
output directories.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salf.bench.analysis import REGRET_TABLE_ORDER, analyze, default_plan, finished_analyses, regret_by_model
from salf.bench.progress import duration, now
from salf.bench.records import Record
from salf.bench.scoring import REGRET_KEYS, TRADEOFF_LAMBDAS
from salf.bench.suite import BenchSuite
from salf.bench.sweeps_report import render_sweeps
from salf.config.plan import DEFAULT_CELL_WORDS
from salf.errors import SalfError
from salf.fileio import write_atomic, write_json


def _fmt(stat: dict[str, Any] | None, digits: int = 3, pct: bool = False, spread: bool = True) -> str:
    """``mean ± std`` of a ``_stats`` dict (the std only with ``spread`` and more than one value)."""
    if not stat or stat.get("mean") is None:
        return "-"
    scale, suffix = (100.0, "%") if pct else (1.0, "")
    text = f"{stat['mean'] * scale:.{digits}f}{suffix}"
    if spread and stat.get("n", 0) > 1:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _boundaries_text(v: dict[str, Any]) -> str:
    if v["kind"] == "per-datum":  # the mean boundary of the training data, per seed
        return "per datum, mean " + ",".join(f"{b:.2f}" for b in v["boundaries"])
    return ",".join(str(b) for b in v["boundaries"])


def _target_lines(task: dict[str, Any]) -> str:
    t = task.get("target") or {}
    if not t or task["quality_metric"] is None or not task["higher_is_better"]:
        return ""
    goal = f"at least {t['quality']:.0%} of full fine-tuning's quality at no more than {t['flops']:.0%} of its FLOPs"
    cheapest = t["cheapest_oracle_keeping_quality"]
    keep = ("no boundary but full fine-tuning keeps it" if cheapest is None or cheapest["k"] == 0 else
            f"the cheapest boundary keeping {t['quality']:.0%} is k={cheapest['k']} "
            f"({cheapest['quality_ratio']:.1%} of full at {cheapest['flops_ratio']:.3f} FLOPs)")
    oracle = ", ".join(f"k={k}" for k in t["oracle_meeting"]) or "none"
    rows = ", ".join(f"`{v}`" for v in t["variants_meeting"]) or "none"
    return (f"**Target** ({goal}, means over seeds): {keep}; oracle boundaries meeting it: {oracle}; "
            f"plans and baselines meeting it: {rows}.")


LAMBDA_HEADERS = tuple(f"regret λ={lam:g} (points)" for lam in TRADEOFF_LAMBDAS)


TRADEOFF_HEADERS = (*LAMBDA_HEADERS, "share of best kept")


def _tradeoff_cells(v: dict[str, Any]) -> list[str]:
    """The trade-off regrets (points) and the share of the best boundary's quality kept, as table cells."""
    return [*(_fmt(v.get(key), 2) for key in REGRET_KEYS), _fmt(v.get("share_kept"), 1, pct=True)]


def _variant_rows(task: dict[str, Any], kinds: tuple[str, ...]) -> list[list[Any]]:
    rows = []
    for name, v in task["variants"].items():
        if v["kind"] not in kinds:
            continue
        rows.append([name, _boundaries_text(v), _fmt(v["quality"]), _fmt(v.get("quality_ratio")), _fmt(v["loss"]),
                     _fmt(v["flops_ratio"]), _fmt(v["step_time_ratio"]), _fmt(v["regret"]), _fmt(v["regret_loss"]),
                     *_tradeoff_cells(v), _fmt(v["profiling_seconds"], 1), _fmt(v["profiling_fraction"], 1, pct=True),
                     "oracle run" if v["reuses_oracle"] else "own run"])
    return rows


VARIANT_HEADERS = ("variant", "boundary per seed", "quality", "quality x full", "eval loss", "FLOPs x full", "step time x full",
                   "regret (quality)", "regret (loss)", *TRADEOFF_HEADERS, "profiling s", "profiling / full train",
                   "quality from")


def _per_datum_section(comparison: dict[str, dict[str, Any]]) -> list[str]:
    parts = ["### Per-datum vs single boundary", "",
             "Per datum: every traced datum trained from its own boundary (its own deviation trace, the same "
             "policy), every other datum from the plan's global boundary; one run of its own with the oracle "
             "recipe, steps and seed, batches grouped by boundary. Single boundary: the plan from the same "
             "trace, estimator and policy (the oracle run at its boundary). FLOPs of the per-datum run: "
             "each boundary's measured FLOPs per padded token (its oracle run) times the padded tokens trained "
             "there; step time is the median over its steps, which mix boundaries.", ""]
    rows = []
    for variant, e in comparison.items():
        seeds = e["per_seed"]
        single_k = ",".join(str(s["global_boundary"]) for s in seeds)
        histogram = "; ".join(", ".join(f"k={k}: {n}" for k, n in (s["boundary_histogram"] or {}).items())
                              for s in seeds)
        for name, point, boundary, data in ((e["single_variant"], e["single"], single_k, f"all at k={single_k}"),
                                            (variant, e["per_datum"], _fmt(e["mean_boundary"], 2), histogram)):
            rows.append([name, boundary, _fmt(point["quality"]), _fmt(point["loss"]), _fmt(point["flops_ratio"]),
                         _fmt(point["step_time_ratio"]), _fmt(point["regret"]), *_tradeoff_cells(point), data])
    parts += [_md_table(["variant", "mean boundary", "quality", "eval loss", "FLOPs x full", "step time x full",
                         "regret (quality)", *TRADEOFF_HEADERS, "training data per boundary"], rows), ""]
    parts += [f"- `{variant}`: quality per datum minus single boundary {_fmt(e['quality_gain'])} "
              f"over {len(e['per_seed'])} seed(s)" for variant, e in comparison.items()]
    return [*parts, ""]


TRADEOFF_TEXT = (
    "**Trade-off regret and share kept.** The plain regret (the best oracle boundary costing no more than the row, "
    "minus the row) never charges a cheap row for the quality it gives up (the head-only boundary has regret 0 "
    "whatever its accuracy: nothing is cheaper). Regret λ = max over oracle boundaries k of "
    "[q(k) - λ c(k)] minus [q(row) - λ c(row)], with q in points (100 x accuracy or exact match; -100 x eval loss "
    "for language-modelling tasks) and c the measured FLOPs as a fraction of full fine-tuning's (same seed): "
    + ", ".join(f"λ = {lam:g} values one point at {1 / lam:.0%} of full fine-tuning's FLOPs" for lam in TRADEOFF_LAMBDAS)
    + ". 0 is the boundary with the best trade-off, positive is worse (in points). Share of best kept = the row's "
    "quality over the best boundary's (higher-is-better metrics). Per seed, then mean ± std over seeds.")


def regret_table_markdown(table: dict[str, dict[str, Any]]) -> list[str]:
    """The per-model table (``regret_by_model``) as a results.md section."""
    if not table:
        return []
    parts = ["## Regret by model: every way of choosing, over all tasks and seeds", "",
             f"Every salf plan (lens/estimator/policy), per-datum variant and baseline, mean over all the model's tasks "
             f"and seeds (each (task, seed) weighs the same), sorted by {REGRET_TABLE_ORDER.replace('regret_', 'regret λ=')}. "
             "All regrets in points (the plain regret x 100). **Bold**: the default plan (the task's default lens, "
             "estimator and policy, salf.config.plan.DEFAULT_CELLS; where the model's tasks have different default "
             "cells, the row that pools each task's own). 'tasks' / 'runs': how many tasks and (task, seed) pairs a row "
             "holds. Peak memory: the run's measured peak resident memory over full fine-tuning's (same seed; the "
             "process's, so it counts the weights and the runtime too, and a process that trained a larger run "
             "before may keep some of it: read it as a ceiling, '-' where not measured).", ""]
    for model, entry in table.items():
        rows = [[i, f"**{r['variant']}** (default)" if r["default"] else r["variant"], r["kind"], len(r["tasks"]),
                 r["n"], _fmt(r["regret_points"], 2, spread=False), *(_fmt(r[key], 2, spread=False) for key in REGRET_KEYS),
                 _fmt(r["share_kept"], 1, pct=True, spread=False), _fmt(r["flops_ratio"], 3, spread=False),
                 _fmt(r["memory_ratio"], 2, spread=False)]
                for i, r in enumerate(entry["rows"], 1)]
        parts += [f"### Model `{model}` ({len(entry['tasks'])} task(s): {', '.join(entry['tasks'])})", "",
                  _md_table(["#", "variant", "kind", "tasks", "runs", "regret (points)", *LAMBDA_HEADERS,
                             "share of best kept", "FLOPs x full", "peak memory x full"], rows), ""]
    return parts


def oracle_table_markdown(analyses: Iterable[dict[str, Any]]) -> list[str]:
    """Every task's oracle sweep in one table per model: quality mean ± std over seeds at each boundary (the
    best in bold), the measured FLOPs above, and the boundaries the default plan chose, per seed."""
    by_model: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for analysis in analyses:
        for name, task in analysis.items():
            if task and task.get("seeds"):
                by_model.setdefault(str(task.get("model")), []).append((name, task))
    parts = ["## Oracle sweeps by model", "",
             "Quality at every boundary k (k = 0: full fine-tuning; k = L: the head only), mean ± std over the "
             "seeds finished; accuracy in %. FLOPs: measured training FLOPs x full fine-tuning, mean over the "
             "model's tasks. 'default k': the boundary salf's default plan chose, per seed.", ""]
    for model, tasks in by_model.items():
        n = max(t["num_layers"] for _, t in tasks) + 1
        flops = [[r["flops_ratio"]["mean"] for r in t["oracle"]] for _, t in tasks if len(t["oracle"]) == n]
        # A sweep with a stride has no run (None) at some boundaries: average the tasks that have one.
        known_flops = [[f[k] for f in flops if f[k] is not None] for k in range(n)]
        mean_flops = [sum(known) / len(known) if known else None for known in known_flops]
        rows = [["FLOPs x full", "", *("-" if f is None else f"{f:.2f}" for f in mean_flops), ""]]
        for name, task in tasks:
            pct = task["higher_is_better"] and "accuracy" in str(task["quality_metric"])
            known = [r["quality"]["mean"] for r in task["oracle"] if r["quality"]["mean"] is not None]
            best = (max if task["higher_is_better"] else min)(known) if known else None
            cells = []
            for r in task["oracle"]:
                text = _fmt(r["quality"], 1, pct=True).replace("%", "") if pct else _fmt(r["quality"], 3)
                cells.append(f"**{text}**" if r["quality"]["mean"] == best else text)
            default = task["variants"].get(default_plan(task["default_cell"]))
            rows.append([name, ",".join(map(str, task["seeds"])), *cells, _boundaries_text(default) if default else "-"])
        parts += [f"### Model `{model}`", "", _md_table(["task", "seeds", *(f"k={k}" for k in range(n)), "default k"],
                                                        rows), ""]
    return parts


def render_markdown(suite: BenchSuite, analysis: dict[str, Any], out_dir: Path) -> str:
    parts = [f"# salf bench: suite `{suite.name}`", "",
             f"{suite.description}".strip(), "",
             f"Generated {now()} on {os.cpu_count()} CPU core(s), torch {torch.__version__}, "
             f"{torch.get_num_threads()} torch thread(s). Records: `{out_dir / 'runs.json'}`; figure: `frontier.png`.",
             "",
             "**How to read this.** Every salf plan and every boundary baseline is scored with the oracle run at "
             "its boundary: the same recipe, seed and data, so that run is exactly what training the plan would "
             "give (identical by construction; nothing is retrained). LoRA, LISA, per-datum, ceiling and equal-compute "
             "rows are runs of their own. Cost is the measured training FLOPs (FlopCounterMode) relative to full fine-tuning "
             "(k=0) of the same seed. Regret = quality of the best oracle boundary whose measured FLOPs are at most the "
             "row's, minus the row's quality (for the loss: the row's loss minus the best oracle loss); positive is "
             "worse, 0 means on the frontier, negative (own runs only) means better than every affordable boundary; "
             "'-' when every boundary costs more. Mean ± std over seeds (std with n-1). Step times are wall-clock on a "
             "shared machine and noisier than FLOPs; memory is the cost model's prediction (measured RSS growth in "
             "runs.json is a lower bound once the allocator keeps freed memory).", "",
             TRADEOFF_TEXT, "", *regret_table_markdown(regret_by_model([analysis]))]
    for name, task in analysis.items():
        if not task:
            continue
        q = task["quality_metric"]
        recipe = task["recipe"]
        parts += [f"## {name}", "",
                  f"Model `{task['model']}`, {task['num_layers']} blocks, {task['data_task']} "
                  f"({task['n_train']} train / {task['n_eval']} eval rows); quality = `{q}` "
                  f"({'higher' if task['higher_is_better'] else 'lower'} is better); seeds {task['seeds']}; "
                  f"{recipe.get('steps')} steps, batch {recipe.get('batch_size')}, lr {recipe.get('lr')}, "
                  f"head lr {recipe.get('head_lr')}, max length {recipe.get('max_length')}.", "",
                  "### Oracle sweep (k = first trained block; k = L trains the head only: the frozen-features floor)", ""]
        rows = [[row["k"], _fmt(row["quality"]), _fmt(row.get("quality_ratio")), _fmt(row["loss"]),
                 f"{row['predicted_flops_ratio']:.3f}",
                 _fmt(row["flops_ratio"]), _fmt(row["step_time_ratio"]), f"{row['predicted_memory_ratio']:.3f}",
                 _fmt(row["train_seconds"], 1), "yes" if row["on_frontier"] else "",
                 *(_fmt(row.get(key), 2) for key in REGRET_KEYS)] for row in task["oracle"]]
        parts += [_md_table(["k", q, f"{q} x full", "eval loss", "predicted step FLOPs x full", "measured FLOPs x full",
                             "measured step time x full", "predicted memory x full", "train s", "on frontier",
                             *LAMBDA_HEADERS], rows), ""]
        parts += _target_lines(task), ""
        if task["plan_regret"]:
            policies = sorted({p for row in task["plan_regret"].values() for p in row})
            rows = [[name, *(" / ".join([_fmt(row[p]["regret"]), _fmt(row[p]["regret_loss"]),
                                         *(_fmt(row[p].get(key), 2) for key in REGRET_KEYS)]) if p in row else "-"
                             for p in policies)] for name, row in sorted(task["plan_regret"].items())]
            lambdas = " / ".join(f"λ={lam:g}" for lam in TRADEOFF_LAMBDAS)
            parts += [f"### Regret of salf plans by lens/estimator and policy (quality / loss / trade-off {lambdas} "
                      "in points; 0 = on the frontier, or the best trade-off)", "",
                      _md_table(["lens/estimator", *policies], rows), ""]
        for title, kinds in (("salf plans", ("plan", "per-datum")), ("Baselines", ("baseline",)),
                             ("Ceiling and equal compute", ("ceiling", "equal-compute"))):
            rows = _variant_rows(task, kinds)
            if rows:
                parts += [f"### {title}", "", _md_table(VARIANT_HEADERS, rows), ""]
            if title == "salf plans" and task.get("per_datum"):
                parts += _per_datum_section(task["per_datum"])
        parts += render_sweeps(task)
        if task["unavailable"]:
            parts += ["### Not available", "", *(f"- `{u['variant']}` seed {u['seed']}: {u['status']}: "
                                                 f"{(u['error'] or '').splitlines()[0]}" for u in task["unavailable"]), ""]
    return "\n".join(parts) + "\n"


def frontier_png(analysis: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [(n, t) for n, t in analysis.items() if t and t.get("seeds")]  # a task with no finished seed has nothing to draw
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(7.5 * max(1, len(tasks)), 5.5), squeeze=False)
    markers = {"knee": "*", "budget=0.5": "s", "coverage=0.9": "D", "unsolved": "h", "unsolved=0.75": "H"}
    for ax, (name, task) in zip(axes[0], tasks):
        default_policy = default_plan(task["default_cell"]).rsplit("/", 1)[1]
        ks = task["oracle"]
        xs = [r["flops_ratio"]["mean"] for r in ks]
        ys = [r["quality"]["mean"] for r in ks]
        err = [r["quality"]["std"] or 0.0 for r in ks]
        good = [i for i in range(len(ks)) if xs[i] is not None and ys[i] is not None]
        ax.errorbar([xs[i] for i in good], [ys[i] for i in good], yerr=[err[i] for i in good], fmt="o", color="0.55",
                    label="oracle boundary k", zorder=2)
        for i in good:
            ax.annotate(f"k={ks[i]['k']}", (xs[i], ys[i]), fontsize=7, xytext=(3, -10), textcoords="offset points")
        front = [i for i in range(len(ks)) if ks[i]["on_frontier"]]
        front.sort(key=lambda i: xs[i])
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="0.3", lw=1.2, label="oracle frontier")
        colors: dict[str, str] = {}
        for j, (variant, v) in enumerate(sorted(task["variants"].items())):
            x, y = v["flops_ratio"]["mean"], v["quality"]["mean"]
            if x is None or y is None:
                continue
            jitter = 0.004 * ((j % 7) - 3)
            if v["kind"] == "plan":
                _, lens, estimator, policy = variant.split("/", 3)
                color = colors.setdefault(f"{lens}/{estimator}", f"C{len(colors) % 10}")
                ax.plot(x + jitter, y, markers.get(policy, "P"), color=color, ms=8, alpha=0.85, zorder=3,
                        label=f"salf {lens}/{estimator}" if policy == default_policy else None)
            elif v["kind"] == "per-datum":
                ax.plot(x, y, "P", color="crimson", ms=9, zorder=5, label=f"salf per datum ({variant.split('/', 1)[1]})")
            elif v["kind"] == "ceiling":
                # a line, not a point: its 3x cost would squash the equal-step region into a corner
                ax.axhline(y, color="0.5", ls="--", lw=1, label=f"ceiling: full fine-tuning, {x:.1f}x the FLOPs")
            elif v["kind"] == "equal-compute":
                ax.plot(x, y, "v", color="tab:purple", ms=7, zorder=4)
                ax.annotate(f"{variant.split('/', 1)[1]}, full FLOPs", (x, y), fontsize=6, xytext=(3, 4),
                            textcoords="offset points", color="tab:purple")
            else:
                ax.plot(x, y, "x" if v["reuses_oracle"] else "^", color="k", ms=7, zorder=4)
                ax.annotate(variant.split("/", 1)[1], (x, y), fontsize=6, xytext=(3, 4), textcoords="offset points")
        ax.set_xlabel("measured training FLOPs / full fine-tuning")
        ax.set_ylabel(task["quality_metric"] + ("" if task["higher_is_better"] else " (lower is better)"))
        ax.set_title(f"{name} ({len(task['seeds'])} seed(s))\nmarkers: * knee, ■ budget=0.5, ◆ coverage=0.9, hexagons unsolved (=0.75), "
                     "+ per datum; x/▲ baselines; ▼ equal compute", fontsize=9)
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@dataclass
class BenchResult:
    """What ``run_bench`` did and found."""

    suite: BenchSuite
    out_dir: Path
    analysis: dict[str, Any]
    trained: int
    """Training runs done by this call (0 when everything was already in runs.json)."""
    skipped: int
    """Units found finished in runs.json and not repeated."""
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)

    def render(self) -> str:
        from salf.table import render_table

        out = []
        for name, task in self.analysis.items():
            if not task:
                continue
            rows = []
            for variant, v in task["variants"].items():
                rows.append([variant, _boundaries_text(v), v["quality"]["mean"], v["flops_ratio"]["mean"],
                             v["regret"]["mean"], v["regret_loss"]["mean"], *(v[key]["mean"] for key in REGRET_KEYS)])
            title = f"{name}: quality = {task['quality_metric']}, cost = measured FLOPs x full, mean over {len(task['seeds'])} seed(s)"
            out.append(render_table(["variant", "k", "quality", "cost", "regret", "regret (loss)",
                                     *(f"regret λ={lam:g}" for lam in TRADEOFF_LAMBDAS)], rows, title))
        out.append(f"\n{self.trained} training run(s) now, {self.skipped} unit(s) reused from runs.json, "
                   f"{duration(self.seconds)}; " + ", ".join(f"{k}: {v}" for k, v in self.paths.items()))
        return "\n\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite.name, "out_dir": str(self.out_dir), "trained": self.trained,
                "skipped": self.skipped, "seconds": self.seconds, "analysis": self.analysis,
                "regret_by_model": regret_by_model([self.analysis]),
                "paths": {k: str(v) for k, v in self.paths.items()}}


def write_reports(suite: BenchSuite, records: Iterable[Record], out_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """results.md, frontier.png and summary.json (``{"regret_by_model": ..., "tasks": analysis}``)."""
    analysis = analyze(records, suite.target_flops)
    summary = {"regret_by_model": regret_by_model([analysis]), "tasks": analysis}
    paths = {"runs": out_dir / "runs.json",
             "results": write_atomic(out_dir / "results.md", render_markdown(suite, analysis, out_dir)),
             "frontier": write_atomic(out_dir / "frontier.png", frontier_png(analysis)),
             "summary": write_json(out_dir / "summary.json", summary),
             "progress": out_dir / "progress.log"}
    return analysis, paths


@dataclass
class RegretTable:
    """``salf bench-table``: the per-model regret table over one or more benchmark output directories."""

    dirs: list[str]
    table: dict[str, dict[str, Any]]
    path: Path | None = None
    """The markdown file written (``--out``), if any."""
    data_kind: str | None = None
    """The row of the defaults the tasks were filtered by (``--data-kind``), if any."""

    def render(self) -> str:
        from salf.table import render_table

        out = []
        for model, entry in self.table.items():
            rows = [[("* " if r["default"] else "") + r["variant"], len(r["tasks"]), r["n"], r["regret_points"]["mean"],
                     *(r[key]["mean"] for key in REGRET_KEYS), r["share_kept"]["mean"], r["flops_ratio"]["mean"],
                     r["memory_ratio"]["mean"]]
                    for r in entry["rows"]]
            kind = f" of {DEFAULT_CELL_WORDS[self.data_kind]}" if self.data_kind else ""
            title = (f"model {model}: {len(entry['tasks'])} task(s){kind}, means over tasks and seeds, regrets in "
                     "points, * = default plan")
            out.append(render_table(["variant", "tasks", "runs", "regret", *(f"regret λ={lam:g}" for lam in TRADEOFF_LAMBDAS),
                                     "share kept", "FLOPs x full", "peak memory x full"], rows, title))
        if self.path is not None:
            out.append(f"written: {self.path}")
        return "\n\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"dirs": self.dirs, "data_kind": self.data_kind, "regret_by_model": self.table,
                "path": None if self.path is None else str(self.path)}


def bench_table(dirs: Sequence[str], out: str | None = None, data_kind: str | None = None) -> RegretTable:
    """``salf bench-table DIR [DIR ...] [--out FILE.md] [--data-kind KIND]``: the per-model regret table over
    benchmark output directories (each with a runs.json), and in the markdown file also each model's oracle
    sweeps; finished seeds only, of the tasks whose row of the defaults is ``data_kind`` if given; nothing is
    trained or rewritten in them."""
    analyses = finished_analyses(dirs)
    if data_kind is not None:
        analyses = [{name: task for name, task in a.items() if task and task["default_cell"] == data_kind}
                    for a in analyses]
    table = regret_by_model(analyses)
    if not table:
        where = ", ".join(dirs) + (f" on {data_kind} data" if data_kind else "")
        raise SalfError(f"no finished plan or baseline in {where}", "run `salf bench --out DIR` first")
    path = None
    if out:
        kind = f" ({DEFAULT_CELL_WORDS[data_kind]} only)" if data_kind else ""
        text = "\n".join([f"# salf bench: regret by model over {', '.join(f'`{d}`' for d in dirs)}{kind}", "",
                           TRADEOFF_TEXT, "", *regret_table_markdown(table), *oracle_table_markdown(analyses)])
        path = write_atomic(Path(out), text + "\n")
    return RegretTable(list(dirs), table, path, data_kind)


__all__ = ["BenchResult", "LAMBDA_HEADERS", "RegretTable", "TRADEOFF_HEADERS", "TRADEOFF_TEXT", "VARIANT_HEADERS", "bench_table", "frontier_png", "oracle_table_markdown", "regret_table_markdown", "render_markdown", "write_reports"]
