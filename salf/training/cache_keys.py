"""What a frozen-prefix cache is valid for: fingerprints of the model's prefix, the data and the tokenizer.

A cache built for other keys is *stale*: ``salf.training.cache_store`` refuses it with a ``SalfError``
naming what changed (``CacheKeys.differences``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from salf.errors import SalfError
from salf.fileio import fingerprint
from salf.models.arch import ModelParts, find_parts, unwrap_peft

CACHE_FORMAT = 1
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_VOLATILE_CONFIG = (
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "id2label",
    "label2id",
)
_SAMPLE = 4096


def feeds_prefix(group: str, boundary: int) -> bool:
    """Does a parameter group feed the prefix output (the input of block ``boundary``)?"""
    if group in ("embeddings", "other"):
        return True
    if group.startswith("block:"):
        return int(group.split(":", 1)[1]) < boundary
    return False


def prefix_weights_fingerprint(model: nn.Module, boundary: int, parts: ModelParts | None = None) -> str:
    """Hash of the names, shapes, dtypes and values of everything the prefix computes with.

    Covers the embeddings, blocks ``0..boundary-1`` and parameters/buffers outside every group (rotary
    tables...). Large tensors are hashed by a strided sample of 4096 values plus their float64 sum, so a
    7B model's prefix hashes in well under a second while any fine-tuned or re-initialised weight shows.
    """
    inner = unwrap_peft(model)
    parts = parts if parts is not None else find_parts(inner)
    h = hashlib.sha256()
    named = [*inner.named_parameters(), *inner.named_buffers()]
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if not feeds_prefix(parts.group_of(name), boundary):
            continue
        t = tensor.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\x00".encode())
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE]
        if sample.is_floating_point() or sample.is_complex():
            h.update(sample.to(torch.float64).cpu().numpy().tobytes())
            h.update(np.float64(flat.to(torch.float64).sum().item()).tobytes())
        else:
            h.update(sample.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_key(model: nn.Module, boundary: int, parts: ModelParts | None = None) -> dict[str, Any]:
    """What identifies the prefix computation: type, depth, config fingerprint, prefix weights.

    Like ``salf.method.plan.model_fingerprint`` (same config hash) but over the prefix's parameters only, so
    adapters placed on the trained suffix (LoRA) leave a cache valid, and a model with other weights
    in the prefix does not.
    """
    inner = unwrap_peft(model)
    parts = parts if parts is not None else find_parts(inner)
    config = inner.config.to_dict()
    for volatile in _VOLATILE_CONFIG:
        config.pop(volatile, None)
    return {
        "model_type": parts.model_type,
        "num_layers": parts.num_layers,
        "config": fingerprint(config),
        "prefix_weights": prefix_weights_fingerprint(inner, boundary, parts),
    }


def data_fingerprint(data: Sequence[dict]) -> str:
    """Hash of every datum's ``input_ids`` in order (labels do not change the prefix output)."""
    h = hashlib.sha256()
    h.update(str(len(data)).encode())
    for datum in data:
        ids = np.asarray(datum["input_ids"], dtype=np.int64)
        h.update(np.int64(ids.size).tobytes())
        h.update(ids.tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """Hash of a tokenizer's class, vocabulary and special tokens (None when there is no tokenizer)."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    specials = getattr(tokenizer, "special_tokens_map", {}) or {}
    return fingerprint(
        type(tokenizer).__name__, sorted(vocab.items()), {k: str(v) for k, v in specials.items()}
    )


@dataclass(frozen=True)
class CacheKeys:
    """What a prefix cache is valid for: any difference makes the cache stale."""

    model: dict[str, Any]
    """``model_key``: model type, depth, config fingerprint and prefix weights fingerprint."""
    boundary: int
    """First trainable block k: the cache holds the input of block k (the output of block k-1)."""
    data: str
    """``data_fingerprint`` of the training data's token ids, in order."""
    tokenizer: str | None
    """``tokenizer_fingerprint`` of the tokenizer the data were made with (None: none given)."""
    dtype: str
    """Storage dtype, a ``DTYPES`` name."""
    format: int = CACHE_FORMAT
    """On-disk layout version."""

    def __post_init__(self) -> None:
        if not isinstance(self.boundary, int) or self.boundary < 1:
            raise SalfError(
                f"a prefix cache needs a boundary of at least 1, got {self.boundary!r}",
                "boundary 0 is full fine-tuning: nothing is frozen, so there is no prefix to cache",
            )
        if self.dtype not in DTYPES:
            raise SalfError(f"unknown cache dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")

    @classmethod
    def compute(
        cls,
        model: nn.Module,
        data: Sequence[dict],
        boundary: int,
        dtype: str = "float32",
        tokenizer: Any = None,
    ) -> CacheKeys:
        return cls(
            model=model_key(model, boundary),
            boundary=boundary,
            data=data_fingerprint(data),
            tokenizer=tokenizer_fingerprint(tokenizer),
            dtype=dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "model": dict(self.model),
            "boundary": self.boundary,
            "data": self.data,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
        }

    def differences(self, other: CacheKeys) -> list[str]:
        """Names of the keys that differ ('model.prefix_weights', 'boundary', 'data', ...)."""
        mine, theirs = self.to_dict(), other.to_dict()
        out = []
        for key in mine:
            if key == "model":
                names = sorted(set(mine["model"]) | set(theirs["model"]))
                out += [f"model.{n}" for n in names if mine["model"].get(n) != theirs["model"].get(n)]
            elif mine[key] != theirs[key]:
                out.append(key)
        return out


