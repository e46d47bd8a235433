"""The report page: inline CSS, one section per part (plan, curves, savings, comparison), figures as
base64 PNGs, nothing loaded from anywhere.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from salf import __version__
from salf.method.plan import Plan
from salf.models.heads import head_note
from salf.report.figures import curves_figure, plan_figures, savings_figure
from salf.report.runs import Run, Saving, compute_savings, find_full, finite


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def _bytes(value: Any) -> str:
    from salf.table import human_bytes

    return human_bytes(value) if finite(value) else "–"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c if isinstance(c, str) else _fmt(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _signed(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.1f} pts" if pct else f"{value:+.4f}"


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1f3a5f;color:#fff;padding:22px 40px}
header h1{margin:0 0 6px;font-size:26px}
header p{margin:2px 0;color:#d5deea;font-size:14px}
main{max-width:1200px;margin:0 auto;padding:10px 40px 40px}
section{background:#fff;border:1px solid #dde2ea;border-radius:8px;margin:18px 0;padding:16px 22px}
h2{font-size:19px;margin:4px 0 12px;color:#1f3a5f}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:18px 0 0}
.card{flex:1 1 150px;background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:12px 16px}
.card .v{font-size:24px;font-weight:600;color:#1f3a5f}
.card .k{font-size:12px;color:#5b6678;text-transform:uppercase;letter-spacing:.04em}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:14px}
figure{margin:0}
figure img{width:100%;height:auto;border:1px solid #eef0f4}
figcaption{font-size:12px;color:#5b6678;margin-top:4px}
section img{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border-bottom:1px solid #e4e8ee;padding:5px 10px;text-align:right}
td{white-space:nowrap}
th{background:#f0f3f7;color:#33415c}
td:first-child,th:first-child{text-align:left}
table.kv td:first-child{color:#5b6678}
.note{font-size:13px;color:#5b6678}
.warn{font-size:13px;color:#8a4b00;background:#fff5e6;border-left:3px solid #e69500;padding:6px 10px}
.cols{display:flex;gap:30px;flex-wrap:wrap;align-items:flex-start}
footer{font-size:12px;color:#5b6678;max-width:1200px;margin:0 auto;padding:0 40px 30px}
code{background:#f0f3f7;padding:1px 4px;border-radius:3px}
"""


def _plan_section(plan: Plan, used_by: list[str]) -> str:
    figs = "".join(f"<figure>{_img(b64, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>"
                   for cap, b64 in plan_figures(plan))
    L = plan.num_layers
    decision = ("full fine-tuning: every block trained" if plan.boundary == 0 else
                f"freeze the embeddings and blocks 0..{plan.boundary - 1}; train blocks {plan.boundary}..{L - 1} and the head")
    fit = plan.fit
    left = _table(["plan", ""], [
        ["boundary k", f"{plan.boundary} of {L}"],
        ["decision", decision],
        ["output head", head_note(plan.head, plan.boundary)],
        ["policy", plan.policy],
        ["lens", plan.lens],
        ["estimator", plan.estimator],
        ["depth law fit", f"E∞={_fmt(fit.get('e_inf'))}, A={_fmt(fit.get('a'))}, α={_fmt(fit.get('alpha'))}"],
        ["fit R²", fit.get("r2")],
        ["model", plan.model.get("name_or_path") or plan.model.get("model_type")],
        ["model type / parameters", f"{plan.model.get('model_type', '?')} / {_fmt(plan.model.get('num_parameters'))}"],
        ["data", f"{plan.data.get('path', '?')} ({_fmt(plan.data.get('n'))} rows, task {plan.data.get('task', '?')})"],
        ["traced data", plan.data.get("trace_sample")],
        ["truncated rows", plan.data.get("n_truncated")],
    ], "kv")
    pred = plan.predicted
    right = _table(["predicted (× full fine-tuning)", ""], [
        ["step FLOPs", pred.step_flops_ratio],
        ["backward FLOPs", pred.backward_flops_ratio],
        ["activation memory", pred.activation_memory_ratio],
        ["training memory", pred.training_memory_ratio],
        ["trainable parameters", pred.trainable_params_ratio],
        ["step FLOPs (plan / full)", f"{_fmt(pred.step_flops)} / {_fmt(pred.full_step_flops)}"],
    ], "kv")
    runs = ", ".join(used_by)
    return (f"<section><h2>Plan: train blocks {plan.boundary}..{L - 1} of {L}</h2>"
            f"<p class='note'>Used by: {html.escape(runs)}. Created {html.escape(str(plan.created))}.</p>"
            f"<div class='figs'>{figs}</div><div class='cols'>{left}{right}</div></section>")


def _curves_section(runs: Sequence[Run]) -> str:
    b64 = curves_figure(runs)
    if b64 is None:
        return ("<section><h2>Training curves</h2><p class='note'>No run has a loss history "
                "(history.json).</p></section>")
    return (f"<section><h2>Training curves</h2>{_img(b64, 'training loss curves')}"
            "<p class='note'>Loss of every optimizer step as logged by the run (history.json); squares are "
            "evaluation losses. The right panel puts runs on one compute axis: a cheaper plan does more steps "
            "for the same FLOPs.</p></section>")


def _savings_section(savings: list[Saving], full: Run | None, runs: Sequence[Run]) -> str:
    if full is None:
        predicted = [[r.name, r.boundary, r.plan.predicted.step_flops_ratio] for r in runs if r.plan is not None]
        table = _table(["run", "boundary", "predicted step FLOPs (× full)"], predicted) if predicted else ""
        return ("<section><h2>Predicted vs measured savings</h2><p class='warn'>No full fine-tuning run "
                "(boundary 0, no LoRA) is among these runs, so the saving cannot be measured. Train one on the "
                "same data without <code>--plan</code> and add it with <code>--compare</code>.</p>"
                f"{table}</section>")
    if not savings:
        return ("<section><h2>Predicted vs measured savings</h2><p class='note'>Only the full fine-tuning run "
                f"{html.escape(full.name)} is here: nothing to compare it with.</p></section>")
    b64 = savings_figure(savings)
    rows = [[s.run, s.boundary, s.predicted_step_flops, s.measured_flops_per_token, s.measured_train_flops,
             s.measured_step_time, s.predicted_trainable_params, s.measured_trainable_params,
             _signed(s.eval_loss_delta), _signed(s.eval_accuracy_delta, pct=True)] for s in savings]
    table = _table(["run", "k", "predicted step FLOPs", "measured FLOPs / token", "measured training FLOPs",
                    "measured step time", "predicted trainable params", "measured trainable params",
                    "eval loss vs full", "accuracy vs full"], rows)
    fm = full.metrics
    note = (f"Ratios are × the full fine-tuning run <b>{html.escape(full.name)}</b>. Measured FLOPs come from "
            "<code>FlopCounterMode</code> on the first step(s) of each run (matmul and attention FLOPs), scaled by "
            "the padded tokens trained; the prediction is salf's cost model at the plan's batch shape, so they "
            "agree when both runs see the same data. Step time is the median over "
            f"{_fmt(fm.get('step_seconds_count'))} timed steps of the full run (after warm-up); on tiny models "
            "or a busy machine it is dominated by fixed overheads.")
    img = _img(b64, "predicted vs measured cost") if b64 else ""
    return (f"<section><h2>Predicted vs measured savings</h2>{img}{table}"
            f"<p class='note'>{note}</p></section>")


def _comparison_section(runs: Sequence[Run]) -> str:
    columns = [
        ("boundary", lambda r: r.boundary),
        ("LoRA", lambda r: bool(r.metrics.get("lora"))),
        ("policy", lambda r: r.plan.policy if r.plan else ("full" if r.is_full else None)),
        ("steps", lambda r: r.metrics.get("steps")),
        ("train loss", lambda r: r.metrics.get("train_loss")),
        ("eval loss", lambda r: r.metrics.get("eval_loss")),
        ("eval perplexity", lambda r: r.metrics.get("eval_perplexity")),
        ("eval accuracy", lambda r: r.metrics.get("eval_accuracy")),
        ("eval macro-F1", lambda r: r.metrics.get("eval_macro_f1")),
        ("trainable params", lambda r: r.metrics.get("trainable_params")),
        ("trainable share", lambda r: r.metrics.get("trainable_fraction")),
        ("step time (s, median)", lambda r: r.metrics.get("step_seconds_median")),
        ("train time (s)", lambda r: r.metrics.get("train_seconds")),
        ("training FLOPs", lambda r: r.metrics.get("train_flops")),
        ("peak memory (RSS)", lambda r: _bytes(r.metrics.get("peak_rss_bytes"))),
        ("peak GPU memory", lambda r: _bytes(r.metrics["peak_gpu_bytes"]) if "peak_gpu_bytes" in r.metrics else None),
    ]
    kept = [(h, f) for h, f in columns if any(f(r) not in (None, "–") for r in runs)]
    rows = [[r.name, *(f(r) for _, f in kept)] for r in runs]
    return (f"<section><h2>Runs compared</h2>{_table(['run', *(h for h, _ in kept)], rows)}"
            "<p class='note'>Quality is measured on each run's evaluation data (a held-out split of its training "
            "file unless <code>--eval-data</code> was given): compare runs trained on the same data.</p></section>")


def _cards(runs: Sequence[Run], full: Run | None, savings: list[Saving]) -> str:
    planned = next((r for r in runs if r.plan is not None and not r.is_full), None)
    cards: list[tuple[str, str]] = []
    if planned is not None:
        plan = planned.plan
        cards.append(("plan boundary", f"k = {plan.boundary} / {plan.num_layers}"))
        cards.append(("predicted step FLOPs", f"{plan.predicted.step_flops_ratio:.2f}× full"))
        saving = next((s for s in savings if s.run == planned.name), None)
        if saving is not None and saving.measured_flops_per_token is not None:
            cards.append(("measured FLOPs / token", f"{saving.measured_flops_per_token:.2f}× full"))
        if saving is not None and saving.measured_step_time is not None:
            cards.append(("measured step time", f"{saving.measured_step_time:.2f}× full"))
        if saving is not None and saving.eval_accuracy_delta is not None:
            cards.append(("accuracy vs full", _signed(saving.eval_accuracy_delta, pct=True)))
        elif saving is not None and saving.eval_loss_delta is not None:
            cards.append(("eval loss vs full", _signed(saving.eval_loss_delta)))
    if not cards:
        cards.append(("runs", str(len(runs))))
    return "<div class='cards'>" + "".join(
        f"<div class='card'><div class='k'>{html.escape(k)}</div><div class='v'>{html.escape(v)}</div></div>"
        for k, v in cards) + "</div>"


def _short(name_or_path: str) -> str:
    """A hub id as it is; a local folder by its last two path parts (the full path is in the plan table)."""
    parts = Path(name_or_path).parts
    return "/".join(parts[-2:]) if len(parts) > 2 else name_or_path


def render_html(runs: Sequence[Run]) -> str:
    """The whole report page for ``runs`` (no file access beyond what ``runs`` already hold)."""
    full = find_full(runs)
    savings = compute_savings(runs, full) if full is not None else []
    plans: list[tuple[Plan, list[str]]] = []
    for run in runs:
        if run.plan is None:
            continue
        key = json.dumps(run.plan.to_dict(), sort_keys=True, default=str)
        for plan, users in plans:
            if json.dumps(plan.to_dict(), sort_keys=True, default=str) == key:
                users.append(run.name)
                break
        else:
            plans.append((run.plan, [run.name]))
    model = next((_short(p.model.get("name_or_path")) for p, _ in plans if p.model.get("name_or_path")), None)
    subtitle = " · ".join(html.escape(r.label) for r in runs)
    plan_html = "".join(_plan_section(p, users) for p, users in plans) or (
        "<section><h2>Plan</h2><p class='note'>No run here was trained with a plan (no plan.json).</p></section>")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    sources = "".join(f"<li><code>{html.escape(str(r.path))}</code></li>" for r in runs)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>salf report{' – ' + html.escape(model) if model else ''}</title><style>{CSS}</style></head><body>"
        f"<header><h1>salf report{' – ' + html.escape(model) if model else ''}</h1><p>{subtitle}</p>"
        f"<p>Which layers were fine-tuned, what it cost, and what it bought.</p></header><main>"
        f"{_cards(runs, full, savings)}{plan_html}{_curves_section(runs)}{_savings_section(savings, full, runs)}"
        f"{_comparison_section(runs)}</main>"
        f"<footer>Generated by salf {html.escape(__version__)} at {now} from:<ul>{sources}</ul></footer>"
        "</body></html>\n"
    )


__all__ = ["CSS", "render_html"]
