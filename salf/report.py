"""``salf report``: one self-contained HTML page about training runs and the plan behind them.

``write_report(run_dirs, out)`` reads what ``salf train`` left in each run directory
(``metrics.json``, ``history.json``, ``plan.json`` when planned) and writes one HTML file with

- the plan: the transition trace with its fitted depth law, the gain of each block, the cost-benefit
  curve with the chosen boundary (drawn by ``salf.figures``), and the plan's numbers;
- the training curves: loss against step and against training FLOPs, one line per run;
- predicted against measured savings: the plan's predicted step-FLOPs ratio next to the measured
  FLOPs-per-token, total training FLOPs and step-time ratios, when a full fine-tuning run
  (boundary 0, no LoRA) is among the runs;
- a table comparing the quality and the cost of every run.

The page has no scripts and loads nothing: CSS is inline and figures are base64 PNGs. A folder that
holds run directories instead of being one (``salf demo``'s ``runs/demo`` with ``full/`` and
``planned/``) stands for the runs inside it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salf import __version__
from salf.errors import SalfError
from salf.fileio import write_atomic
from salf.method.plan import Plan

REPORT_NAME = "report.html"


@dataclass
class Run:
    """What one training run directory holds."""

    name: str
    """Label in legends and tables (the directory name, made unique)."""
    path: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    plan: Plan | None

    @property
    def boundary(self) -> int | None:
        value = self.metrics.get("boundary")
        return int(value) if isinstance(value, (int, float)) else (self.plan.boundary if self.plan else None)

    @property
    def is_full(self) -> bool:
        """Full fine-tuning: nothing frozen and no adapters."""
        return self.boundary == 0 and not self.metrics.get("lora")

    @property
    def label(self) -> str:
        kind = "full" if self.is_full else (f"k={self.boundary}" if self.boundary is not None else "?")
        return f"{self.name} ({kind}{', LoRA' if self.metrics.get('lora') else ''})"


@dataclass
class Saving:
    """Predicted and measured cost of one run relative to the full fine-tuning run."""

    run: str
    boundary: int | None
    predicted_step_flops: float | None
    measured_flops_per_token: float | None
    measured_train_flops: float | None
    measured_step_time: float | None
    predicted_trainable_params: float | None
    measured_trainable_params: float | None
    eval_loss_delta: float | None
    eval_accuracy_delta: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ReportResult:
    """The written report and the numbers it shows."""

    path: Path
    runs: list[Run]
    full_run: str | None
    savings: list[Saving] = field(default_factory=list)

    def render(self) -> str:
        names = ", ".join(r.label for r in self.runs)
        lines = [f"wrote {self.path}", f"runs: {names}"]
        if self.full_run is None:
            lines.append("no full fine-tuning run among them: measured savings are not shown "
                         "(add one with --compare RUN_WITHOUT_PLAN)")
        for s in self.savings:
            lines.append(f"{s.run}: predicted step FLOPs {_fmt_ratio(s.predicted_step_flops)} x full, "
                         f"measured FLOPs/token {_fmt_ratio(s.measured_flops_per_token)} x, "
                         f"step time {_fmt_ratio(s.measured_step_time)} x")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "report": str(self.path),
            "runs": [{"name": r.name, "path": str(r.path), "boundary": r.boundary, "full": r.is_full,
                      "planned": r.plan is not None} for r in self.runs],
            "full_run": self.full_run,
            "savings": [s.to_json() for s in self.savings],
        }


# ---------------------------------------------------------------------------------------------
# Reading run directories


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SalfError(f"{what} {path} is not valid JSON (line {e.lineno}: {e.msg})",
                        "the run was interrupted while writing it; train the run again") from None
    except OSError as e:
        raise SalfError(f"cannot read {what} {path}: {e.strerror or e}", "check the file's permissions") from None


def _is_run(path: Path) -> bool:
    return (path / "metrics.json").is_file()


def _expand(path: Path) -> list[Path]:
    """A run directory is itself; a folder of runs (a demo) is the runs inside it, by name."""
    if not path.exists():
        raise SalfError(f"run directory {path} does not exist",
                        "pass the --out folder of a finished `salf train` (or a `salf demo` folder)")
    if not path.is_dir():
        raise SalfError(f"{path} is a file, not a run directory", "pass the folder that holds metrics.json")
    if _is_run(path):
        return [path]
    inner = sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))
    if not inner:
        raise SalfError(f"{path} holds no training run (no metrics.json in it or in its subfolders)",
                        "pass the --out folder of a finished `salf train`; a run that stopped early has no metrics.json")
    return inner


def _load_run(path: Path, name: str, outer_plan: Path | None) -> Run:
    metrics = _read_json(path / "metrics.json", "metrics file")
    if not isinstance(metrics, dict):
        raise SalfError(f"metrics file {path / 'metrics.json'} does not hold a JSON object", "train the run again")
    history: list[dict[str, Any]] = []
    if (path / "history.json").is_file():
        raw = _read_json(path / "history.json", "loss history")
        if not isinstance(raw, list) or not all(isinstance(h, dict) and "step" in h for h in raw):
            raise SalfError(f"loss history {path / 'history.json'} is not a list of {{step, loss, ...}} objects",
                            "train the run again")
        history = raw
    plan_path = path / "plan.json"
    if not plan_path.is_file() and outer_plan is not None and metrics.get("boundary") not in (0, None):
        plan_path = outer_plan  # a demo keeps the plan beside its runs
    plan = Plan.load(plan_path) if plan_path.is_file() else None
    return Run(name=name, path=path, metrics=metrics, history=history, plan=plan)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    plain = [p.name or str(p) for p in paths]
    names = ["/".join(p.resolve().parts[-2:]) if plain.count(n) > 1 else n for p, n in zip(paths, plain)]
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return unique


def load_runs(run_dirs: Sequence[str | Path] | str | Path) -> list[Run]:
    """Every run the given directories stand for, in order, each once."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise SalfError("no run directory given", "pass at least one --out folder of `salf train`")
    paths: list[Path] = []
    outer: dict[Path, Path | None] = {}
    for given in run_dirs:
        given = Path(given)
        for p in _expand(given):
            if p.resolve() not in {q.resolve() for q in paths}:
                paths.append(p)
                outer[p] = given / "plan.json" if p != given and (given / "plan.json").is_file() else None
    return [_load_run(p, n, outer[p]) for p, n in zip(paths, _unique_names(paths))]


def find_full(runs: Sequence[Run]) -> Run | None:
    """The full fine-tuning run to measure savings against (an unplanned one first)."""
    full = [r for r in runs if r.is_full]
    full.sort(key=lambda r: r.plan is not None)
    return full[0] if full else None


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b or not math.isfinite(a / b):
        return None
    return float(a) / float(b)


def _delta(a: Any, b: Any) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    return float(a) - float(b)


def compute_savings(runs: Sequence[Run], full: Run | None) -> list[Saving]:
    """One row per run other than ``full``: predicted vs measured cost ratios and quality deltas."""
    rows = []
    for run in runs:
        if run is full:
            continue
        m = run.metrics
        f = full.metrics if full is not None else {}
        pred = run.plan.predicted if run.plan is not None else {}
        rows.append(Saving(
            run=run.name,
            boundary=run.boundary,
            predicted_step_flops=pred.get("step_flops_ratio"),
            measured_flops_per_token=_ratio(m.get("flops_per_padded_token"), f.get("flops_per_padded_token")),
            measured_train_flops=_ratio(m.get("train_flops"), f.get("train_flops")),
            measured_step_time=_ratio(m.get("step_seconds_median"), f.get("step_seconds_median")),
            predicted_trainable_params=pred.get("trainable_params_ratio"),
            measured_trainable_params=_ratio(m.get("trainable_params"), f.get("trainable_params")),
            eval_loss_delta=_delta(m.get("eval_loss"), f.get("eval_loss")),
            eval_accuracy_delta=_delta(m.get("eval_accuracy"), f.get("eval_accuracy")),
        ))
    return rows


# ---------------------------------------------------------------------------------------------
# Figures


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plan_figures(plan: Plan) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of the trace with its fit, the gains and the cost-benefit curve."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from salf.figures import _draw_gains, _draw_trace, _draw_tradeoff

    out = []
    for caption, draw in (
        ("Deviation of each latent space from the targets, with the fitted depth law "
         "D(l) = E∞ + A·(l+1)^-α; the dotted line is the boundary.", _draw_trace),
        ("Estimated gain of each block; green blocks are trained, grey ones frozen.", _draw_gains),
        ("Share of the gain trained against step cost for every boundary k; the star is the plan.", _draw_tradeoff),
    ):
        fig, ax = plt.subplots(figsize=(4.8, 3.4))
        draw(ax, plan)
        if draw is _draw_gains:  # blocks are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # The figures are shown a third of the page wide: labels must stay readable there.
        legend = ax.get_legend()
        for text in [*ax.texts, *(legend.get_texts() if legend else [])]:
            text.set_fontsize(8)
        fig.tight_layout()
        out.append((caption, _png(fig)))
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    out, total, kept = [], 0.0, []
    for v in values:
        kept.append(v)
        total += v
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def curves_figure(runs: Sequence[Run]) -> str | None:
    """Training loss against step (and against cumulative training FLOPs where measured), one line per run."""
    fig = draw_curves(runs)
    return _png(fig) if fig is not None else None


def draw_curves(runs: Sequence[Run]):
    """The matplotlib figure behind ``curves_figure`` (None when no run has a loss history)."""
    import matplotlib.pyplot as plt

    with_history = [r for r in runs if any(_finite(h.get("loss")) for h in r.history)]
    if not with_history:
        return None
    by_flops = all(_finite(r.metrics.get("flops_per_padded_token")) for r in with_history)
    fig, axes = plt.subplots(1, 2 if by_flops else 1, figsize=(11 if by_flops else 6.5, 3.8), squeeze=False)
    for i, run in enumerate(with_history):
        points = [(h["step"], float(h["loss"]), int(h.get("tokens", 0) or 0)) for h in run.history if _finite(h.get("loss"))]
        steps = [p[0] for p in points]
        losses = [p[1] for p in points]
        color = f"C{i % 10}"
        per_token = run.metrics.get("flops_per_padded_token")
        xs = [(steps, axes[0][0])]
        if by_flops:
            cumulative, total = [], 0
            for p in points:
                total += p[2]
                cumulative.append(total * float(per_token))
            xs.append((cumulative, axes[0][1]))
        window = max(1, len(losses) // 25)
        for x, ax in xs:
            if window > 1:
                ax.plot(x, losses, color=color, alpha=0.25, lw=0.8)
                ax.plot(x, _smooth(losses, window), color=color, lw=1.8, label=f"{run.label} (mean of {window})")
            else:
                ax.plot(x, losses, "o-", color=color, ms=3, lw=1.5, label=run.label)
        evals = [(h.get("step"), h.get("eval_loss")) for h in run.metrics.get("eval_history") or []]
        evals = [(s, v) for s, v in evals if _finite(s) and _finite(v)]
        if evals:
            axes[0][0].plot(*zip(*evals), "s", color=color, ms=7, mfc="white", mew=1.5, label=f"{run.name} eval loss")
    axes[0][0].set_xlabel("optimizer step")
    axes[0][0].set_title("Training loss by step")
    if by_flops:
        axes[0][1].set_xlabel("training FLOPs (measured per token × tokens)")
        axes[0][1].set_title("Training loss by compute")
    for ax in axes[0]:
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def savings_figure(savings: Sequence[Saving]) -> str | None:
    """Grouped bars: predicted step FLOPs vs measured FLOPs/token, training FLOPs and step time, × full."""
    import matplotlib.pyplot as plt
    import numpy as np

    series = [
        ("predicted step FLOPs", "predicted_step_flops", "C0"),
        ("measured FLOPs per token", "measured_flops_per_token", "C2"),
        ("measured training FLOPs", "measured_train_flops", "C4"),
        ("measured step time", "measured_step_time", "C1"),
    ]
    series = [s for s in series if any(getattr(row, s[1]) is not None for row in savings)]
    if not savings or not series:
        return None
    fig, ax = plt.subplots(figsize=(max(7.0, 3.0 + 2.2 * len(savings)), 3.6))
    width = 0.8 / len(series)
    x = np.arange(len(savings))
    for j, (label, attr, color) in enumerate(series):
        values = [getattr(row, attr) for row in savings]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, heights, width, label=label, color=color)
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="0.3", lw=1, ls="--", label="full fine-tuning")
    ax.set_xticks(x, [f"{row.run} (k={row.boundary})" for row in savings], fontsize=8)
    ax.set_ylabel("cost × full fine-tuning")
    ax.set_title("Predicted vs measured cost")
    ax.set_ylim(0, max(1.0, *(getattr(r, a) or 0 for r in savings for _, a, _ in series)) * 1.45)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# HTML


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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

    return human_bytes(value) if _finite(value) else "–"


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
        ["step FLOPs", pred.get("step_flops_ratio")],
        ["backward FLOPs", pred.get("backward_flops_ratio")],
        ["activation memory", pred.get("activation_memory_ratio")],
        ["training memory", pred.get("training_memory_ratio")],
        ["trainable parameters", pred.get("trainable_params_ratio")],
        ["step FLOPs (plan / full)", f"{_fmt(pred.get('step_flops'))} / {_fmt(pred.get('full_step_flops'))}"],
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
        predicted = [[r.name, r.boundary, r.plan.predicted.get("step_flops_ratio")] for r in runs if r.plan is not None]
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
        cards.append(("predicted step FLOPs", f"{plan.predicted.get('step_flops_ratio', float('nan')):.2f}× full"))
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


def write_report(run_dirs: Sequence[str | Path] | str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of ``run_dirs`` to ``out`` (default: ``report.html`` in the first one)."""
    return _write(load_runs(run_dirs), run_dirs, out)[0]


def _write(runs: list[Run], run_dirs: Sequence[str | Path] | str | Path, out: str | Path | None) -> tuple[Path, str]:
    first = Path(run_dirs if isinstance(run_dirs, (str, Path)) else run_dirs[0])
    path = Path(out) if out is not None else first / REPORT_NAME
    if path.is_dir():
        raise SalfError(f"the report path {path} is a directory", f"give a file name, e.g. {path / REPORT_NAME}")
    page = render_html(runs)
    return write_atomic(path, page), page


def report(run_dir: str, others: list[str] | None = None, out: str | None = None, **_: Any) -> ReportResult:
    """``salf report RUN_DIR [--compare OTHER ...] [--out report.html]``."""
    dirs = [run_dir, *(others or [])]
    runs = load_runs(dirs)
    path, _page = _write(runs, dirs, out)
    full = find_full(runs)
    return ReportResult(path=path, runs=runs, full_run=full.name if full else None,
                        savings=compute_savings(runs, full) if full is not None else [])
