"""The representation baselines (``BASELINES``, registered when the package ``salf.bench`` is imported): a
boundary from one forward pass of the pretrained model over the training data, read from how the pooled
representation the head reads changes from one latent space to the next.

- ``variability`` (Xie et al. 2022, "Hidden state variability of pretrained language models can guide
  computation reduction for transfer learning"): the within-class / between-class variability ratio of
  every latent space; the boundary is the first latent space after which the ratio falls by no more
  than ``variability_tol`` of its range (the blocks that make it are frozen, the rest trained);
- ``cosine-change`` (training-free, one forward pass; a 2025 study reports it within 1-2% of full
  fine-tuning on 15 classification tasks): block l's importance is the mean over traced data of
  1 - cos(p_l, p_{l+1}), p being the pooled representation the head reads (the first token, the last or
  the token mean, as ``salf.method.lenses.head_reads`` says); the boundary is the lowest
  of the ceil(L/4) most-changing blocks (``cosine_change_boundary``);
- ``cka-change`` (training-free, one forward pass; representation change points): block l's change is
  1 - linear CKA (Kornblith et al. 2019) between the pooled representations of latent spaces l and l+1
  over the traced data; the boundary is the last change point, the deepest block whose change is at least
  ``CKA_CHANGE_LEVEL`` of the largest: the blocks above it only refine what it made, and training from it up
  lets fine-tuning reshape the representation's last turn (``cka_change_boundary``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from salf.bench.baselines import BaselineChoice, BaselineContext, register
from salf.data.batch import IGNORE_INDEX, collate
from salf.errors import SalfError
from salf.method.lenses import POOLERS, head_reads
from salf.models.arch import find_parts

# --------------------------------------------------------------------------------------------- variability


def _first_target(datum: dict) -> int | None:
    """Position of the first target token (labels are aligned with input_ids, -100 elsewhere)."""
    for t, label in enumerate(datum["labels"]):
        if t > 0 and label != IGNORE_INDEX:
            return t
    return None


def _read_positions(data: Sequence[dict]) -> tuple[list[int], list[int | None], list[int]]:
    """(data index, position to read, class) per usable datum.

    Classification: no one position (None): ``latent_features`` pools what the classification head
    reads (``salf.method.lenses.head_reads``: the first token of an encoder, the token mean for a mean-pooling
    head, the last non-pad token of a causal LM), class = the label. Token data: the position that
    predicts the first target token, class = that token.
    """
    rows: list[int] = []
    positions: list[int | None] = []
    classes: list[int] = []
    for i, d in enumerate(data):
        if isinstance(d["labels"], (int, np.integer)):
            rows.append(i)
            positions.append(None)
            classes.append(int(d["labels"]))
        else:
            t = _first_target(d)
            if t is not None:
                rows.append(i)
                positions.append(t - 1)
                classes.append(int(d["input_ids"][t]))
    return rows, positions, classes


@torch.no_grad()
def latent_features(model: torch.nn.Module, data: Sequence[dict], positions: Sequence[int | None], pad_token_id: int,
                    batch_size: int = 16) -> np.ndarray:
    """[N, L+1, H] hidden state of each datum at its position, at every latent space l = 0..L
    (the input of block 0, then each block's output, before any final norm). A position None reads
    what the model's classification head reads instead (``salf.method.lenses.POOLERS[head_reads(parts)]``:
    the first token, the last non-pad token, or the mean of the non-pad tokens)."""
    parts = find_parts(model)
    pool = POOLERS[head_reads(parts)]
    n, latents = len(data), parts.num_layers + 1
    out: np.ndarray | None = None
    current: dict[str, Any] = {}

    def store(layer: int, hidden: torch.Tensor) -> None:
        nonlocal out
        hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
        if current["pos"] is None:
            picked_t = pool(hidden, current["mask"].to(hidden.device))
        else:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            picked_t = hidden[rows, current["pos"].to(hidden.device)]
        picked = picked_t.float().cpu().numpy()
        if out is None:
            out = np.zeros((n, latents, picked.shape[-1]), dtype=np.float32)
        out[current["rows"], layer] = picked

    handles = [parts.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: store(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
    for j, block in enumerate(parts.blocks):
        handles.append(block.register_forward_hook(lambda m, a, o, layer=j + 1: store(layer, o)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    base = getattr(model, "base_model", model)
    try:
        for start in range(0, n, batch_size):
            rows = list(range(start, min(n, start + batch_size)))
            batch = collate([data[i] for i in rows], pad_token_id)
            pos = [positions[i] for i in rows]
            if any(p is None for p in pos) and not all(p is None for p in pos):
                raise ValueError("latent_features: a batch mixes pooled (None) and positioned data")
            current.update(rows=rows, mask=batch["attention_mask"],
                           pos=None if pos[0] is None else torch.as_tensor(pos))
            base(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    assert out is not None
    return out


def variability_ratio(features: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Within-class over between-class variability of ``features`` [N, L+1, H], per latent space.

    within = mean over classes of the mean squared distance of a class's states to their class mean;
    between = mean over classes of the squared distance of the class mean to the global mean.
    """
    classes = np.asarray(classes)
    labels = np.unique(classes)
    if len(labels) < 2:
        raise SalfError("the variability ratio needs at least two classes with two or more data each",
                        "use more data, or a task with several classes")
    x = features.astype(np.float64)
    global_mean = x.mean(axis=0)
    within = np.zeros(x.shape[1])
    between = np.zeros(x.shape[1])
    for c in labels:
        members = x[classes == c]
        mean = members.mean(axis=0)
        within += ((members - mean) ** 2).sum(axis=-1).mean(axis=0)
        between += ((mean - global_mean) ** 2).sum(axis=-1)
    return within / np.maximum(between, 1e-12)


def variability_boundary(ratio: np.ndarray, tol: float) -> int:
    """First latent space l after which the ratio falls by at most ``tol`` of its range: blocks 0..l-1
    (which made latent space l) are frozen, blocks l..L-1 trained. A flat ratio gives l = 0."""
    ratio = np.asarray(ratio, dtype=float)
    span = ratio.max() - ratio.min()
    if span <= 0:
        return 0
    still_falls = [ratio[i] - ratio[i:].min() for i in range(len(ratio))]
    return int(np.flatnonzero(np.asarray(still_falls) <= tol * span + 1e-12)[0])


def pooled_features(ctx: BaselineContext,
                    eligible: Callable[[Sequence[int]], Sequence[int]] | None = None) -> tuple[np.ndarray, list[int]]:
    """Pooled features [N, L+1, H] (``latent_features``) of a seeded sample of the training data, and its classes.

    One no-grad forward pass of the pretrained model over at most ``settings.variability_sample`` data,
    drawn by ``ctx.seed`` from those ``eligible`` keeps (given the classes of every usable datum; None:
    all). Shared by the baselines that read the representation the head reads, so they sample alike.
    """
    loaded = ctx.model()
    rows, positions, classes = _read_positions(ctx.data.data)
    keep = list(eligible(classes)) if eligible is not None else list(range(len(rows)))
    sample = ctx.settings.variability_sample
    if len(keep) > sample:
        keep = sorted(np.random.default_rng(ctx.seed).choice(keep, sample, replace=False).tolist())
    data = [ctx.data.data[rows[j]] for j in keep]
    features = latent_features(loaded.model, data, [positions[j] for j in keep], loaded.pad_token_id)
    return features, [classes[j] for j in keep]


def _classes_with_two(classes: Sequence[int]) -> list[int]:
    """Indices of the data whose class has at least two members (a variability needs two)."""
    counts: dict[int, int] = {}
    for c in classes:
        counts[c] = counts.get(c, 0) + 1
    return [j for j, c in enumerate(classes) if counts[c] >= 2]


@register("variability")
def variability(ctx: BaselineContext) -> BaselineChoice:
    """Xie et al. 2022: freeze the blocks before the hidden-state variability ratio stops improving."""
    s = ctx.settings
    features, classes = pooled_features(ctx, _classes_with_two)
    ratio = variability_ratio(features, classes)
    k = variability_boundary(ratio, s.variability_tol)
    return BaselineChoice(boundary=k, details={"variability_ratio": ratio.tolist(), "n_data": len(classes),
                                               "n_classes": len(set(classes)), "tol": s.variability_tol})


# --------------------------------------------------------------------------------------------- cosine change


def cosine_change(features: np.ndarray) -> np.ndarray:
    """Per block l = 0..L-1: mean over data of 1 - cos(p_l, p_{l+1}) for ``features`` [N, L+1, H].

    p_l is block l's input and p_{l+1} its output at the pooled position: how far the block turns the
    representation the head reads. A zero vector has cosine 0 with anything (change 1).
    """
    x = features.astype(np.float64)
    a, b = x[:, :-1], x[:, 1:]
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = np.where(norms > 0, (a * b).sum(axis=-1) / np.maximum(norms, 1e-300), 0.0)
    return (1.0 - cos).mean(axis=0)


def cosine_change_boundary(importance: Sequence[float]) -> int:
    """The lowest block among the n = ceil(L/4) (at least 1) blocks whose representation changes most.

    The study behind this baseline trains the most-changing blocks; as one boundary (a trained suffix),
    that is the lowest of them, so every top-n block is trained (with whatever lies above it). Ties go to
    the deeper block (a cheaper plan), the order being otherwise the importance's.
    """
    importance = np.asarray(importance, dtype=float)
    n = max(1, math.ceil(len(importance) / 4))
    # stable sort of (-importance) over reversed indices: among equals the deeper block comes first
    order = len(importance) - 1 - np.argsort(-importance[::-1], kind="stable")
    return int(min(order[:n]))


@register("cosine-change")
def cosine_change_baseline(ctx: BaselineContext) -> BaselineChoice:
    """Training-free: train from the lowest of the ceil(L/4) blocks that most change the pooled representation."""
    features, _ = pooled_features(ctx)
    importance = cosine_change(features)
    k = cosine_change_boundary(importance)
    return BaselineChoice(boundary=k, details={"block_cosine_change": importance.tolist(), "n_data": len(features),
                                               "top_n": max(1, math.ceil(ctx.num_layers / 4))})


# --------------------------------------------------------------------------------------------- CKA change points

CKA_CHANGE_LEVEL = 0.5
"""A block is a change point when its 1 - CKA is at least this share of the largest block's. A module
constant, not a ``BaselineSettings`` field: a new field would change every task's recipe fingerprint."""


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations [N, H] of the same N data: 1 for the same geometry (up to rotation and
    scale), 0 for unrelated ones; NaN when either is the same vector for every datum (no geometry to
    compare: the first token's embedding, which a [CLS]-reading head sees at latent space 0). Computed on
    the N x N Gram matrices, so H may be large."""
    centred = []
    for z in (x, y):
        z = z.astype(np.float64)
        c = z - z.mean(axis=0)
        # a constant representation leaves only float32 rounding after centring: compare with its own scale
        if (c**2).sum() <= 1e-8 * max((z**2).sum(), 1e-300):
            return float("nan")
        centred.append(c)
    k, m = (c @ c.T for c in centred)
    return float((k * m).sum() / (np.linalg.norm(k) * np.linalg.norm(m)))


def cka_change(features: np.ndarray) -> np.ndarray:
    """Per block l = 0..L-1: 1 - linear CKA between latent spaces l and l+1 of ``features`` [N, L+1, H]."""
    return np.array([1.0 - linear_cka(features[:, i], features[:, i + 1]) for i in range(features.shape[1] - 1)])


def cka_change_boundary(change: Sequence[float], level: float = CKA_CHANGE_LEVEL) -> int:
    """The last change point: the deepest block whose change is at least ``level`` x the largest (0 when no
    block changes anything). A block whose change is NaN (its input has no geometry) is never one."""
    change = np.nan_to_num(np.asarray(change, dtype=float), nan=0.0)
    top = change.max(initial=0.0)
    if top <= 0:
        return 0
    return int(np.flatnonzero(change >= level * top)[-1])


@register("cka-change")
def cka_change_baseline(ctx: BaselineContext) -> BaselineChoice:
    """Training-free: train from the last block that changes the pooled representation's geometry (CKA)."""
    features, _ = pooled_features(ctx)
    change = cka_change(features)
    k = cka_change_boundary(change)
    return BaselineChoice(boundary=k, details={"block_cka_change": [None if math.isnan(c) else c for c in change.tolist()],
                                               "n_data": len(features),
                                               "level": CKA_CHANGE_LEVEL})
