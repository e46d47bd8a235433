"""The run's output directory: refuse to clobber a previous run, find the checkpoint to resume, keep history.

What a run writes there is listed in ``salf.training.trainer``; ``OUTPUTS`` are the names an
``overwrite`` removes (nothing else in the directory is touched).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from salf.errors import SalfError
from salf.training.config import TrainConfig

OUTPUTS = ("checkpoints", "model", "model-merged", "metrics.json", "history.json", "plan.json")


def prepare_out_dir(out: Path, config: TrainConfig, main: bool = True) -> str | None:
    """Refuse to clobber a previous run; returns the checkpoint to resume from (or None).

    Under torchrun only the main process (``main``) checks and cleans: the others would race with it."""
    ckpt_dir = out / "checkpoints"
    if config.resume:
        if isinstance(config.resume, (str, os.PathLike)) and not isinstance(config.resume, bool):
            path = Path(config.resume)
            if not (path / "trainer_state.json").is_file():
                raise SalfError(
                    f"{path} is not a Trainer checkpoint (no trainer_state.json)",
                    "pass a checkpoint-<step> folder",
                )
            return str(path)
        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        if last is None:
            raise SalfError(
                f"nothing to resume: no checkpoint in {ckpt_dir}", "run without --resume (TrainConfig.resume) to start training"
            )
        return last
    if not main:
        return None
    if out.exists() and not out.is_dir():
        raise SalfError(f"the output path {out} is a file", "give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise SalfError(
                f"the output directory {out} is not empty",
                "pass --resume to continue the run there, --overwrite to replace it, or pick another --out "
                "(from Python: TrainConfig resume / overwrite)",
            )
        for name in OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return None


def merge_history(path: Path, resumed_step: int | None, new: list[dict]) -> list[dict]:
    old: list[dict] = []
    if resumed_step is not None and path.is_file():
        try:
            old = [h for h in json.loads(path.read_text()) if h.get("step", 0) <= resumed_step]
        except (ValueError, AttributeError, TypeError):
            old = []
    return old + new


__all__ = ["OUTPUTS", "merge_history", "prepare_out_dir"]
