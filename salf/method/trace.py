"""The transition trace: how far each latent space of a model is from the task's labels.

One no-grad forward pass over a sample of the task data. Hooks on the transformer blocks see every
latent state h_0 (the input of block 0, after the embeddings and any embedding scaling) and h_l (the
output of block l-1) as it is produced; each hook hands it to a *lens*, which immediately reduces it
to what it needs (the target positions, or one pooled vector per datum) so no batch's hidden states
are ever kept. The lens then turns what it read into a deviation d_{i,l} for every datum i and
latent space l = 0..L (METHOD.md section 1).

Lenses live in ``LENSES`` by name (``salf.method.lenses``; the probe's fitting is ``salf.method.probe``):
- ``logit-lens``: cross-entropy of the model's own head read at every depth (default for LMs);
- ``basis-cosine``: 1 - cosine between the normed latent state and the head row of the target token;
- ``probe``: held-out cross-entropy of a linear probe per layer (default for class labels).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from salf.data.batch import IGNORE_INDEX, collate
from salf.errors import SalfError
from salf.method.lenses import (
    CLASS_LABELS,
    LENSES,
    Lens,
    TraceConfig,
    choose_lens,
    default_cell_key,
    label_kind_of,
)
from salf.models.arch import ModelParts, find_parts


@dataclass
class Trace:
    """Deviation of every traced datum at every latent space l = 0..L."""

    lens: str
    """The lens that read the latent spaces."""
    pooling: str
    """How each datum was read: a ``POOLERS`` name for the probe, 'targets' for the token lenses."""
    num_layers: int
    """L, the number of transformer blocks; there are L + 1 latent spaces."""
    per_datum: np.ndarray
    """[N, L+1] deviation d_{i,l}; row i belongs to ``indices[i]`` of the data given to ``trace_model``."""
    indices: np.ndarray
    """[N] positions of the traced data in the data given to ``trace_model`` (ascending)."""
    n_tokens: int
    """Non-pad tokens run through the model."""
    seconds: float
    """Wall time of tracing (forward pass and probe fits)."""
    chance: float | None = None
    """The deviation of knowing nothing about a datum, in the trace's units (the probe: the entropy of the
    traced data's class frequencies, the loss of always predicting them); None where a lens has none.
    It turns a deviation into the share of the task still unsolved (``salf.method.gain``'s sufficiency)."""
    mean: np.ndarray = field(init=False)
    """[L+1] the trace D_l: mean deviation over data."""
    std: np.ndarray = field(init=False)
    """[L+1] spread of the deviation across data."""
    n_data: int = field(init=False)
    """N, the number of traced data."""

    def __post_init__(self) -> None:
        self.per_datum = np.asarray(self.per_datum, dtype=np.float64)
        self.indices = np.asarray(self.indices, dtype=np.int64)
        if self.per_datum.ndim != 2 or self.per_datum.shape[1] != self.num_layers + 1:
            raise ValueError(f"per_datum must be [N, {self.num_layers + 1}], got {self.per_datum.shape}")
        if self.indices.shape != (self.per_datum.shape[0],):
            raise ValueError(f"indices must have one entry per datum, got {self.indices.shape}")
        self.mean = self.per_datum.mean(axis=0)
        self.std = self.per_datum.std(axis=0)
        self.n_data = int(self.per_datum.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "lens": self.lens,
            "pooling": self.pooling,
            "num_layers": self.num_layers,
            "n_data": self.n_data,
            "n_tokens": self.n_tokens,
            "seconds": self.seconds,
            "chance": self.chance,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "indices": self.indices.tolist(),
            "per_datum": self.per_datum.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        # mean, std and n_data are derived from per_datum, so they are recomputed rather than read.
        return cls(
            lens=d["lens"],
            pooling=d["pooling"],
            num_layers=int(d["num_layers"]),
            per_datum=np.asarray(d["per_datum"], dtype=np.float64).reshape(-1, int(d["num_layers"]) + 1),
            indices=np.asarray(d["indices"], dtype=np.int64),
            n_tokens=int(d["n_tokens"]),
            seconds=float(d["seconds"]),
            chance=None if d.get("chance") is None else float(d["chance"]),
        )


def _has_target(datum: dict) -> bool:
    return any(label != IGNORE_INDEX for label in datum["labels"][1:])


def sample_indices(data: Sequence[dict], kind: str, config: TraceConfig) -> np.ndarray:
    """Ascending positions of the data to trace: all usable ones, or ``sample_size`` of them by seed."""
    usable = (
        np.arange(len(data))
        if kind == CLASS_LABELS
        else np.array([i for i, d in enumerate(data) if _has_target(d)])
    )
    if len(usable) == 0:
        raise SalfError(
            "no datum has a target token (every label after the first position is -100)",
            "check the completion/label masking of the data",
        )
    if len(usable) > config.sample_size:
        usable = np.sort(np.random.default_rng(config.seed).choice(usable, config.sample_size, replace=False))
    return usable.astype(np.int64)


def _batches(
    sample: Sequence[dict], batch_size: int, pad_token_id: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    # Longest first, so batches hold similar lengths (little padding) and memory peaks at the start.
    order = sorted(range(len(sample)), key=lambda i: -len(sample[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([sample[i] for i in rows], pad_token_id)
        yield torch.as_tensor(rows), {k: v.to(device) for k, v in batch.items()}


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def _latent_hooks(parts: ModelParts, lens: Lens) -> Iterator[None]:
    """Feed h_0 (input of block 0) and h_l (output of block l-1) to the lens; removed on exit."""

    def read_input(module, args, kwargs):
        lens.read(0, args[0] if args else kwargs["hidden_states"])

    def reader(layer: int):
        return lambda module, args, output: lens.read(layer, _first(output))

    handles = [parts.blocks[0].register_forward_pre_hook(read_input, with_kwargs=True)]
    try:
        for j, block in enumerate(parts.blocks):
            handles.append(block.register_forward_hook(reader(j + 1)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _forward_kwargs(base: nn.Module) -> dict[str, Any]:
    # No KV cache: one pass, nothing to reuse, and the cache would hold every layer's keys/values.
    return {"use_cache": False} if "use_cache" in inspect.signature(base.forward).parameters else {}


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def trace_model(model: nn.Module, data: Sequence[dict], config: TraceConfig, pad_token_id: int) -> Trace:
    """Trace ``model`` over (a seeded sample of) ``data``: one no-grad pass, then the lens's deviations."""
    started = time.perf_counter()
    parts = find_parts(model)
    cell = default_cell_key(data)  # reads the label kind once
    kind = label_kind_of(cell)
    lens_name = choose_lens(parts, cell, config.lens)
    indices = sample_indices(data, kind, config)
    sample = [data[i] for i in indices]
    lens = LENSES.get(lens_name)(parts, config, sample)
    # The base model runs the blocks without the head, so no [tokens, vocab] logits are ever built.
    base = getattr(model, "base_model", model)
    extra = _forward_kwargs(base)
    device = _device(model)
    bar = tqdm(total=len(sample), desc=f"trace ({lens_name})", unit="datum", disable=not config.show_progress)
    with bar, _eval_mode(model), torch.no_grad(), _latent_hooks(parts, lens):
        for rows, batch in _batches(sample, config.batch_size, pad_token_id, device):
            lens.begin_batch(rows, batch)
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
            bar.update(len(rows))
    per_datum = lens.result()
    return Trace(
        lens=lens_name,
        pooling=lens.pooling,
        num_layers=parts.num_layers,
        per_datum=per_datum,
        indices=indices,
        n_tokens=sum(len(d["input_ids"]) for d in sample),
        seconds=time.perf_counter() - started,
        chance=lens.chance(),
    )


__all__ = ["Trace", "sample_indices", "trace_model"]
