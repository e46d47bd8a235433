"""Each command's options, composed of the stage configs (``DataConfig``, ``TraceConfig``, ``PlanConfig``,
``TrainConfig``) and the few options that only a command has (files to read and write, output format).

``salf.cli`` generates its parser from these classes (``salf.config.parser``) and hands the built instance
to the command's ``run(options)`` in ``salf.commands``.
"""

from __future__ import annotations

from dataclasses import dataclass

from salf.config.data import DataConfig
from salf.config.fields import group, option
from salf.config.plan import DEFAULT_CELLS, LORA_RANK, PlanConfig
from salf.config.trace import TraceConfig
from salf.config.train import TrainConfig

CLASSIFIER_POOLINGS = ("first", "mean")
"""What a BERT-style classifier's head can read (= ``salf.models.pooling.HEAD_POOLINGS``, tested)."""
EXPORT_TOOLS = ("llamafactory", "axolotl", "peft", "torchtune", "deepspeed")
"""The tools ``salf export`` writes for (= ``salf.export.EXPORTERS``, tested)."""


@dataclass
class Output:
    """How every command reports."""

    debug: bool = option(False, help="show full tracebacks on errors")
    json: bool = option(False, help="print the result as JSON instead of a table")
    progress: bool = option(True, flag="--no-progress", help="hide progress bars")


@dataclass
class ModelSource:
    """Which model a command loads, and how its classification head reads the sequence."""

    model: str = option(help="local directory or hub name, loaded with from_pretrained; or a built-in real model: "
                             "builtin:minilm (6 blocks), builtin:e5-small (12 blocks), builtin:smollm2-135m (30 blocks)")
    data: str = option(help="JSONL, CSV or Parquet file: text | prompt+completion | messages | text+label")
    classifier_pooling: str | None = option(
        None, old=("--head-pooling",), choices=CLASSIFIER_POOLINGS,
        help="what a BERT-style classification head reads: first (the [CLS] token, as BertForSequenceClassification "
             "does) or mean (the masked mean of the tokens, through the same pooler weights: for sentence encoders "
             "trained with mean pooling, e.g. builtin:minilm, builtin:e5-small). Default: the checkpoint's own "
             "(mean for a model salf fine-tuned with mean); with --plan, the plan's (another one is refused)")


@dataclass
class Inputs:
    """The model and the data file a command loads, and how the file is read."""

    source: ModelSource = group(ModelSource, "model and data")
    data: DataConfig = group(DataConfig, "data")


@dataclass
class TraceOptions:
    """``salf trace``: one no-grad pass, the deviation of every latent space from the targets."""

    out: str = option(help="where to write trace.json")
    output: Output = group(Output, "output")
    inputs: Inputs = group(Inputs, "inputs")
    trace: TraceConfig = group(TraceConfig, "trace")


@dataclass
class PlanOptions:
    """``salf plan``: trace, estimate each block's gain, choose the layers to fine-tune."""

    out: str = option(help="where to write plan.json (the figure goes beside it)")
    trace_file: str | None = option(None, help="reuse a trace written by `salf trace` instead of tracing again")
    figure: str | None = option(None, help="also write the plan figure (PNG) here (default: beside --out)")
    output: Output = group(Output, "output")
    inputs: Inputs = group(Inputs, "inputs")
    plan: PlanConfig = group(PlanConfig, "plan")


@dataclass
class ComputeBudget:
    """A training run sized to a FLOPs budget instead of a step count."""

    match_compute: str | None = option(None, metavar="RUN", help="train as many steps as fit in that salf run's "
                                                                  "measured training FLOPs (its --out folder)")
    max_flops: float | None = option(None, metavar="N", help="train as many steps as fit in N training FLOPs "
                                                             "(stops before passing them)")


@dataclass
class TrainOptions:
    """``salf train``: fine-tune with a plan (or fully) through the Hugging Face Trainer."""

    out: str = option(help="run directory: checkpoints, model (safetensors), metrics.json")
    plan: str | None = option(None, help="plan.json from `salf plan` (absent: full fine-tuning)")
    eval_data: str | None = option(None, help="evaluation file (default: a held-out split of --data)")
    eval_fraction: float = option(0.1, help="held-out share of --data when --eval-data is absent")
    per_datum: bool = option(False, help="train each batch at its data's own boundary (needs a plan made with "
                                         "--per-datum)")
    output: Output = group(Output, "output")
    inputs: Inputs = group(Inputs, "inputs")
    train: TrainConfig = group(TrainConfig, "training")
    budget: ComputeBudget = group(ComputeBudget, "compute budget")


@dataclass
class DemoOptions:
    """``salf demo``: trace, plan and fine-tune real MiniLM-L6 on Python docstrings -> module, full vs planned."""

    out: str = option("runs/demo", help="demo output directory")
    model: str = option("builtin:minilm", help="the model to fine-tune (e.g. builtin:e5-small, 12 blocks)")
    steps: int = option(150, help="training steps of each fine-tuning")
    policy: str | None = option(None, help="planning policy (default: salf.config.plan.DEFAULT_POLICY for the data)")
    seed: int = option(0, help="seed of the data split, the trace and training")
    overwrite: bool = option(False, help="replace an earlier demo in --out")
    classifier_pooling: str | None = option(None, old=("--head-pooling",), choices=CLASSIFIER_POOLINGS,
                                            help="what the classification head reads (first or mean; default: the "
                                                 "checkpoint's own)")
    output: Output = group(Output, "output")


@dataclass
class ReportOptions:
    """``salf report``: one self-contained HTML page of a run, its plan and the runs it is compared with."""

    run_dir: str = option(positional=True, help="run directory of `salf train` (or a `salf demo` folder holding "
                                                "full/ and planned/)")
    compare: list[str] | None = option(None, nargs="+", metavar="OTHER_RUN",
                                       help="more run directories to compare with, e.g. the full fine-tuning run")
    out: str | None = option(None, help="HTML file to write (default: RUN_DIR/report.html)")
    output: Output = group(Output, "output")


@dataclass
class BenchOptions:
    """``salf bench``: oracle sweep over every boundary, salf's plans and the baselines; regret and savings."""

    suite: str = option("smoke", help="suite name in bench/ (smoke, minilm, causal, smollm2, full) or a suite JSON file")
    out: str | None = option(None, help="output directory (default: bench_out/<suite>); rerunning resumes")
    seeds: str | None = option(None, help="replace every task's seeds, e.g. 0,1,2 or 0-2")
    tasks: str | None = option(None, help="run only these tasks of the suite (comma-separated names); processes "
                                          "running different tasks may share --out")
    threads: int | None = option(None, help="torch CPU threads (default: the suite's)")
    resume: bool = option(True, flag="--no-resume", help="rerun finished runs instead of skipping them")
    report_only: bool = option(False, help="train nothing: rewrite results.md, frontier.png and summary.json from the "
                                           "seeds finished so far")
    replan: bool = option(False, help="train nothing: trace and plan every started seed again with the estimators, "
                                      "policies and boundary baselines its runs.json lacks")
    output: Output = group(Output, "output")


@dataclass
class BenchTableOptions:
    """``salf bench-table``: regret by model over `salf bench` output directories."""

    dirs: list[str] = option(positional=True, nargs="+", metavar="DIR",
                             help="output directories of `salf bench` (each with a runs.json)")
    out: str | None = option(None, help="also write the table as markdown to this file, with every model's oracle "
                                        "sweeps (mean ± std per boundary)")
    data_kind: str | None = option(None, choices=tuple(DEFAULT_CELLS),
                                   help="only the tasks whose data fall in this row of the defaults "
                                        "(salf.config.plan.DEFAULT_CELLS): how the ways of choosing compare on one "
                                        "kind of data, e.g. completions with a closed set of answers")
    output: Output = group(Output, "output")


@dataclass
class CostOptions:
    """``salf cost``: per-boundary step FLOPs, memory and projected step time of a model, from its config alone."""

    config: str = option(help="a config.json file or folder, a hub name (needs network), or builtin:NAME")
    seq: int = option(2048, help="sequence length in tokens")
    batch: int = option(1, help="sequences per step (per device)")
    lora: bool = option(False, help="cost LoRA adapters on the trained blocks instead of full weights")
    lora_rank: int = option(LORA_RANK, help="rank of the LoRA adapters costed")
    boundaries: str = option("all", help="all, or block indices k to show, e.g. 0,8,16,24")
    accelerator: str = option("h100", help="peak table entry for the projected step time (h100, h200, a100, ...)")
    peak_tflops: float | None = option(None, help="peak dense TFLOP/s of another accelerator")
    utilisation: float = option(0.4, help="assumed fraction of peak reached (model FLOPs utilisation)")
    task: str = option("causal-lm", flag="--task", choices=("causal-lm", "classification"),
                       help="the model head to cost: a causal LM's vocabulary projection or a classification head")
    optimizer: str = option("adamw", help="adamw | sgd-momentum | sgd (optimizer state bytes)")
    measure: bool = option(False, help="also time real optimizer steps per boundary on this machine (random weights; "
                                       "CUDA if present)")
    measure_steps: int = option(5, help="timed steps per boundary and repeat (with --measure)")
    measure_repeats: int = option(2, help="sweeps over the boundaries, in alternating order (with --measure)")
    threads: int | None = option(None, help="torch CPU threads while measuring (default: torch's)")
    output: Output = group(Output, "output")


@dataclass
class ExportOptions:
    """``salf export``: the settings that apply a plan in another tool."""

    plan: str = option(positional=True, help="plan.json written by `salf plan`")
    to: str = option(choices=EXPORT_TOOLS, help="the tool to write the settings for")
    out: str | None = option(None, help="write the snippet to this file instead of printing it")
    model: str | None = option(None, help="where to read the planned model's config (default: the plan's model "
                                          "name or folder)")
    output: Output = group(Output, "output")


COMMANDS: dict[str, type] = {
    "trace": TraceOptions, "plan": PlanOptions, "train": TrainOptions, "demo": DemoOptions,
    "report": ReportOptions, "bench": BenchOptions, "bench-table": BenchTableOptions, "cost": CostOptions,
    "export": ExportOptions,
}
"""Subcommand -> its options; the handler is ``salf.commands.<name with _>.run``."""
