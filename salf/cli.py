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
