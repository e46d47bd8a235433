"""Baselines that LLM fine-tuning tools use, each a run of its own (``BASELINES``, registered when the package
``salf.bench`` is imported):

- ``freeze-deep-half``: the shallow half of the blocks trained, the deep half frozen (the reverse of
  ``freeze-first-half``; LayerTracer reports it beating full fine-tuning in continued pretraining). Backward
  still runs through every block, so it saves weight gradients only;
- ``spectrum-25``, ``spectrum-50`` (Hartford et al. 2024, arXiv 2406.06623, an axolotl plugin): every linear
  module of the blocks ranked by the signal-to-noise ratio of its weight matrix, from the weights alone; the top
  25% / 50% of each module type (``self_attn.q_proj`` of every block ranked together, and so on) trained, every
  other parameter of the blocks frozen. The SNR is Spectrum's: the singular values above the Marchenko-Pastur
  bound (noise scale from their interquartile range) summed, over those below, divided by the largest one.
  Embeddings (and a head tied to them) stay frozen and the final norm is trained, as in salf's plans;
- ``lora-plan``: LoRA adapters on the blocks salf's default plan trains (same rank and rate as ``lora``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from salf.bench.baselines import BaselineChoice, BaselineContext, TrainVariant, register
from salf.errors import SalfError
from salf.method.freeze import FreezeSpec
from salf.models.arch import find_parts


@register("freeze-deep-half", trains=True)
def freeze_deep_half(ctx: BaselineContext) -> BaselineChoice:
    """The shallow half of the blocks trained, the deep half (and embeddings, tied head) frozen."""
    spec = FreezeSpec(trainable_blocks=tuple(range(ctx.num_layers // 2)), embeddings=False)
    return BaselineChoice(variant=TrainVariant(spec=spec), details={"trained_blocks": list(spec.trainable_blocks)})


def spectrum_snr(weight: torch.Tensor) -> float:
    """Spectrum's signal-to-noise ratio of a weight matrix, normalised by its largest singular value."""
    s = torch.linalg.svdvals(weight.detach().float())
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    n, m = weight.shape[-2:]
    beta = min(n, m) / max(n, m)
    threshold = sigma * (1 + math.sqrt(beta))
    signal, noise = s[s > threshold].sum(), s[s <= threshold].sum()
    snr = float(signal / noise) if noise > 0 else math.inf
    return snr / float(s[0])


def spectrum_selection(model: nn.Module, top: float) -> dict[str, list[int]]:
    """{module type: the blocks whose module of that type is in the top ``top`` share by SNR}."""
    blocks = find_parts(model).blocks
    scores: dict[str, list[tuple[float, int]]] = {}
    for j, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                scores.setdefault(name, []).append((spectrum_snr(module.weight), j))
    if not scores:
        raise SalfError("Spectrum ranks the blocks' linear modules, and this model's blocks have none")
    keep = {}
    for name, ranked in scores.items():
        ranked.sort(key=lambda item: (-item[0], item[1]))
        keep[name] = sorted(j for _, j in ranked[: max(1, math.ceil(top * len(ranked)))])
    return keep


class ModuleSelection(TrainerCallback):
    """Freezes, when training begins, every parameter of the planned blocks that lies outside the selected
    modules: no weight gradient for them, and AdamW skips a parameter whose gradient is None."""

    def __init__(self, selection: dict[str, list[int]]):
        self.selection = selection

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for j, block in enumerate(find_parts(model).blocks):
            chosen = {name for name, blocks in self.selection.items() if j in blocks}
            for name, param in block.named_parameters():
                if not any(name.startswith(module + ".") for module in chosen):
                    param.requires_grad_(False)
                    param.grad = None


def _spectrum(top: float):
    def decide(ctx: BaselineContext) -> BaselineChoice:
        selection = spectrum_selection(ctx.model().model, top)
        blocks = tuple(sorted({j for chosen in selection.values() for j in chosen}))
        variant = TrainVariant(spec=FreezeSpec(trainable_blocks=blocks, embeddings=False),
                               callbacks=lambda: [ModuleSelection(selection)])
        modules = sum(len(chosen) for chosen in selection.values())
        return BaselineChoice(variant=variant, details={"top": top, "selected": selection, "modules": modules})

    decide.__doc__ = f"Spectrum: the top {top:.0%} of each module type by weight SNR trained, the rest frozen."
    return decide


register("spectrum-25", trains=True)(_spectrum(0.25))
register("spectrum-50", trains=True)(_spectrum(0.50))


@register("lora-plan", trains=True)
def lora_plan(ctx: BaselineContext) -> BaselineChoice:
    """LoRA adapters on the blocks salf's default plan trains; embeddings frozen; the head trained."""
    k = ctx.default_boundary() if ctx.default_boundary is not None else None
    if k is None:
        raise SalfError("no default plan for this seed (the suite's lenses, estimators or policies leave it out)")
    s = ctx.settings
    spec = FreezeSpec(trainable_blocks=tuple(range(k, ctx.num_layers)), embeddings=False)
    lr = ctx.learning_rate * s.lora_lr_factor
    details: dict[str, Any] = {"boundary": k, "lora_rank": s.lora_rank, "learning_rate": lr}
    return BaselineChoice(variant=TrainVariant(spec=spec, lora=True, lora_rank=s.lora_rank, learning_rate=lr),
                          details=details)


__all__ = ["ModuleSelection", "freeze_deep_half", "lora_plan", "spectrum_selection", "spectrum_snr"]
