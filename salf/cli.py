"""The ``salf`` command line: parses arguments and dispatches to ``salf.pipeline``.

Every subcommand is one function in ``salf.pipeline`` taking one options dataclass; this module
only turns flags into those dataclasses, prints results, and turns ``SalfError`` into a one-line
message and a non-zero exit code (the traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from salf import __version__
from salf.errors import SalfError

# Subcommand -> the library function that does the work (keyword arguments = the flags' dests).
HANDLERS = {
    "trace": "salf.pipeline:trace",
    "plan": "salf.pipeline:plan",
    "train": "salf.pipeline:train",
    "demo": "salf.demo:demo",
    "report": "salf.report:report",
    "bench": "salf.bench.runner:bench",
    "bench-table": "salf.bench.report:bench_table",
    "cost": "salf.method.projection:cost",
    "export": "salf.export:export",
}

EXAMPLES = {
    "trace": "salf trace --model gpt2 --data train.jsonl --out trace.json",
    "plan": "salf plan --model Qwen/Qwen2-0.5B --data train.jsonl --policy budget=0.5 --out plan.json",
    "train": "salf train --model Qwen/Qwen2-0.5B --data train.jsonl --plan plan.json --out runs/planned --max-steps 500",
    "demo": "salf demo --out runs/demo",
    "cost": "salf cost --config meta-llama/Meta-Llama-3-8B --seq 2048 --batch 1 --boundaries 0,8,16,24",
    "report": "salf report runs/planned",
    "bench": "salf bench --suite smoke --out bench_out/smoke",
    "bench-table": "salf bench-table bench/results/minilm-quick bench/results/causal-quick --out regret.md",
    "export": "salf export plan.json --to axolotl --out unfrozen.yaml",
}


def _model_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="local directory or hub name, loaded with from_pretrained; "
                   "or a built-in real model: builtin:minilm (6 blocks), builtin:e5-small (12 blocks)")
    g.add_argument("--data", required=True, help="JSONL, CSV or Parquet file: text | prompt+completion | text+label")
    g.add_argument("--task", choices=["lm", "completion", "classification"], default=None,
                   help="override the task detected from the data's fields")
    g.add_argument("--label-mode", choices=["head", "words"], default="head",
                   help="classification by a classification head (default) or by label words for a causal LM")
    g.add_argument("--max-length", type=int, default=256, help="truncate longer sequences (counted and reported)")
    g.add_argument("--limit", type=int, default=None, help="use at most this many data from the file")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling, probes and training")


# = salf.method.plan.DEFAULT_POLICY (tested); written out so that --help imports no numpy
POLICY_DEFAULTS_HELP = "default: unsolved=0.75 for classification data, unsolved for completion data"

HEAD_POOLING_HELP = (
    "what a BERT-style classifier's head reads: first (the [CLS] token, as BertForSequenceClassification "
    "does) or mean (the masked mean of the tokens, through the same pooler weights: for sentence encoders "
    "trained with mean pooling, e.g. builtin:minilm, builtin:e5-small). Default: the checkpoint's own (first; "
    "mean for a model salf fine-tuned with mean). Recorded in trace and plan files")


def _head_pooling(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--head-pooling", choices=["first", "mean"], default=None, help=HEAD_POOLING_HELP + extra)


def _trace_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace")
    g.add_argument("--lens", default=None, help="logit-lens | basis-cosine | probe (default: from the model and task)")
    g.add_argument("--sample-size", type=int, default=256, help="data traced (one no-grad forward pass)")
    g.add_argument("--trace-batch-size", type=int, default=8, help="batch size of the tracing pass")
    g.add_argument("--pooling", choices=["auto", "first", "last", "mean"], default="auto",
                   help="pooled vector read by the probe lens (auto: what the classification head reads)")


def _plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan")
    g.add_argument("--policy", default=None,
                   help=f"{POLICY_DEFAULTS_HELP}; or: unsolved=S (train S x the share of the depth the frozen model "
                        "leaves unsolved) | knee | "
                        "budget=C (step cost <= C x full) | coverage=T (>= T of the gain) | full | freeze-first-half | "
                        "train-last-quarter | random")
    g.add_argument("--estimator", default="sufficiency-uniform",  # = salf.method.gain.DEFAULT_ESTIMATOR (tested)
                   help="sufficiency-uniform (default, chosen by the benchmark) | sufficiency | headroom | transition | "
                        "observed | best-layer")
    g.add_argument("--cost-seq", type=int, default=None, help="sequence length for the cost model (default: the data's mean length)")
    g.add_argument("--cost-batch", type=int, default=8, help="batch size for the cost model")
    g.add_argument("--lora", action="store_true", help="cost the plan for LoRA instead of full fine-tuning of the suffix")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank used by the cost model")
    g.add_argument("--trace-file", default=None, help="reuse a trace written by `salf trace` instead of tracing again")
    g.add_argument("--figure", default=None, help="also write the plan figure (PNG) here (default: beside --out)")
    g.add_argument("--per-datum", action="store_true",
                   help="also give each traced datum its own boundary from its own trace (train with --per-datum)")
    g.add_argument("--head", choices=("tied", "untie"), default=None,
                   help="for a model whose output head is tied to its input embeddings: untie it (default: a trainable "
                        "copy; the embeddings stay frozen) or keep it tied (frozen with the embeddings when k > 0)")


def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--eval-data", default=None, help="evaluation file (default: a held-out split of --data)")
    g.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of --data when --eval-data is absent")
    g.add_argument("--plan", default=None, help="plan.json from `salf plan` (absent: full fine-tuning)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--epochs", type=float, default=None,
                   help="epochs when --max-steps is absent (default: the recipe's, 3 for a classifier, else 1)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="per-device training batch size (default: the recipe's, 16 for a classifier, else 8)")
    g.add_argument("--lr", default=None, metavar="LR|auto",
                   help="learning rate of the pretrained weights (default: the recipe of the run's kind, see README); "
                        "'auto' searches it for this plan on a held-out split first, within --lr-search-budget")
    g.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the head (default: the recipe's, 2e-3 for a fresh classification head, else --lr)")
    g.add_argument("--warmup-ratio", type=float, default=None,
                   help="share of the steps spent warming the rate up (default: the recipe's, 0.1 for a classifier)")
    g.add_argument("--lr-search-budget", type=float, default=0.15,
                   help="with --lr auto: the search's cost as a share of this run's steps (default 0.15)")
    g.add_argument("--match-compute", default=None, metavar="RUN",
                   help="train as many steps as fit in that salf run's measured training FLOPs (its --out folder)")
    g.add_argument("--max-flops", type=float, default=None, metavar="N",
                   help="train as many steps as fit in N training FLOPs (stops before passing them)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters on the planned blocks instead of full weights")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--lora-merged", action="store_true",
                   help="with --lora: also save the model with the adapters merged in (--out/model-merged, tokenizer included)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    g.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: at the end)")
    g.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    g.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    g.add_argument("--bf16", action="store_true", help="train in bf16 mixed precision")
    g.add_argument("--prefix-cache", default=None, metavar="DIR",
                   help="compute the frozen prefix's output once into DIR and train the suffix from it (refused if stale)")
    g.add_argument("--per-datum", action="store_true",
                   help="train each batch at its data's own boundary (needs a plan made with --per-datum)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salf",
        description="Semantic-aware layer freezing: decide where to fine-tune, freeze the rest, measure the saving.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"salf {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                              epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("trace", "One no-grad pass: the deviation of every latent space from the targets.")
    _model_data(p)
    _head_pooling(p)
    _trace_options(p)
    p.add_argument("--out", required=True, help="where to write trace.json")

    p = add("plan", "Trace, estimate each block's gain, and choose the layers to fine-tune.")
    _model_data(p)
    _head_pooling(p)
    _trace_options(p)
    _plan_options(p)
    p.add_argument("--out", required=True, help="where to write plan.json (the figure goes beside it)")

    p = add("train", "Fine-tune with a plan (or fully) through the Hugging Face Trainer.")
    _model_data(p)
    _head_pooling(p, ". With --plan: default the plan's pooling; a different one is refused (the plan's "
                     "trace read the plan's pooled vector; make a new plan for another pooling)")
    _train_options(p)
    p.add_argument("--out", required=True, help="run directory: checkpoints, model (safetensors), metrics.json")

    p = add("demo", "Trace, plan and fine-tune real MiniLM-L6 on Python docstrings -> module, full vs planned.")
    p.add_argument("--out", default="runs/demo", help="demo output directory")
    p.add_argument("--model", default="builtin:minilm",
                   help="the model to fine-tune (default builtin:minilm; e.g. builtin:e5-small, 12 blocks)")
    p.add_argument("--steps", type=int, default=150, help="training steps of each fine-tuning")
    p.add_argument("--policy", default=None, help=f"planning policy ({POLICY_DEFAULTS_HELP})")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    _head_pooling(p)

    p = add("report", "One self-contained HTML page: the plan, training curves, predicted vs measured savings, runs compared.")
    p.add_argument("run_dir", help="run directory of `salf train` (or a `salf demo` folder holding full/ and planned/)")
    p.add_argument("--compare", dest="others", nargs="+", action="extend", default=None, metavar="OTHER_RUN",
                   help="more run directories to compare with, e.g. the full fine-tuning run (repeatable)")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")

    p = add("bench", "Oracle sweep over every boundary, salf's policies and the baselines; regret, frontier, savings.")
    p.add_argument("--suite", default="smoke", help="suite name in bench/ (smoke, minilm, causal, full) or a suite JSON file")
    p.add_argument("--out", default=None, help="output directory (default: bench_out/<suite>); rerunning resumes")
    p.add_argument("--seeds", default=None, help="replace every task's seeds, e.g. 0,1,2 or 0-2")
    p.add_argument("--tasks", default=None,
                   help="run only these tasks of the suite (comma-separated names); processes running different "
                        "tasks may share --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the suite's)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="rerun finished runs instead of skipping them")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite results.md, frontier.png and summary.json from the seeds finished so far")
    p.add_argument("--replan", action="store_true",
                   help="train nothing: trace and plan every started seed again with the estimators, policies and "
                        "boundary baselines its runs.json lacks (a new estimator is scored on the finished sweeps)")

    p = add("bench-table", "Regret by model over one or more `salf bench` output directories: every plan and "
                           "baseline, mean over tasks and seeds (plain and trade-off regret, share kept, FLOPs).")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="output directories of `salf bench` (each with a runs.json)")
    p.add_argument("--out", default=None, help="also write the table as markdown to this file, with every model's oracle sweeps (mean ± std per boundary)")

    p = add("cost", "Per-boundary step FLOPs, memory and projected step time of a model, from its config alone.")
    p.add_argument("--config", required=True,
                   help="a config.json file or folder, a hub name (needs network), or builtin:NAME")
    p.add_argument("--seq", type=int, default=2048, help="sequence length in tokens")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (per device)")
    p.add_argument("--lora", action="store_true", help="cost LoRA adapters on the trained blocks instead of full weights")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--boundaries", default="all", help="all, or block indices k to show, e.g. 0,8,16,24")
    p.add_argument("--accelerator", default="h100", help="peak table entry for the projected step time (h100, h200, a100, ...)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s of another accelerator")
    p.add_argument("--utilisation", type=float, default=0.4, help="assumed fraction of peak reached (model FLOPs utilisation)")
    p.add_argument("--task", choices=["causal-lm", "classification"], default="causal-lm", help="model head to cost")
    p.add_argument("--optimizer", default="adamw", help="adamw | sgd-momentum | sgd (optimizer state bytes)")
    p.add_argument("--measure", action="store_true",
                   help="also time real optimizer steps per boundary on this machine (random weights; CUDA if present)")
    p.add_argument("--measure-steps", type=int, default=5, help="timed steps per boundary and repeat (with --measure)")
    p.add_argument("--measure-repeats", type=int, default=2,
                   help="sweeps over the boundaries, in alternating order (with --measure)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while measuring (default: torch's)")

    p = add("export", "Print (or write) the settings that apply a plan in another tool: LLaMA-Factory, axolotl, "
                      "PEFT, torchtune, DeepSpeed.")
    p.add_argument("plan", help="plan.json written by `salf plan`")
    p.add_argument("--to", required=True, choices=["llamafactory", "axolotl", "peft", "torchtune", "deepspeed"],
                   help="the tool (= salf.export.EXPORTERS)")
    p.add_argument("--out", default=None, help="write the snippet to this file instead of printing it")
    p.add_argument("--model", default=None,
                   help="where to read the planned model's config (default: the plan's model name or folder)")
    return parser


def _print_result(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json() if hasattr(result, "to_json") else result, indent=2, default=str))
    elif hasattr(result, "render"):
        print(result.render())
    elif result is not None:
        print(result)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    module, _, function = HANDLERS[args.command].partition(":")
    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "json")}
    try:
        # Imported here so `salf --help` answers without loading torch and transformers.
        handler: Callable[..., Any] = getattr(importlib.import_module(module), function)
        # With --json, stdout carries the JSON alone: what libraries print meanwhile (the Trainer's
        # log dicts) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = handler(**options)
    except SalfError as e:
        if args.debug:
            raise
        print(f"salf {args.command}: error: {e.problem}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"salf {args.command}: interrupted", file=sys.stderr)
        return 130
    _print_result(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
