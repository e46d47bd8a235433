"""Trade-off regret with each task weighing the same: per task the mean over its finished seeds, then the mean over
tasks (``salf bench-table`` weighs every (task, seed) the same, so a task with three seeds counts three times).

    python scripts/task_means.py bench/results/smollm2            # markdown table, lowest regret at λ = 10 first
    python scripts/task_means.py bench/results/smollm2 --top 5
    python scripts/task_means.py bench/results/smollm2 --all-seeds  # unfinished seeds too (regret: a lower bound)

Only rows planned or run on every task are ranked. A task with no finished seed (a partial oracle sweep) counts its
started seeds against the boundaries trained so far (its regret is then a lower bound), and is marked so.
"""

from __future__ import annotations

import argparse
from statistics import fmean
from typing import Any

from salf.bench.analysis import analyze, default_plan
from salf.bench.store import complete_records, load_records

DEFAULT = "salf default"


def task_analyses(out_dir: str, all_seeds: bool = False) -> dict[str, tuple[dict[str, Any], bool]]:
    """Per task: its analysis over the finished seeds, or over every started seed if none finished or ``all_seeds``
    (flag False: a seed's regret then counts only the boundaries trained so far)."""
    records = load_records(out_dir)
    finished = {} if all_seeds else {
        task: a for task, a in analyze(complete_records(records)).items() if a and a["seeds"]}
    started = analyze(r for r in records if r.task not in finished)
    return {**{task: (a, True) for task, a in finished.items()}, **{task: (a, False) for task, a in started.items() if a}}


def task_means(tasks: dict[str, tuple[dict[str, Any], bool]]) -> list[dict[str, Any]]:
    """One row per variant found on every task: per-task mean regret_2 / regret_10, and their means over tasks."""
    per_variant: dict[str, dict[str, tuple[float, float]]] = {}
    for task, (analysis, _) in tasks.items():
        default = default_plan(analysis["default_cell"])
        for variant, entry in analysis["variants"].items():
            seeds = [s for s in entry["per_seed"] if s["regret_2"] is not None and s["regret_10"] is not None]
            if not seeds:
                continue
            means = (fmean(s["regret_2"] for s in seeds), fmean(s["regret_10"] for s in seeds))
            per_variant.setdefault(variant, {})[task] = means
            if variant == default:  # each task's own row of DEFAULT_CELLS, pooled as one row
                per_variant.setdefault(DEFAULT, {})[task] = means
    rows = [{"variant": v, "per_task": per, "regret_2": fmean(m[0] for m in per.values()),
             "regret_10": fmean(m[1] for m in per.values())}
            for v, per in per_variant.items() if per.keys() == tasks.keys()]
    return sorted(rows, key=lambda r: (r["regret_10"], r["regret_2"], r["variant"]))


def markdown(tasks: dict[str, tuple[dict[str, Any], bool]], rows: list[dict[str, Any]], top: int) -> str:
    names = list(tasks)
    heads = [f"{t} (seeds {','.join(map(str, a['seeds']))}{'' if done else ', partial'})" for t, (a, done) in tasks.items()]
    lines = ["| way of choosing | " + " | ".join(heads) + " | mean λ=2 | mean λ=10 |",
             "|---" * (len(names) + 3) + "|"]
    lowest_2 = min(r["regret_2"] for r in rows) if rows else None
    for r in [r for r in rows if r["variant"] == DEFAULT] + [r for r in rows if r["variant"] != DEFAULT][:top]:
        cells = [f"{r['per_task'][t][0]:.2f} / {r['per_task'][t][1]:.2f}" for t in names]
        r2 = f"{r['regret_2']:.2f}" + (" (lowest)" if r["regret_2"] == lowest_2 else "")
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r2} | {r['regret_10']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a `salf bench` output folder (runs.json)")
    parser.add_argument("--top", type=int, default=10, help="rows to show besides the default (lowest λ = 10 first)")
    parser.add_argument("--all-seeds", action="store_true",
                        help="count every started seed, finished or not (against the boundaries trained so far)")
    a = parser.parse_args()
    tasks = task_analyses(a.out_dir, a.all_seeds)
    print(markdown(tasks, task_means(tasks), a.top))


if __name__ == "__main__":
    main()
