"""The gradient baseline (``BASELINES``, registered when the package ``salf.bench`` is imported): a boundary
from one backward pass of full fine-tuning over a few batches of the training data.

- ``gradient-norm`` (AutoFreeze-style, one shot): one backward pass of full fine-tuning over a few
  batches; each block's share of the gradient norm; the boundary is the first block whose cumulative
  share exceeds ``gradnorm_threshold`` (the blocks below it, with the least gradient, are frozen).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from salf.bench.baselines import BaselineChoice, BaselineContext, register
from salf.data.batch import collate
from salf.models.arch import find_parts


def block_gradient_norms(model: torch.nn.Module, data: Sequence[dict], pad_token_id: int, batch_size: int,
                         batches: int, seed: int) -> np.ndarray:
    """Per-block L2 norm of the full fine-tuning gradient, averaged over ``batches`` seeded batches.

    Dropout is off (eval mode) so the answer depends on the seed only; gradients are cleared after.
    """
    parts = find_parts(model)
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(data))[: batch_size * batches]
    chunks = [picked[i : i + batch_size] for i in range(0, len(picked), batch_size)]
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        for chunk in chunks:
            batch = collate([data[int(i)] for i in chunk], pad_token_id)
            device = next(model.parameters()).device
            out = model(**{k: v.to(device) for k, v in batch.items()})
            (out.loss / len(chunks)).backward()
        norms = []
        for block in parts.blocks:
            squares = [p.grad.detach().float().pow(2).sum() for p in block.parameters() if p.grad is not None]
            norms.append(float(torch.stack(squares).sum().sqrt()) if squares else 0.0)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return np.asarray(norms)


def gradient_norm_boundary(norms: np.ndarray, threshold: float) -> int:
    """First block whose cumulative share of the gradient norm exceeds ``threshold``.

    The blocks below it together hold at most ``threshold`` of the gradient and are frozen. No
    gradient at all means nothing to go on: full fine-tuning (k = 0).
    """
    norms = np.clip(np.asarray(norms, dtype=float), 0.0, None)
    if norms.sum() <= 0:
        return 0
    cumulative = np.cumsum(norms / norms.sum())
    return int(np.flatnonzero(cumulative > threshold + 1e-12)[0])


@register("gradient-norm")
def gradient_norm(ctx: BaselineContext) -> BaselineChoice:
    """AutoFreeze-style: freeze the bottom blocks that hold the least gradient norm."""
    loaded = ctx.model()
    s = ctx.settings
    norms = block_gradient_norms(loaded.model, ctx.data.data, loaded.pad_token_id, ctx.batch_size,
                                 s.gradnorm_batches, ctx.seed)
    k = gradient_norm_boundary(norms, s.gradnorm_threshold)
    return BaselineChoice(boundary=k, details={"block_gradient_norms": norms.tolist(),
                                               "threshold": s.gradnorm_threshold})
