"""``salf plan``: trace, estimate each block's gain, and choose the layers to fine-tune."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from salf.api import check_plan_config, plan_from_trace, trace_for
from salf.commands.loading import ModelAndData, load
from salf.config.commands import PlanOptions
from salf.config.plan import DEFAULT_CELL_WORDS, DEFAULT_CELLS
from salf.errors import SalfError
from salf.method.plan import Plan, model_fingerprint
from salf.method.trace import Trace
from salf.models.heads import head_note
from salf.table import render_table


@dataclass
class PlanResult:
    plan: Plan
    out: Path | None = None
    figure: Path | None = None
    trace_seconds: float = 0.0
    plan_seconds: float = 0.0

    def render(self) -> str:
        p = self.plan
        rows = []
        for k in range(p.num_layers + 1):
            rows.append([
                k, p.trace[k], p.gains[k] if k < p.num_layers else None, p.benefit[k], p.cost[k],
                "<- plan" if k == p.boundary else ("trained" if k > p.boundary and k < p.num_layers else ""),
            ])
        table = render_table(["k / block", "deviation", "gain", "benefit(k)", "cost(k)", ""], rows,
                             f"plan: lens {p.lens}, estimator {p.estimator}, policy {p.policy}, fit R² {p.fit.get('r2', float('nan')):.3f}")
        pred = p.predicted
        summary = (
            f"\nboundary k={p.boundary} of {p.num_layers}: freeze embeddings + blocks 0..{p.boundary - 1}, "
            f"train blocks {p.boundary}..{p.num_layers - 1} + head\n"
            f"predicted step FLOPs {pred.step_flops_ratio:.3f} x full (saving {pred.step_flops_saving:.1%}), "
            f"activation memory {pred.activation_memory_ratio:.3f} x, trainable parameters {pred.trainable_params_ratio:.3f} x\n"
            f"profiling: trace {self.trace_seconds:.1f}s, plan {self.plan_seconds:.1f}s"
        )
        if (key := p.data.get("default_cell")) in DEFAULT_CELLS:  # (plans older than the split lack it)
            cell = DEFAULT_CELLS[key]
            summary += (f"\ndefaults for {DEFAULT_CELL_WORDS[key]}: lens {cell.lens}, estimator {cell.estimator}, "
                        f"policy {cell.policy} (salf.config.plan.DEFAULT_CELLS)")
        if p.boundary == 0:
            summary = summary.replace("freeze embeddings + blocks 0..-1, ", "full fine-tuning: ")
        elif p.boundary == p.num_layers:
            summary = summary.replace(f"train blocks {p.boundary}..{p.num_layers - 1} + head",
                                      "train only the head (and the final norm)")
        if p.head is not None:
            summary += "\noutput head: " + head_note(p.head, p.boundary)
        if self.out:
            summary += f"\nwrote {self.out}" + (f" and {self.figure}" if self.figure else "")
        return table + summary

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "paths": {"plan": str(self.out), "figure": str(self.figure)}}


def run(options: PlanOptions) -> PlanResult:
    from salf.report.plan_figure import plot_plan

    config = replace(options.plan, seed=options.inputs.data.seed,
                     trace=replace(options.plan.trace, show_progress=options.output.progress))
    check_plan_config(config)
    loaded = load(options.inputs.source, options.inputs.data)
    t0 = time.perf_counter()
    trace = load_trace_file(options.trace_file, loaded) if options.trace_file else trace_for(loaded.model, loaded.data, config)
    t1 = time.perf_counter()
    plan = plan_from_trace(loaded.model, loaded.data, trace, config)
    t2 = time.perf_counter()
    out_path = plan.save(options.out)
    fig_path = plot_plan(plan, options.figure or Path(options.out).with_suffix(".png"))
    return PlanResult(plan, out_path, fig_path, t1 - t0, t2 - t1)


def load_trace_file(trace_file: str, loaded: ModelAndData) -> Trace:
    """A trace written by ``salf trace``, checked against the data and the model it is reused for."""
    path = Path(trace_file)
    fix = f"write it with `salf trace --model M --data D --out {trace_file}`, or leave --trace-file out"
    if not path.is_file():
        raise SalfError(f"trace file {trace_file} not found", fix)
    try:
        stored = json.loads(path.read_text())
        if stored.get("data", {}).get("fingerprint") not in (None, loaded.data.fingerprint):
            raise SalfError(f"{trace_file} was traced on other data", "trace again, or pass the data it was traced on")
        trace = Trace.from_dict(stored)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise SalfError(f"{trace_file} is not a trace written by `salf trace` ({type(e).__name__}: {e})", fix) from None
    traced_pooling, pooling = stored.get("model", {}).get("head_pooling"), loaded.model.head_pooling
    if traced_pooling is not None and pooling is not None and traced_pooling != pooling:
        raise SalfError(f"{trace_file} was traced with head pooling {traced_pooling!r}, but this model's head reads {pooling!r}",
                        f"pass --classifier-pooling {traced_pooling}, or trace again")
    want = stored.get("model", {}).get("fingerprint")
    if want not in (None, model_fingerprint(loaded.model.model)["fingerprint"]):
        raise SalfError(f"{trace_file} was traced with another model", "trace again, or pass the model it was traced with")
    return trace
