"""The ``salf`` command line: generated from the options dataclasses, dispatched to ``salf.commands``.

Every subcommand is ``salf.commands.<name>.run(options)`` taking its one options dataclass
(``salf.config.commands``); the parser is generated from those dataclasses' fields
(``salf.config.parser``), so a flag's name, default, choices and help live in one place. This module
only parses, prints results, and turns ``SalfError`` into a one-line message and a non-zero exit code
(the traceback only with ``--debug``).
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
from salf.config.commands import COMMANDS
from salf.config.parser import add_options, build
from salf.errors import SalfError

HANDLERS = {name: f"salf.commands.{name.replace('-', '_')}:run" for name in COMMANDS}
"""Subcommand -> the function that runs it, imported only when the command runs (``--help`` loads no torch)."""

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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, options_class in COMMANDS.items():
        summary = (options_class.__doc__ or "").split(": ", 1)[-1].strip()
        summary = summary[:1].upper() + summary[1:]
        p = sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(p, options_class)
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
    logging.basicConfig(level=logging.DEBUG if args.output__debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    module, _, function = HANDLERS[args.command].partition(":")
    as_json = args.output__json
    try:
        options = build(COMMANDS[args.command], args)
        # Imported here so `salf --help` answers without loading torch and transformers.
        handler: Callable[..., Any] = getattr(importlib.import_module(module), function)
        # With --json, stdout carries the JSON alone: what libraries print meanwhile (the Trainer's
        # log dicts) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            result = handler(options)
    except SalfError as e:
        if args.output__debug:
            raise
        print(f"salf {args.command}: error: {e.problem}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"salf {args.command}: interrupted", file=sys.stderr)
        return 130
    _print_result(result, as_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
