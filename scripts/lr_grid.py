"""Is `salf train`'s default recipe (and `--lr auto`) as good as the best of a learning-rate grid?

For every task of a benchmark suite, full fine-tuning is trained with `salf train` at the suite's steps:
once per rate of a four-rate grid (body rate; the head keeps the recipe's rate), once with no rate flag
(the recipe of the run's kind) and once with `--lr auto`. Results go to OUT/results.json (resumable: a
finished run is read back, not retrained) and OUT/results.md: per task, accuracy by rate, the default
and --lr auto as shares of the grid's best, and what the search cost.

    python scripts/lr_grid.py --suite minilm-quick --seeds 0,1,2 --out bench_out/lr-grid

Runs in parallel processes need their own --out each (results.json is rewritten per run); gather them with
`--merge DIR [DIR ...] --out OUT`, which trains nothing and writes OUT's merged results.json and results.md.

Issue #11's targets: default >= 95% of the grid's best; --lr auto likewise at <= 15% of the run's cost;
the default's standard deviation over three seeds <= 2 points.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from salf.bench.measured import exact_match
from salf.bench.suite import BenchSuite
from salf.bench.tasks import PreparedTask
from salf.commands import train as train_command
from salf.commands.loading import load
from salf.config import DataConfig, TrainConfig
from salf.config.commands import Inputs, ModelSource, Output, TrainOptions
from salf.fileio import write_atomic, write_json

GRID = (3e-5, 1e-4, 3e-4, 1e-3)


def variants(rates: tuple[float, ...]) -> dict[str, dict]:
    return {**{f"lr={r:g}": {"learning_rate": r} for r in rates}, "default": {}, "auto": {"learning_rate": "auto"}}


def run_one(task, prepared: PreparedTask, seed: int, name: str, flags: dict, out: Path, max_steps: int | None,
            lora: bool) -> dict:
    folder = out / task.name / f"s{seed}" / name.replace("=", "-")
    done = folder / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    options = TrainOptions(
        out=str(folder), eval_data=str(prepared.eval_file), output=Output(progress=False),
        inputs=Inputs(ModelSource(prepared.model_path, str(prepared.train_file), task.head_pooling),
                      DataConfig(label_mode=task.label_mode, max_length=task.max_length, seed=seed)),
        train=TrainConfig(max_steps=max_steps, lora=lora, overwrite=True, save_steps=10_000, **flags))
    result = train_command.run(options)
    metrics = result.metrics
    if prepared.data_task == "completion":  # quality = the benchmark's exact match of the greedy completion
        metrics["eval_accuracy"] = completion_accuracy(task, prepared, folder, lora)
        write_json(done, metrics)
    return metrics


def completion_accuracy(task, prepared: PreparedTask, folder: Path, lora: bool) -> float:
    """Exact match of the trained model's greedy completions on the task's first `em_limit` eval data."""
    trained = prepared.model_path if lora else str(folder / "model")  # LoRA saves the adapters only
    loaded = load(ModelSource(trained, str(prepared.eval_file)),
                  DataConfig(label_mode=task.label_mode, max_length=task.max_length))
    model = loaded.model.model
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder / "model"))
    return exact_match(model, loaded.model.tokenizer, loaded.data.data[: task.em_limit],
                       task.generation_batch)["exact_match"]


def _accuracies(rows: list[dict], name: str) -> list[float]:
    return [r["accuracy"] for r in rows if r["variant"] == name and r["accuracy"] is not None]


def _at_rate(rows: list[dict], rate: float) -> list[float]:
    """The grid's cell for `rate`: its own runs, or the default's where the default trains at that rate."""
    return _accuracies(rows, f"lr={rate:g}") or [
        r["accuracy"] for r in rows
        if r["variant"] == "default" and r["accuracy"] is not None and math.isclose(r["learning_rate"], rate)]


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    std = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{100 * statistics.mean(values):.1f}{std}"


def _share(values: list[float], best: float | None) -> str:
    return f"{statistics.mean(values) / best:.1%}" if values and best else "-"


def summarise(rows: list[dict], rates: tuple[float, ...]) -> str:
    """One row per task: accuracy (mean ± std over seeds, %) per grid rate, default and --lr auto."""
    lines = ["| task | seeds | " + " | ".join(f"lr {r:g}" for r in rates)
             + " | default | default / best | --lr auto | auto / best | auto's rates | search cost |",
             "|---" * (len(rates) + 8) + "|"]
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        seeds = ",".join(str(s) for s in sorted({r["seed"] for r in mine}))
        grid = [_at_rate(mine, r) for r in rates]
        best = max((statistics.mean(v) for v in grid if v), default=None)
        default, auto = _accuracies(mine, "default"), _accuracies(mine, "auto")
        searched = [r for r in mine if r["variant"] == "auto"]
        chosen = ", ".join(f"{r['chosen_lr']:.3g}" for r in searched)
        cost = ", ".join(f"{100 * r['search_share']:.0f}%" for r in searched)
        lines.append(f"| {task} | {seeds} | " + " | ".join(_cell(v) for v in grid)
                     + f" | {_cell(default)} | {_share(default, best)} | {_cell(auto)} | {_share(auto, best)}"
                     + f" | {chosen} | {cost} |")
    return "\n".join(lines)


def runs_table(rows: list[dict]) -> str:
    """One row per run: steps, accuracy and the end-of-run notes (`salf.training.diagnosis`)."""
    lines = ["| task | seed | variant | steps | accuracy % | end-of-run notes |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["seed"], r["variant"])):
        accuracy = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}"
        lines.append(f"| {r['task']} | {r['seed']} | {r['variant']} | {r['steps']} | {accuracy} | "
                     + "; ".join(r.get("diagnosis") or []) + " |")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict], rates: tuple[float, ...]) -> None:
    write_json(out / "results.json", rows)
    write_atomic(out / "results.md", "Accuracy % (mean ± std over the seeds listed; shares of the best grid mean)\n\n"
                 + summarise(rows, rates) + "\n\nEvery run:\n\n" + runs_table(rows) + "\n")


def merge(out: Path, sources: list[Path], rates: tuple[float, ...]) -> None:
    """Gather the rows of several --out folders into OUT (a later folder's row replaces an earlier one)."""
    found: dict[tuple, dict] = {}
    for folder in [out, *sources]:
        path = folder / "results.json"
        for r in json.loads(path.read_text()) if path.is_file() else []:
            found[(r["task"], r["seed"], r["variant"])] = r
    write_results(out, list(found.values()), rates)
    print(f"{len(found)} runs merged into {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="minilm-quick")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in GRID))
    p.add_argument("--out", type=Path, default=Path("bench_out/lr-grid"))
    p.add_argument("--data-dir", type=Path, default=None, help="where the suite's data are built (default: --out)")
    p.add_argument("--variants", default=None, help="only these variants (e.g. default,auto; default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", default="suite",
                   help="'suite' (the task's steps), 'recipe' (no --max-steps: the recipe's epochs decide) or a number; "
                        "use its own --out per length")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (the 'lora' recipe) instead of full fine-tuning")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                   help="train nothing: merge these folders' results.json into --out")
    a = p.parse_args()
    rates = tuple(float(r) for r in a.rates.split(","))
    if a.merge:
        merge(a.out, a.merge, rates)
        return
    torch.set_num_threads(a.threads)
    suite = BenchSuite.load(a.suite)
    wanted = set(a.tasks.split(",")) if a.tasks else None
    seeds = [int(s) for s in a.seeds.split(",")]
    previous = a.out / "results.json"
    rows: list[dict] = json.loads(previous.read_text()) if previous.is_file() else []  # other runs' rows stay
    for task in suite.tasks:
        if wanted and task.name not in wanted:
            continue
        prepared = PreparedTask.prepare(task, a.data_dir or a.out)
        max_steps = task.steps if a.steps == "suite" else None if a.steps == "recipe" else int(a.steps)
        for seed in seeds:
            for name, flags in variants(rates).items():
                if a.variants and name not in a.variants.split(","):
                    continue
                m = run_one(task, prepared, seed, name, flags, a.out, max_steps, a.lora)
                search = m.get("lr_search") or {}
                rows = [r for r in rows if (r["task"], r["seed"], r["variant"]) != (task.name, seed, name)]
                rows.append({"task": task.name, "seed": seed, "variant": name, "accuracy": m.get("eval_accuracy"),
                             "learning_rate": m["config"]["learning_rate"], "train_seconds": m.get("train_seconds"),
                             "steps": m.get("steps"), "data_fingerprint": (m.get("data") or {}).get("fingerprint"),
                             "chosen_lr": search.get("learning_rate"), "search_share": search.get("step_share"),
                             "search_seconds_share": search.get("seconds_share_of_run"),
                             "diagnosis": m.get("diagnosis", [])})
                write_results(a.out, rows, rates)
                print(f"{task.name} seed {seed} {name}: accuracy {m.get('eval_accuracy')}", flush=True)


if __name__ == "__main__":
    main()
