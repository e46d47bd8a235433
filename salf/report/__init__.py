"""``salf report``: one self-contained HTML page about training runs and the plan behind them.

``write_report(run_dirs, out)`` reads what ``salf train`` left in each run directory
(``metrics.json``, ``history.json``, ``plan.json`` when planned) and writes one HTML file with

- the plan: the transition trace with its fitted depth law, the gain of each block, the cost-benefit
  curve with the chosen boundary (drawn by ``salf.report.plan_figure``), and the plan's numbers;
- the training curves: loss against step and against training FLOPs, one line per run;
- predicted against measured savings: the plan's predicted step-FLOPs ratio next to the measured
  FLOPs-per-token, total training FLOPs and step-time ratios, when a full fine-tuning run
  (boundary 0, no LoRA) is among the runs;
- a table comparing the quality and the cost of every run.

The page has no scripts and loads nothing: CSS is inline and figures are base64 PNGs. A folder that
holds run directories instead of being one (``salf demo``'s ``runs/demo`` with ``full/`` and
``planned/``) stands for the runs inside it.

The runs and their savings are read by ``salf.report.runs``, the page is drawn by ``salf.report.html``
with the figures of ``salf.report.figures``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salf.errors import SalfError
from salf.fileio import write_atomic
from salf.report.html import render_html
from salf.report.runs import Run, Saving, compute_savings, find_full, load_runs

REPORT_NAME = "report.html"


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


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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


def report(run_dir: str, others: list[str] | None = None, out: str | None = None) -> ReportResult:
    """``salf report RUN_DIR [--compare OTHER ...] [--out report.html]``."""
    dirs = [run_dir, *(others or [])]
    runs = load_runs(dirs)
    path, _page = _write(runs, dirs, out)
    full = find_full(runs)
    return ReportResult(path=path, runs=runs, full_run=full.name if full else None,
                        savings=compute_savings(runs, full) if full is not None else [])


__all__ = ["REPORT_NAME", "ReportResult", "report", "write_report"]
