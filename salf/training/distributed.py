"""Training a plan on several processes (``torchrun`` / ``accelerate launch``, DDP): the helpers salf uses.

The Hugging Face ``Trainer`` does the distributed work (process group, ``DistributedDataParallel``,
sharded data loading); salf only has to make sure that (see docs/DISTRIBUTED.md)

- frozen parameters have ``requires_grad=False`` *before* the model is wrapped (``salf.training.trainer.fit``
  applies the plan before building the ``Trainer``), so DDP leaves them out of its gradient buckets and
  never waits for their gradients, and the optimizer never sees them;
- the no-grad prefix hooks (``salf.method.freeze``) run inside the wrapped module's forward, where DDP neither
  looks nor cares: the prefix output simply does not require grad, like any input;
- only the main process writes the run's files, and every rank checks the output directory the same
  way (``is_main_process``, based on the launcher's environment before the process group exists);
- the per-step loss and token count in ``history.json`` are global (``reduce_step``), and a non-finite
  loss stops every rank at the same step (a rank stopping alone would leave the others waiting).

The end-to-end check of a machine's distributed setup is ``salf.training.selfcheck``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return default


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size): from the process group when it exists, else the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return _env_int(_RANK_VARS, 0), _env_int(_WORLD_VARS, 1)


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain single-process run)."""
    return rank_and_world()[0] == 0


def is_distributed() -> bool:
    """True when a process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_step(loss: torch.Tensor, tokens: int, loss_scale: float = 1.0) -> tuple[float, int]:
    """The global step loss and padded-token count: ``mean over ranks of (loss x loss_scale)`` and the
    sum of the tokens. Without a process group it returns the local values.

    ``loss_scale`` undoes a normalisation by the *global* number of target tokens: the ``Trainer`` passes
    ``num_items_in_batch`` counted over all ranks, so each rank's loss is its share of the global mean and
    the ``Trainer`` multiplies it by the world size; pass that world size here too.
    """
    if not is_distributed():
        return float(loss.item()), int(tokens)
    packed = torch.stack(
        [loss.detach().float() * loss_scale, torch.tensor(float(tokens), device=loss.device)]
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    return float(packed[0].item()) / world, int(round(packed[1].item()))
