"""Distributed self-check: the same tiny plan trained on 1 and on N processes must give one loss curve.

``python -m salf.training.selfcheck selfcheck --out DIR`` trains a tiny model with a plan and writes its loss
curve; run it under ``torchrun --nproc_per_node 2`` and once without, and compare (``compare``), to check a
machine's distributed setup end to end. ``run_forked`` starts the same check in forked processes on the
CPU with the gloo backend (used by the tests: no interpreter start-up, no torchrun).

This is the one module of support code for checks and tests (it trains ``salf.models.tiny`` models);
nothing in the library imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from salf.errors import SalfError
from salf.fileio import write_json
from salf.method.freeze import FreezeSpec
from salf.models.arch import find_parts
from salf.models.tiny import tiny_model
from salf.training.config import TrainConfig
from salf.training.distributed import rank_and_world
from salf.training.inputs import RunExtras
from salf.training.run import train

# -- the self-check: a tiny plan trained on 1 or N processes ------------------------------------------


@dataclass(frozen=True)
class SelfCheck:
    """A tiny, deterministic training run whose loss curve must not depend on the number of processes."""

    global_batch: int = 4
    """Data per optimizer step over all processes (each of W processes gets global_batch / W)."""
    steps: int = 4
    """Optimizer steps."""
    boundary: int = 2
    """Plan: blocks 0..boundary-1 and the embeddings frozen (no-grad prefix)."""
    model_type: str = "gpt2"
    """A ``salf.models.tiny`` architecture."""
    seq_len: int = 12
    """Tokens per datum (all equal, so every rank averages over the same number of targets)."""
    learning_rate: float = 1e-2
    seed: int = 0
    find_unused_parameters: bool | None = False
    """DDP's flag (None: the Trainer's default). False proves that frozen parameters are never waited for."""
    prefix_cache: bool = False
    """Train from a frozen-prefix cache in ``out_dir/cache`` (every rank builds or reuses the same one)."""
    per_datum: bool = False
    """Per-datum boundaries: data alternate between ``boundary`` and ``boundary + 1`` (needs
    ``find_unused_parameters=True``: ranks may train different depths in one step)."""

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.steps < 1 or self.seq_len < 2:
            raise SalfError(
                f"global_batch, steps and seq_len must be positive (seq_len >= 2), got "
                f"{self.global_batch}, {self.steps}, {self.seq_len}"
            )
        if self.boundary < 0:
            raise SalfError(f"boundary must be >= 0, got {self.boundary}")
        if self.prefix_cache and self.per_datum:
            raise SalfError("the self-check runs a prefix cache or per-datum boundaries, not both")
        if self.per_datum and self.find_unused_parameters is False:
            raise SalfError(
                "per-datum boundaries under DDP need find_unused_parameters=True",
                "ranks may train from different boundaries in one step; set find_unused_parameters=True",
            )


def selfcheck_data(check: SelfCheck) -> list[dict]:
    """``global_batch x steps`` language-modelling data of ``seq_len`` tokens, fixed by ``seed``."""
    g = torch.Generator().manual_seed(check.seed)
    n = check.global_batch * check.steps
    return [
        {"input_ids": ids, "labels": ids}
        for ids in (torch.randint(3, 120, (check.seq_len,), generator=g).tolist() for _ in range(n))
    ]


def selfcheck(out_dir: str | os.PathLike, check: SelfCheck = SelfCheck()) -> dict[str, Any]:
    """Train the self-check on however many processes this one belongs to; returns (and on the main
    process writes to ``out_dir/selfcheck.json``) the global loss of every step and the world size.

    Every rank also writes ``out_dir/weights-rank<r>.json``: a hash of its trained weights, which DDP
    must keep identical on all ranks."""
    rank, world = rank_and_world()
    if check.global_batch % world:
        raise SalfError(
            f"global_batch {check.global_batch} does not split over {world} processes",
            f"use a multiple of {world}",
        )
    model = tiny_model(check.model_type, seed=check.seed)
    num_layers = find_parts(model).num_layers
    data = selfcheck_data(check)
    boundaries = [check.boundary + i % 2 for i in range(len(data))] if check.per_datum else None
    config = TrainConfig(
        max_steps=check.steps,
        batch_size=check.global_batch // world,
        learning_rate=check.learning_rate,
        save_steps=None,
        logging_steps=1,
        seed=check.seed,
        flop_sample_steps=0,
        timing_warmup_steps=0,
        overwrite=True,
        ddp_find_unused_parameters=check.find_unused_parameters,
        prefix_cache=str(Path(out_dir) / "cache") if check.prefix_cache else None,
    )
    spec = None if check.per_datum else FreezeSpec.from_boundary(check.boundary, num_layers)
    metrics = train(model, 0, data, spec, config, Path(out_dir) / "run", RunExtras(boundaries=boundaries))
    weights = hashlib.sha256()
    for name, param in model.named_parameters():
        weights.update(name.encode())
        weights.update(param.detach().cpu().numpy().tobytes())
    write_json(
        Path(out_dir) / f"weights-rank{rank}.json",
        {
            "rank": rank,
            "sha256": weights.hexdigest(),
            "forwards_per_boundary": metrics.get("per_datum", {}).get("forwards_per_boundary"),
        },
    )
    history = json.loads((Path(out_dir) / "run" / "history.json").read_text()) if rank == 0 else []
    result = {
        "world_size": world,
        "rank": rank,
        "losses": [h["loss"] for h in history],
        "tokens": [h["tokens"] for h in history],
        "train_loss": metrics.get("train_loss"),
        "trainable_params": metrics.get("trainable_params"),
    }
    if rank == 0:
        write_json(Path(out_dir) / "selfcheck.json", result)
    return result


def compare(single: Sequence[float], multi: Sequence[float], rtol: float = 1e-4) -> float:
    """Largest relative difference between two loss curves; ``SalfError`` when above ``rtol``."""
    if len(single) != len(multi) or not single:
        raise SalfError(
            f"the loss curves have {len(single)} and {len(multi)} steps", "run the same number of steps"
        )
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(single, multi))
    if worst > rtol:
        raise SalfError(
            f"the distributed loss curve differs from the single-process one by {worst:.2e} (relative), above {rtol:g}",
            "check the launcher (same global batch, same seed) and that every rank runs the same plan",
        )
    return worst


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forked_worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    try:  # a forked child inherits the parent's single-process accelerate state: start from scratch
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    except ImportError:
        pass
    try:
        fn(*args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_forked(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> None:
    """Run ``fn(*args)`` in ``world_size`` forked CPU processes set up like ``torchrun`` (gloo backend).

    Forking skips the interpreter and import start-up of each worker, which dominates a tiny check on a
    small machine. Only for CPU work: a process that has touched CUDA cannot fork usable children.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise SalfError(f"world_size must be >= 1, got {world_size}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise SalfError("run_forked cannot fork a process that uses CUDA", "launch with torchrun instead")
    ctx = mp.start_processes(
        _forked_worker,
        args=(world_size, _free_port(), fn, args),
        nprocs=world_size,
        join=False,
        start_method="fork",
    )
    while not ctx.join(timeout=timeout):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m salf.training.selfcheck",
        description="Distributed self-check: train a tiny plan on this launcher's processes, write the loss curve.",
        epilog="example: torchrun --nproc_per_node 2 -m salf.training.selfcheck selfcheck --out /tmp/dist && "
        "python -m salf.training.selfcheck selfcheck --out /tmp/single && "
        "python -m salf.training.selfcheck compare /tmp/single /tmp/dist",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="train the tiny plan; rank 0 writes OUT/selfcheck.json")
    p.add_argument("--out", required=True)
    p.add_argument("--global-batch", type=int, default=SelfCheck.global_batch)
    p.add_argument("--steps", type=int, default=SelfCheck.steps)
    p.add_argument("--boundary", type=int, default=SelfCheck.boundary)
    p.add_argument("--prefix-cache", action="store_true", help="train from a frozen-prefix cache")
    p.add_argument(
        "--per-datum", action="store_true", help="per-datum boundaries (find_unused_parameters on)"
    )
    c = sub.add_parser("compare", help="compare two selfcheck outputs (single process, distributed)")
    c.add_argument("single")
    c.add_argument("multi")
    c.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    try:
        if args.command == "selfcheck":
            torch.set_num_threads(1)
            check = SelfCheck(
                global_batch=args.global_batch,
                steps=args.steps,
                boundary=args.boundary,
                prefix_cache=args.prefix_cache,
                per_datum=args.per_datum,
                find_unused_parameters=True if args.per_datum else False,
            )
            result = selfcheck(args.out, check)
            if result["rank"] == 0:
                print(json.dumps({k: result[k] for k in ("world_size", "losses")}))
        else:
            runs = [json.loads((Path(d) / "selfcheck.json").read_text()) for d in (args.single, args.multi)]
            worst = compare(runs[0]["losses"], runs[1]["losses"], args.rtol)
            print(
                f"loss curves agree: worst relative difference {worst:.2e} "
                f"({runs[0]['world_size']} vs {runs[1]['world_size']} processes)"
            )
    except SalfError as e:
        print(f"salf.training.selfcheck: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
