"""The runs a report is about: what ``salf train`` left in each run directory (``Run``), found in the
folders given, and the savings of each planned run against the full fine-tuning run among them (``Saving``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salf.errors import SalfError
from salf.method.plan import Plan


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
        pred = run.plan.predicted if run.plan is not None else None
        rows.append(Saving(
            run=run.name,
            boundary=run.boundary,
            predicted_step_flops=pred.step_flops_ratio if pred is not None else None,
            measured_flops_per_token=_ratio(m.get("flops_per_padded_token"), f.get("flops_per_padded_token")),
            measured_train_flops=_ratio(m.get("train_flops"), f.get("train_flops")),
            measured_step_time=_ratio(m.get("step_seconds_median"), f.get("step_seconds_median")),
            predicted_trainable_params=pred.trainable_params_ratio if pred is not None else None,
            measured_trainable_params=_ratio(m.get("trainable_params"), f.get("trainable_params")),
            eval_loss_delta=_delta(m.get("eval_loss"), f.get("eval_loss")),
            eval_accuracy_delta=_delta(m.get("eval_accuracy"), f.get("eval_accuracy")),
        ))
    return rows


# HTML
def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["Run", "Saving", "compute_savings", "find_full", "load_runs"]
