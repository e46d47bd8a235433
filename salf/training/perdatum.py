"""Per-datum boundaries (METHOD.md section 4, policy ``per-datum``): each batch stops its backward at its own depth.

``salf.method.plan.per_datum_boundaries`` gives every *traced* datum its own boundary from its own deviation
trace; ``datum_boundaries`` spreads them over the whole training set (row i of the trace belongs to datum
``trace.indices[i]``). A datum that was not traced gets

- ``fill="global"`` (default): the plan's global boundary;
- ``fill="nearest"``: the boundary of the traced datum whose tokens are most alike (cosine similarity of
  bag-of-token counts hashed into ``NEAREST_BUCKETS`` buckets; ties go to the smaller boundary, which
  trains more). Cheap and label-free, but only as good as "similar words, similar depth".

``BoundaryBatchSampler`` yields batches of indices that share one boundary, shuffled by seed and epoch;
``salf.training.run.train(..., boundaries=...)`` trains with it (``PerDatumStrategy``): the optimizer holds every parameter trainable at
the *smallest* boundary (AdamW skips a parameter whose gradient is None, so a batch that freezes it leaves
its weights and optimizer state alone), and a forward pre-hook on the model switches the plan to the
batch's boundary (``salf.method.freeze.apply_plan``: ``requires_grad`` flags and hooks only, no copies) before
the forward runs, so the no-grad prefix and the end of the backward move with every batch.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from salf.data.batch import collate
from salf.errors import SalfError
from salf.method.freeze import FreezeReport, FreezeSpec, apply_plan
from salf.models.arch import find_parts, unwrap_peft
from salf.training.config import TrainConfig
from salf.training.strategy import IndexedDataset, pop_indices

BOUNDARY_KEY = "salf_boundary"
"""Batch key holding the batch's boundaries [B] (taken out before the model's forward)."""
FILLS = ("global", "nearest")
NEAREST_BUCKETS = 512
PER_DATUM_FLOPS_NOTE = (
    "; with per-datum boundaries the sampled step trained from boundary {k} only, so this extrapolates that "
    "boundary's cost to every step: weigh each boundary's FLOPs per padded token by "
    "per_datum.padded_tokens_per_boundary for the run's cost"
)


def _token_profile(data: Sequence[dict], rows: Sequence[int]) -> np.ndarray:
    out = np.zeros((len(rows), NEAREST_BUCKETS), dtype=np.float64)
    for r, i in enumerate(rows):
        ids = np.asarray(data[i]["input_ids"], dtype=np.int64)
        # a fixed multiplicative hash: the same bucket for a token id on every run and platform
        np.add.at(out[r], (ids * 2654435761) % NEAREST_BUCKETS, 1.0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def datum_boundaries(
    per_datum: Sequence[int],
    indices: Sequence[int],
    n_data: int,
    default: int,
    num_layers: int,
    *,
    fill: str = "global",
    data: Sequence[dict] | None = None,
) -> np.ndarray:
    """One boundary per training datum: ``per_datum[i]`` for datum ``indices[i]``, the rest by ``fill``.

    ``per_datum`` and ``indices`` are a plan's ``per_datum_boundaries`` and its trace's ``indices``;
    ``default`` is the plan's global boundary; ``data`` (the training data) is needed for ``fill="nearest"``.
    """
    per = np.asarray(per_datum, dtype=np.int64).reshape(-1)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if fill not in FILLS:
        raise SalfError(f"unknown fill {fill!r} for untraced data", f"use one of {', '.join(FILLS)}")
    if per.shape != idx.shape:
        raise SalfError(
            f"{per.size} per-datum boundaries for {idx.size} traced data",
            "pass the plan's per_datum_boundaries with the indices of the trace the plan was made from",
        )
    if n_data < 1:
        raise SalfError(f"n_data must be at least 1, got {n_data}")
    if idx.size and (idx.min() < 0 or idx.max() >= n_data):
        raise SalfError(
            f"the trace names datum {int(idx.max())} but the training data has {n_data}",
            "trace and plan on the same data you train on",
        )
    if len(set(idx.tolist())) != idx.size:
        raise SalfError("the trace lists a datum twice", "pass the indices of one trace")
    values = [*per.tolist(), default]
    if any(not 0 <= k <= num_layers for k in values):
        raise SalfError(f"a boundary is outside 0..{num_layers}", "make the plan for this model")
    out = np.full(n_data, int(default), dtype=np.int64)
    out[idx] = per
    untraced = np.setdiff1d(np.arange(n_data), idx)
    if fill == "nearest" and untraced.size and idx.size:
        if data is None or len(data) != n_data:
            raise SalfError("fill='nearest' needs the training data", "pass data=the training data")
        traced_profile = _token_profile(data, idx.tolist())
        order = np.argsort(per, kind="stable")  # ties -> smaller boundary
        traced_profile, per_sorted = traced_profile[order], per[order]
        for start in range(0, untraced.size, 1024):
            rows = untraced[start : start + 1024]
            similarity = _token_profile(data, rows.tolist()) @ traced_profile.T
            out[rows] = per_sorted[similarity.argmax(axis=1)]
    return out


def boundaries_from_plan(
    plan: Any, trace: Any, n_data: int, *, fill: str = "global", data: Sequence[dict] | None = None
) -> np.ndarray:
    """``datum_boundaries`` from a ``salf.method.plan.Plan`` made with ``per_datum=True`` and its ``Trace``."""
    per = getattr(plan, "per_datum_boundaries", None)
    if per is None:
        raise SalfError(
            "the plan has no per-datum boundaries", "make it with per_datum=True (policy per-datum)"
        )
    if len(per) != trace.n_data:
        raise SalfError(
            f"the plan has {len(per)} per-datum boundaries but the trace has {trace.n_data} data",
            "pass the trace the plan was made from",
        )
    return datum_boundaries(per, trace.indices, n_data, plan.boundary, plan.num_layers, fill=fill, data=data)


class BoundaryBatchSampler(Sampler[list[int]]):
    """Batches of data indices that share one boundary.

    Per epoch: the data of each boundary are shuffled (``seed``, epoch), cut into batches of
    ``batch_size`` (the last, smaller batch of a boundary is kept), and the batches of all boundaries are
    shuffled together. ``set_epoch`` (called by the ``Trainer``) picks the epoch; without it each new
    iteration counts as the next epoch. ``shuffle=False`` keeps data and batches in index order.
    """

    def __init__(self, boundaries: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True):
        values = np.asarray(boundaries, dtype=np.int64).reshape(-1)
        if values.size == 0:
            raise SalfError("no boundaries to batch", "give one boundary per training datum")
        if batch_size < 1:
            raise SalfError(f"batch_size must be at least 1, got {batch_size}")
        if values.min() < 0:
            raise SalfError(f"boundaries must be >= 0, got {int(values.min())}")
        self.boundaries = values
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._groups = {int(k): np.flatnonzero(values == k) for k in np.unique(values)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self._groups.values())

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch``, in order (deterministic in seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        out: list[list[int]] = []
        for k in sorted(self._groups):
            members = self._groups[k]
            if self.shuffle:
                members = rng.permutation(members)
            out += [
                members[i : i + self.batch_size].tolist() for i in range(0, len(members), self.batch_size)
            ]
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        self.epoch += 1  # the next iteration without set_epoch is the next epoch
        yield from self.batches(epoch)


class PerDatumCollator:
    """``collate`` plus, for indexed training items, each datum's boundary under ``BOUNDARY_KEY``."""

    def __init__(self, pad_token_id: int, boundaries: Sequence[int]):
        self.pad_token_id = pad_token_id
        self.boundaries = np.asarray(boundaries, dtype=np.int64).reshape(-1)

    def __call__(self, data: Sequence[dict]) -> dict[str, torch.Tensor]:
        items, indices = pop_indices(data)
        batch = collate(items, self.pad_token_id)
        if indices is not None:
            batch[BOUNDARY_KEY] = torch.as_tensor(self.boundaries[indices], dtype=torch.long)
        return batch


@dataclass
class BoundarySwitcher:
    """Switches a model's plan to each batch's boundary before its forward; ``remove()`` undoes it all."""

    num_layers: int
    """Blocks of the model."""
    current: int | None = None
    """Boundary of the plan now applied (None before the first batch that brought one)."""
    switches: int = 0
    """Times the plan was re-applied."""
    switch_seconds: float = 0.0
    """Wall time spent re-applying plans."""
    forwards: Counter = field(default_factory=Counter)
    """Training forwards per boundary."""
    tokens: Counter = field(default_factory=Counter)
    """Padded tokens (``input_ids.numel()``) of the training forwards per boundary."""
    first: int | None = None
    """Boundary of the first training forward (the step ``salf.training.trainer``'s FLOP counter samples)."""
    _model: nn.Module | None = field(repr=False, default=None)
    _parts: Any = field(repr=False, default=None)
    _handle: Any = field(repr=False, default=None)
    _reports: list[FreezeReport] = field(repr=False, default_factory=list)
    removed: bool = False

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise SalfError(f"num_layers must be at least 1, got {self.num_layers}")

    def switch(self, k: int) -> None:
        """Apply the plan of boundary ``k`` (``FreezeSpec.from_boundary``) unless it is already applied."""
        if k == self.current:
            return
        start = time.perf_counter()
        report = apply_plan(self._model, FreezeSpec.from_boundary(k, self.num_layers), parts=self._parts)
        self._reports.append(report)
        self.current = k
        self.switches += 1
        self.switch_seconds += time.perf_counter() - start

    def remove(self) -> None:
        """Take the hook off and the last plan it applied (the model's flags and modes come back)."""
        if self.removed:
            return
        if self._handle is not None:
            self._handle.remove()
        for report in self._reports:
            report.remove()
        self._reports.clear()
        self.removed = True


def attach_per_datum(model: nn.Module) -> BoundarySwitcher:
    """A forward pre-hook on ``model`` that takes ``salf_boundary`` out of the batch and switches the plan
    to its smallest value (a batch made by ``BoundaryBatchSampler`` has one value; a mixed batch trains
    from the smallest, which covers all of its data). Forwards without the key (evaluation) change nothing.
    """
    parts = find_parts(unwrap_peft(model))
    switcher = BoundarySwitcher(num_layers=parts.num_layers, _model=model, _parts=parts)

    def take_boundary(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        value = kwargs.pop(BOUNDARY_KEY, None)
        if isinstance(value, torch.Tensor) and value.numel():
            k = int(value.min().item())
            switcher.switch(k)
            switcher.forwards[k] += 1
            if switcher.first is None:
                switcher.first = k
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                switcher.tokens[k] += ids.numel()
        return args, kwargs

    switcher._handle = model.register_forward_pre_hook(take_boundary, with_kwargs=True)
    return switcher


def base_spec(
    boundaries: Sequence[int],
    n_data: int,
    num_layers: int,
    spec: FreezeSpec | None,
    prefix_cache: str | None = None,
) -> FreezeSpec:
    """The plan to build the optimizer with: the smallest boundary's (every parameter any batch trains)."""
    values = np.asarray(boundaries, dtype=np.int64).reshape(-1)
    if values.size != n_data:
        raise SalfError(
            f"{values.size} per-datum boundaries for {n_data} training data",
            "give one boundary per training datum (salf.training.perdatum.datum_boundaries)",
        )
    if values.min() < 0 or values.max() > num_layers:
        raise SalfError(f"a per-datum boundary is outside 0..{num_layers}", "make the plan for this model")
    if prefix_cache is not None:
        raise SalfError(
            "a prefix cache and per-datum boundaries were both asked for",
            "a cache holds one boundary's prefix: drop --prefix-cache or --per-datum (from Python: prefix_cache or the "
            "boundaries)",
        )
    want = FreezeSpec.from_boundary(int(values.min()), num_layers)
    if spec is not None and spec != want:
        raise SalfError(
            f"with per-datum boundaries the plan is the smallest boundary's ({int(values.min())}), got {spec}",
            "pass spec=None with boundaries",
        )
    return want


@dataclass
class PerDatumTraining:
    """The ``Batching`` of the per-datum strategy: what the loop swaps in to train with per-datum boundaries."""

    dataset: IndexedDataset
    collator: PerDatumCollator
    sampler: BoundaryBatchSampler
    switcher: BoundarySwitcher

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        """What the run adds to metrics.json; the FLOP estimate says which boundary it sampled."""
        counts = Counter(int(k) for k in self.sampler.boundaries)
        per_datum = metrics["per_datum"] = {
            "data_per_boundary": {str(k): counts[k] for k in sorted(counts)},
            "forwards_per_boundary": {str(k): n for k, n in sorted(self.switcher.forwards.items())},
            "padded_tokens_per_boundary": {str(k): n for k, n in sorted(self.switcher.tokens.items())},
            "first_boundary": self.switcher.first,
            "switches": self.switcher.switches,
            "switch_seconds": self.switcher.switch_seconds,
        }
        if metrics.get("train_flops_method") and len(per_datum["padded_tokens_per_boundary"]) > 1:
            metrics["train_flops_method"] += PER_DATUM_FLOPS_NOTE.format(k=per_datum["first_boundary"])

    def remove(self) -> None:
        self.switcher.remove()


def prepare_per_datum_training(
    model: nn.Module,
    train_data: Sequence[dict],
    boundaries: Sequence[int],
    pad_token_id: int,
    *,
    batch_size: int,
    seed: int = 0,
) -> PerDatumTraining:
    """Dataset, collator, batch sampler and boundary switcher for ``train_data`` with ``boundaries``.

    Call it after the smallest boundary's plan is applied and before the ``Trainer`` (and its optimizer)
    is built; ``remove()`` afterwards.
    """
    values = np.asarray(boundaries, dtype=np.int64).reshape(-1)
    if values.size != len(train_data):
        raise SalfError(f"{values.size} per-datum boundaries for {len(train_data)} training data")
    return PerDatumTraining(
        dataset=IndexedDataset(train_data),
        collator=PerDatumCollator(pad_token_id, values),
        sampler=BoundaryBatchSampler(values, batch_size, seed=seed),
        switcher=attach_per_datum(model),
    )


@dataclass
class PerDatumStrategy:
    """Train each batch from its data's own boundary (a ``TrainingStrategy``): ``boundaries`` has one
    boundary per training datum."""

    boundaries: Sequence[int]

    def plan_spec(
        self, spec: FreezeSpec | None, n_data: int, num_layers: int, config: TrainConfig
    ) -> FreezeSpec | None:
        return base_spec(self.boundaries, n_data, num_layers, spec, config.prefix_cache)

    def prepare(
        self,
        model: nn.Module,
        train_data: Sequence[dict],
        report: FreezeReport,
        pad_id: int,
        tokenizer: Any,
        config: TrainConfig,
        device: torch.device,
    ) -> PerDatumTraining:
        return prepare_per_datum_training(
            model, train_data, self.boundaries, pad_id, batch_size=config.batch_size, seed=config.seed
        )


__all__ = [
    "BoundaryBatchSampler",
    "BoundarySwitcher",
    "PerDatumCollator",
    "PerDatumStrategy",
    "PerDatumTraining",
    "attach_per_datum",
    "base_spec",
    "boundaries_from_plan",
    "datum_boundaries",
    "prepare_per_datum_training",
]
