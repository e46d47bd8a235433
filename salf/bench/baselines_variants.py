"""The baselines that train in a way of their own (``BASELINES``, registered when the package ``salf.bench``
is imported): each answers with a ``TrainVariant``, a run of its own, instead of a boundary.

- ``lora``: LoRA adapters on every block (PEFT's default modules), embeddings frozen, head trained;
- ``lisa``: LISA-style layerwise importance sampling: embeddings and head always trained, plus
  ``lisa_layers`` blocks drawn at random every ``lisa_interval`` steps. Every parameter is in the
  optimizer; the blocks not drawn get ``requires_grad=False`` and ``grad=None``, so AdamW skips them
  (no update, no weight decay) and autograd computes no weight gradient for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from salf.bench.baselines import BaselineChoice, BaselineContext, TrainVariant, register
from salf.method.freeze import FreezeSpec
from salf.models.arch import find_parts


@register("lora", trains=True)
def lora(ctx: BaselineContext) -> BaselineChoice:
    """LoRA adapters on every block; embeddings frozen; the head trained."""
    s = ctx.settings
    spec = FreezeSpec(trainable_blocks=tuple(range(ctx.num_layers)), embeddings=False)
    lr = ctx.learning_rate * s.lora_lr_factor
    return BaselineChoice(variant=TrainVariant(spec=spec, lora=True, lora_rank=s.lora_rank, learning_rate=lr),
                          details={"lora_rank": s.lora_rank, "learning_rate": lr})


class LisaCallback(TrainerCallback):
    """LISA: train ``n_active`` random blocks at a time (plus embeddings and head), redrawn every
    ``interval`` steps. The other blocks get ``requires_grad=False`` and ``grad=None``."""

    def __init__(self, n_active: int, interval: int, seed: int):
        self.n_active = n_active
        self.interval = interval
        self.rng = np.random.default_rng(seed)
        self.draws: list[dict[str, Any]] = []
        self._blocks: torch.nn.ModuleList | None = None

    def _draw(self, step: int) -> None:
        assert self._blocks is not None
        n = len(self._blocks)
        active = sorted(int(j) for j in self.rng.choice(n, size=min(self.n_active, n), replace=False))
        for j, block in enumerate(self._blocks):
            on = j in active
            for p in block.parameters():
                p.requires_grad_(on)
                if not on:
                    p.grad = None
        self.draws.append({"step": step, "blocks": active})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._blocks = find_parts(model).blocks
        self._draw(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step % self.interval == 0:
            self._draw(state.global_step)


@register("lisa", trains=True)
def lisa(ctx: BaselineContext) -> BaselineChoice:
    """LISA-style layer sampling: embeddings and head always, a few random blocks at a time."""
    s = ctx.settings
    seed = ctx.seed

    def callbacks() -> list[TrainerCallback]:
        return [LisaCallback(s.lisa_layers, s.lisa_interval, seed)]

    def describe(made: Sequence[TrainerCallback]) -> dict[str, Any]:
        return {"draws": next(c for c in made if isinstance(c, LisaCallback)).draws}

    # Every parameter starts trainable, so the optimizer holds them all; the callback switches blocks.
    variant = TrainVariant(spec=FreezeSpec.full(ctx.num_layers), callbacks=callbacks, describe=describe)
    return BaselineChoice(variant=variant, details={"lisa_layers": s.lisa_layers, "lisa_interval": s.lisa_interval})
