"""The benchmark's baselines: other ways of deciding what to fine-tune, registered in ``BASELINES``.

A baseline gets a ``BaselineContext`` (the pretrained model, loaded on demand, and the training data)
and returns a ``BaselineChoice``: either a **boundary** k, whose quality is then the oracle run at k
(same recipe, seed and data, so no retraining), or a **training variant** that needs its own run
(LoRA, LISA).

- ``full``, ``freeze-first-half``, ``train-last-quarter``, ``random``: the depth-only policies of
  ``salf.method.plan.POLICIES``;
- ``gradient-norm`` (AutoFreeze-style, one shot): one backward pass of full fine-tuning over a few
  batches; each block's share of the gradient norm; the boundary is the first block whose cumulative
  share exceeds ``gradnorm_threshold`` (the blocks below it, with the least gradient, are frozen);
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
  lets fine-tuning reshape the representation's last turn (``cka_change_boundary``);
- ``lora``: LoRA adapters on every block (PEFT's default modules), embeddings frozen, head trained;
- ``freeze-deep-half``, ``spectrum-25``, ``spectrum-50``, ``lora-plan``: the rules LLM tools use
  (``salf.bench.baselines_llm``, registered when the package ``salf.bench`` is imported);
- ``lisa``: LISA-style layerwise importance sampling: embeddings and head always trained, plus
  ``lisa_layers`` blocks drawn at random every ``lisa_interval`` steps. Every parameter is in the
  optimizer; the blocks not drawn get ``requires_grad=False`` and ``grad=None``, so AdamW skips them
  (no update, no weight decay) and autograd computes no weight gradient for them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from salf.data.batch import IGNORE_INDEX, collate
from salf.data.tasks import TaskData
from salf.errors import SalfError
from salf.method.freeze import FreezeSpec
from salf.method.lenses import POOLERS, head_reads
from salf.method.plan import POLICIES, PolicyContext
from salf.models.arch import find_parts
from salf.models.loading import LoadedModel
from salf.registry import Registry


@dataclass
class BaselineSettings:
    """Knobs of the baselines (part of a benchmark task, so changing them re-runs what they affect)."""

    gradnorm_batches: int = 4
    """Batches (of the task's batch size) in the gradient-norm baseline's one backward pass."""
    gradnorm_threshold: float = 0.1
    """Cumulative gradient-norm share, from the bottom block up, that the frozen prefix may hold."""
    variability_sample: int = 256
    """Data whose hidden states the variability and cosine-change baselines read (one knob for both: a new
    field would change every task's recipe fingerprint and so invalidate finished runs)."""
    variability_tol: float = 0.1
    """The variability ratio has stopped changing once it falls by at most this share of its range."""
    lisa_layers: int = 2
    """Blocks LISA trains at a time."""
    lisa_interval: int = 20
    """LISA draws new blocks every this many steps."""
    lora_rank: int = 8
    """Rank of the LoRA baseline's adapters."""
    lora_lr_factor: float = 10.0
    """LoRA's learning rate is this times the task's body learning rate (adapters start at zero and
    need a larger step; one recipe-wide factor, not tuned per task)."""

    def __post_init__(self) -> None:
        for name in ("gradnorm_batches", "variability_sample", "lisa_layers", "lisa_interval", "lora_rank"):
            if getattr(self, name) < 1:
                raise SalfError(f"baseline setting {name} must be at least 1, got {getattr(self, name)}")
        for name in ("gradnorm_threshold", "variability_tol"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SalfError(f"baseline setting {name} must be in [0, 1), got {getattr(self, name)}")
        if not self.lora_lr_factor > 0:
            raise SalfError(f"lora_lr_factor must be positive, got {self.lora_lr_factor}")


@dataclass
class BaselineContext:
    """What a baseline may look at: the pretrained model (on demand), the training data, the recipe."""

    load: Callable[[], LoadedModel]
    """Loads a fresh copy of the pretrained model (seeded, so its head is the oracle runs' head)."""
    data: TaskData
    """The tokenized training data."""
    num_layers: int
    """L, the number of blocks."""
    cost: np.ndarray
    """Predicted step cost of every boundary k = 0..L as a fraction of full fine-tuning."""
    seed: int
    batch_size: int
    learning_rate: float
    settings: BaselineSettings = field(default_factory=BaselineSettings)
    default_boundary: Callable[[], int | None] | None = None
    """The boundary of salf's default plan for this seed (None: not known here), for baselines built on it."""
    load_seconds: float = 0.0
    """Time spent loading models for this baseline (not part of its profiling time)."""

    def model(self) -> LoadedModel:
        started = time.perf_counter()
        loaded = self.load()
        self.load_seconds += time.perf_counter() - started
        return loaded


@dataclass
class TrainVariant:
    """A fine-tuning that is not an oracle boundary and so needs its own run."""

    spec: FreezeSpec
    """What is trainable at the start of training (the optimizer holds exactly these parameters)."""
    lora: bool = False
    """Train LoRA adapters on ``spec``'s blocks instead of their weights."""
    lora_rank: int = 8
    learning_rate: float | None = None
    """Body (or adapter) learning rate; None: the task's."""
    callbacks: Callable[[], Sequence[TrainerCallback]] = tuple
    """Makes the run's extra Trainer callbacks (a new set per run)."""
    describe: Callable[[Sequence[TrainerCallback]], dict[str, Any]] = lambda callbacks: {}
    """What to record about the run from its callbacks once it has finished."""


@dataclass
class BaselineChoice:
    """A baseline's answer: a boundary (reuses the oracle run) or a training variant (its own run)."""

    boundary: int | None = None
    variant: TrainVariant | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """What the baseline measured to decide (gradient norms, variability ratios, ...)."""

    def __post_init__(self) -> None:
        if (self.boundary is None) == (self.variant is None):
            raise ValueError("a baseline gives either a boundary or a training variant, not both or neither")


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: how it decides, and whether its answer is a run of its own."""

    decide: Callable[[BaselineContext], BaselineChoice]
    trains: bool = False
    """True when ``decide`` returns a training variant (its own run); False: a boundary."""

    @property
    def doc(self) -> str:
        return (self.decide.__doc__ or "").strip().splitlines()[0] if self.decide.__doc__ else ""


BASELINES: Registry[Baseline] = Registry("baseline")


def register(name: str, trains: bool = False) -> Callable[[Callable[[BaselineContext], BaselineChoice]], Any]:
    def add(decide: Callable[[BaselineContext], BaselineChoice]) -> Callable[[BaselineContext], BaselineChoice]:
        BASELINES.register(name)(Baseline(decide, trains))
        return decide

    return add


def _policy_baseline(name: str) -> Callable[[BaselineContext], BaselineChoice]:
    def choose(ctx: BaselineContext) -> BaselineChoice:
        benefit = np.linspace(1.0, 0.0, ctx.num_layers + 1)  # depth-only policies ignore the benefit
        k = POLICIES.get(name)(PolicyContext(benefit=benefit, cost=np.asarray(ctx.cost), seed=ctx.seed), None)
        return BaselineChoice(boundary=int(k))

    choose.__doc__ = POLICIES.get(name).__doc__
    return choose


for _name in ("full", "freeze-first-half", "train-last-quarter", "train-last-2", "random"):
    register(_name)(_policy_baseline(_name))


# --------------------------------------------------------------------------------------------- gradient norm


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


# --------------------------------------------------------------------------------------------- own runs


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

