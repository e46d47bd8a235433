"""scripts/task_means.py: every task weighs the same, whatever its number of seeds."""

import importlib.util
import json
from pathlib import Path

import pytest

from salf.bench.analysis import default_plan

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("task_means", ROOT / "scripts" / "task_means.py")
task_means = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_means)


def _analysis(cell: str, variants: dict[str, list[tuple[float, float]]]) -> dict:
    return {"default_cell": cell, "seeds": [0], "variants": {
        v: {"per_seed": [{"seed": i, "regret_2": r2, "regret_10": r10} for i, (r2, r10) in enumerate(seeds)]}
        for v, seeds in variants.items()}}


def test_each_task_weighs_the_same_and_rows_need_every_task():
    lm_default, closed_default = default_plan("lm"), default_plan("completion-closed")
    assert lm_default != closed_default
    tasks = {
        "three-seeds": (_analysis("lm", {"baseline/full": [(1.0, 2.0), (1.0, 2.0), (4.0, 8.0)],
                                         lm_default: [(0.0, 0.0)] * 3, "only-here": [(0.0, 0.0)]}), True),
        "one-seed": (_analysis("completion-closed", {"baseline/full": [(8.0, 4.0)], closed_default: [(1.0, 1.0)],
                                                     lm_default: [(9.0, 9.0)]}), True),
    }
    rows = {r["variant"]: r for r in task_means.task_means(tasks)}
    # per task first: (2 + 8) / 2, not (1 + 1 + 4 + 8) / 4
    assert rows["baseline/full"]["regret_2"] == pytest.approx(5.0)
    assert rows["baseline/full"]["regret_10"] == pytest.approx((4.0 + 4.0) / 2)
    assert "only-here" not in rows  # not planned on every task: not ranked
    # the default pools each task's own row of DEFAULT_CELLS
    assert rows[task_means.DEFAULT]["per_task"] == {"three-seeds": (0.0, 0.0), "one-seed": (1.0, 1.0)}
    table = task_means.markdown(tasks, task_means.task_means(tasks), top=5)
    assert table.splitlines()[2].startswith(f"| {task_means.DEFAULT} |")


def test_committed_smollm2_records_rank_the_default():
    tasks = task_means.task_analyses(str(ROOT / "bench" / "results" / "smollm2"))
    assert "smollm2-name-section-words" in tasks and tasks["smollm2-name-section-words"][1]  # 3 finished seeds
    rows = task_means.task_means(tasks)
    assert any(r["variant"] == task_means.DEFAULT for r in rows)
    assert [r["regret_10"] for r in rows] == sorted(r["regret_10"] for r in rows)


def test_all_seeds_counts_the_unfinished_seeds(tmp_path):
    # the committed records with one oracle boundary of a finished seed taken out: that seed is then unfinished
    records = json.loads((ROOT / "bench" / "results" / "smollm2" / "runs.json").read_text())
    task, seed = "smollm2-name-section-words", 2
    dropped = f"{task}|seed={seed}|oracle/k=3"
    assert any(r["key"] == dropped for r in records["runs"])
    records["runs"] = [r for r in records["runs"] if r["key"] != dropped]
    (tmp_path / "runs.json").write_text(json.dumps(records))
    finished, started = task_means.task_analyses(str(tmp_path)), task_means.task_analyses(str(tmp_path), all_seeds=True)
    assert finished.keys() == started.keys()
    for name, (analysis, _) in finished.items():
        assert set(analysis["seeds"]) <= set(started[name][0]["seeds"])
    assert seed not in finished[task][0]["seeds"] and seed in started[task][0]["seeds"]
