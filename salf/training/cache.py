"""Frozen-prefix activation cache: compute the input of the first trainable block once, train from it.

With boundary k (METHOD.md section 5), the embeddings and blocks ``0..k-1`` are frozen and run in eval
mode without autograd, so a datum's hidden states at the input of block k never change during
training. ``build_prefix_cache`` runs that prefix once over the training data and stores each datum's
``[length, hidden]`` states on disk; training then feeds them into block k instead of recomputing the
prefix every epoch, removing the prefix's forward cost too.

On disk (one directory, built in a temporary sibling and renamed into place, so a half-built cache is
never seen):

- ``shard-00000.safetensors``, ...: one tensor ``hidden`` each, ``[tokens, hidden_size]``, the data's
  sequences concatenated without padding, in ``float32`` or ``bfloat16``;
- ``index.safetensors``: ``index`` ``[N, 3]`` int64, per datum (shard, offset, length);
- ``manifest.json``: the keys the cache is valid for, sizes and provenance.

The keys (``CacheKeys``): the model (type, depth, a fingerprint of its config, and a fingerprint of the
prefix's weights, buffers and dtypes), the boundary, the token ids of every datum, the tokenizer and the
storage dtype. A cache whose keys differ from what the caller would build now is *stale* and refused with
a ``SalfError`` naming what changed; ``rebuild=True`` replaces it. A directory that is not a salf cache
is never deleted.

Training from the cache (``attach_prefix_cache``) keeps the model's own forward: the embeddings still run
(a cheap gather that lets the model build its attention masks, position ids and rotary embeddings as
usual), every frozen block ``j < k`` has its ``forward`` replaced for the duration by one that returns
the cached hidden states in the block's own output structure instead of computing anything, so block k
receives exactly what the frozen prefix would have given it. The batch carries the cached states under
the key ``salf_prefix`` (added by ``CachedPrefixCollator`` from the datum index that ``IndexedDataset``
adds); a forward pre-hook on the model takes the key out before the model's ``forward`` sees it. A
forward without ``salf_prefix`` (evaluation) runs the real prefix. ``salf.training.trainer.train`` does all of this
when ``TrainConfig.prefix_cache`` names a directory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from salf import __version__
from salf.data.batch import ListDataset, collate
from salf.errors import SalfError
from salf.fileio import fingerprint, write_json
from salf.models.arch import ModelParts, find_parts
from salf.training.distributed import is_distributed, is_main_process

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
INDEX = "index.safetensors"
PREFIX_KEY = "salf_prefix"
"""Batch key holding the cached hidden states [B, T, H] (taken out before the model's forward)."""
INDEX_KEY = "salf_index"
"""Datum key holding the datum's position in the training data (added by ``IndexedDataset``)."""
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DISK_MARGIN_BYTES = 64 << 20
"""Free space kept beyond the cache's own size when building (manifest, index, file-system slack)."""
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


def _inner(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper, or the model itself."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _prefix_group(group: str, boundary: int) -> bool:
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
    inner = _inner(model)
    parts = parts if parts is not None else find_parts(inner)
    h = hashlib.sha256()
    named = [*inner.named_parameters(), *inner.named_buffers()]
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if not _prefix_group(parts.group_of(name), boundary):
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
    inner = _inner(model)
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


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def check_disk_space(path: str | os.PathLike, needed_bytes: int) -> None:
    """Raise a ``SalfError`` when the file system holding ``path`` has less than ``needed_bytes`` free
    (plus ``DISK_MARGIN_BYTES``)."""
    free = _free_bytes(Path(path))
    if needed_bytes + DISK_MARGIN_BYTES > free:
        raise SalfError(
            f"the prefix cache needs {_gib(needed_bytes)} (+ {_gib(DISK_MARGIN_BYTES)} margin) but only "
            f"{_gib(free)} is free on the file system of {path}",
            "free some space, put the cache on another disk, or store it as dtype='bfloat16' (half the size)",
        )


@dataclass
class PrefixCache:
    """An opened prefix cache: per-datum hidden states at the input of block ``keys.boundary``."""

    path: Path
    """The cache directory."""
    keys: CacheKeys
    """What the cache is valid for."""
    hidden_size: int
    """H, the width of every stored row."""
    index: np.ndarray
    """[N, 3] int64: shard, offset (in tokens), length of each datum."""
    shards: list[str]
    """Shard file names, in shard order."""
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)
    """The manifest as read (sizes, timings, provenance)."""
    reused: bool = False
    """Set by ``build_prefix_cache``: True when an existing valid cache was returned instead of built."""
    _handles: dict[int, Any] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.index = np.asarray(self.index, dtype=np.int64)
        if self.index.ndim != 2 or self.index.shape[1] != 3:
            raise SalfError(
                f"the prefix cache index in {self.path} is damaged", "rebuild the cache (rebuild=True)"
            )
        if self.hidden_size < 1:
            raise SalfError(
                f"the prefix cache in {self.path} has hidden size {self.hidden_size}", "rebuild the cache"
            )
        if len(self.index) and (self.index[:, 0].max() >= len(self.shards) or self.index[:, 0].min() < 0):
            raise SalfError(
                f"the prefix cache index in {self.path} names missing shards", "rebuild the cache"
            )

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers reopen the shards themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    @property
    def boundary(self) -> int:
        return self.keys.boundary

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.keys.dtype]

    @property
    def n_tokens(self) -> int:
        return int(self.index[:, 2].sum()) if len(self.index) else 0

    @classmethod
    def open(cls, path: str | os.PathLike) -> PrefixCache:
        """Open the cache in ``path`` (no check of its keys: see ``check``)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise SalfError(
                f"{path} is not a salf prefix cache (no {MANIFEST})",
                "build one with salf.training.cache.build_prefix_cache or give the directory it was built in",
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            keys_dict = manifest["keys"]
            if int(keys_dict.get("format", 0)) != CACHE_FORMAT:
                raise SalfError(
                    f"the prefix cache in {path} has format {keys_dict.get('format')}, this salf reads {CACHE_FORMAT}",
                    "rebuild the cache (rebuild=True)",
                )
            keys = CacheKeys(
                model=dict(keys_dict["model"]),
                boundary=int(keys_dict["boundary"]),
                data=str(keys_dict["data"]),
                tokenizer=keys_dict.get("tokenizer"),
                dtype=str(keys_dict["dtype"]),
                format=int(keys_dict["format"]),
            )
            with safe_open(str(path / INDEX), framework="pt") as f:
                index = f.get_tensor("index").numpy()
            return cls(
                path=path,
                keys=keys,
                hidden_size=int(manifest["hidden_size"]),
                index=index,
                shards=list(manifest["shards"]),
                manifest=manifest,
            )
        except SalfError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SalfError(
                f"the prefix cache in {path} is damaged ({type(exc).__name__}: {exc})",
                "rebuild the cache (rebuild=True)",
            ) from exc

    def check(self, expected: CacheKeys) -> None:
        """Refuse a stale cache: raise a ``SalfError`` naming every key that differs from ``expected``."""
        diff = self.keys.differences(expected)
        if diff:
            raise SalfError(
                f"the prefix cache in {self.path} is stale: {', '.join(diff)} differ from the current "
                "model, plan and data, so its hidden states are not what the frozen prefix computes now",
                "rebuild it (rebuild=True, or delete the directory), or point to a fresh cache directory",
            )

    def _handle(self, shard: int) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            file = self.path / self.shards[shard]
            if not file.is_file():
                raise SalfError(f"prefix cache shard {file} is missing", "rebuild the cache (rebuild=True)")
            handle = self._handles[shard] = safe_open(str(file), framework="pt")
        return handle

    def get(self, i: int) -> torch.Tensor:
        """Datum ``i``'s hidden states, ``[length, hidden_size]`` in the storage dtype."""
        if not 0 <= i < len(self):
            raise SalfError(f"datum {i} is not in the prefix cache (it holds {len(self)} data)")
        shard, offset, length = (int(v) for v in self.index[i])
        return self._handle(shard).get_slice("hidden")[offset : offset + length]

    def batch(self, indices: Sequence[int], width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[len(indices), width, hidden_size]``: each datum's rows, right-padded with zeros (like ``collate``)."""
        out = torch.zeros((len(indices), width, self.hidden_size), dtype=dtype or self.dtype)
        for row, i in enumerate(indices):
            states = self.get(int(i))
            if states.shape[0] > width:
                raise SalfError(
                    f"cached datum {i} has {states.shape[0]} tokens but its batch is {width} wide",
                    "the data changed since the cache was built: rebuild it",
                )
            out[row, : states.shape[0]] = states
        return out

    def close(self) -> None:
        self._handles.clear()


class _StopForward(Exception):
    """Raised by the capture hook once block k-1 has run: the suffix is not needed to build a cache."""


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise SalfError(f"cannot read the hidden states from a block output of type {type(value).__name__}")


def _check_data(data: Sequence[dict]) -> None:
    if not data:
        raise SalfError("the data to cache is empty", "give at least one datum")
    for i, datum in enumerate(data):
        if not isinstance(datum, dict) or not datum.get("input_ids"):
            raise SalfError(f"datum {i} has no input_ids", "tokenize the data with salf.data.files")


def _replace_dir(tmp: Path, out: Path, keys: CacheKeys, replace_existing: bool) -> None:
    """Move the finished ``tmp`` to ``out`` atomically. ``replace_existing`` (rebuild): the cache that was
    there when the build began is swapped out; otherwise a cache that appeared meanwhile (another process
    built it) is kept when its keys match, and this build is dropped."""
    old: Path | None = None
    if replace_existing and out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        # Another process finished first: keep its cache if it is the same one.
        other = PrefixCache.open(out)
        other.check(keys)
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_prefix_cache(
    model: nn.Module,
    data: Sequence[dict],
    boundary: int,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    batch_size: int = 8,
    tokenizer: Any = None,
    rebuild: bool = False,
    shard_bytes: int = 1 << 30,
    show_progress: bool = True,
    device: torch.device | str | None = None,
) -> PrefixCache:
    """Run the frozen prefix (embeddings and blocks ``0..boundary-1``, eval mode, no grad) over ``data``
    once and store every datum's output in ``out_dir``; returns the opened cache.

    An existing cache with the same keys is reused as it is; one with other keys (stale) is refused with
    a ``SalfError`` unless ``rebuild``; a non-empty directory that is not a cache is always refused.
    Data are run longest first in batches of ``batch_size`` (little padding); the suffix is never run.
    Needs ``N_tokens x hidden_size x (4 | 2)`` bytes on disk, checked before anything is written.
    ``device``: run the prefix there, moving the model there first (as the ``Trainer`` would) and leaving
    it there; None runs it where the model is.
    """
    if dtype not in DTYPES:
        raise SalfError(f"unknown cache dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if batch_size < 1 or shard_bytes < 1:
        raise SalfError(f"batch_size and shard_bytes must be positive, got {batch_size}, {shard_bytes}")
    _check_data(data)
    inner = _inner(model)
    parts = find_parts(inner)
    if not 1 <= boundary <= parts.num_layers:
        raise SalfError(
            f"a prefix cache needs a boundary in 1..{parts.num_layers}, got {boundary}",
            "boundary 0 is full fine-tuning: nothing is frozen, so there is no prefix to cache",
        )
    out = Path(out_dir)
    keys = CacheKeys(
        model=model_key(inner, boundary, parts),
        boundary=boundary,
        data=data_fingerprint(data),
        tokenizer=tokenizer_fingerprint(tokenizer),
        dtype=dtype,
    )
    replace_existing = (out / MANIFEST).is_file()  # only a rebuild replaces a cache
    if replace_existing:
        existing = PrefixCache.open(out)
        if not existing.keys.differences(keys):
            if not rebuild:
                existing.reused = True
                return existing
        elif not rebuild:
            existing.check(keys)  # raises: stale
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SalfError(
            f"{out} exists and is not a salf prefix cache", "give an empty or new directory for the cache"
        )

    hidden = int(inner.config.hidden_size) if hasattr(inner.config, "hidden_size") else None
    lengths = np.array([len(d["input_ids"]) for d in data], dtype=np.int64)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if hidden is not None:
        check_disk_space(out.parent, int(lengths.sum()) * hidden * itemsize + len(data) * 24)
    out.parent.mkdir(parents=True, exist_ok=True)
    if device is not None:
        inner.to(device)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        info = _compute(
            inner, parts, data, lengths, boundary, tmp, DTYPES[dtype], batch_size, shard_bytes, show_progress
        )
        manifest = {
            "keys": keys.to_dict(),
            "hidden_size": info["hidden_size"],
            "n_data": len(data),
            "n_tokens": int(lengths.sum()),
            "bytes": info["bytes"],
            "shards": info["shards"],
            "build_seconds": info["seconds"],
            "name_or_path": getattr(inner.config, "_name_or_path", "") or "",
            "salf_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(tmp / MANIFEST, manifest)
        _replace_dir(tmp, out, keys, replace_existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrefixCache.open(out)


def _compute(
    inner: nn.Module,
    parts: ModelParts,
    data: Sequence[dict],
    lengths: np.ndarray,
    boundary: int,
    tmp: Path,
    dtype: torch.dtype,
    batch_size: int,
    shard_bytes: int,
    show_progress: bool,
) -> dict[str, Any]:
    import time

    start = time.perf_counter()
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(_first_tensor(output))
        raise _StopForward

    device = next(inner.parameters()).device
    order = np.argsort(-lengths, kind="stable")
    index = np.zeros((len(data), 3), dtype=np.int64)
    shards: list[str] = []
    buffer: list[torch.Tensor] = []
    buffered = 0
    total_bytes = 0
    hidden_size = 0

    def flush() -> None:
        nonlocal buffered, total_bytes
        if not buffer:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensor = torch.cat(buffer).contiguous()
        save_file({"hidden": tensor}, str(tmp / name))
        total_bytes += tensor.numel() * tensor.element_size()
        shards.append(name)
        buffer.clear()
        buffered = 0

    was_training = inner.training
    handle = parts.blocks[boundary - 1].register_forward_hook(capture)
    bar = tqdm(
        total=len(data),
        desc=f"prefix cache (blocks 0..{boundary - 1})",
        unit="datum",
        disable=not show_progress,
    )
    try:
        inner.eval()
        with torch.no_grad():
            for start_row in range(0, len(order), batch_size):
                rows = [int(i) for i in order[start_row : start_row + batch_size]]
                batch = collate([{"input_ids": data[i]["input_ids"], "labels": 0} for i in rows], 0)
                captured.clear()
                try:
                    inner(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                    )
                except _StopForward:
                    pass
                if not captured:
                    raise SalfError(
                        f"block {boundary - 1} never ran in the model's forward", "check the model"
                    )
                states = captured[0].detach().to("cpu", dtype)
                hidden_size = int(states.shape[-1])
                for row, i in enumerate(rows):
                    n = int(lengths[i])
                    if buffered and (buffered + n) * hidden_size * states.element_size() > shard_bytes:
                        flush()
                    index[i] = (len(shards), buffered, n)
                    buffer.append(states[row, :n].clone())
                    buffered += n
                bar.update(len(rows))
        flush()
    finally:
        bar.close()
        handle.remove()
        inner.train(was_training)
    save_file({"index": torch.from_numpy(index)}, str(tmp / INDEX))
    return {
        "hidden_size": hidden_size,
        "shards": shards,
        "bytes": total_bytes,
        "seconds": time.perf_counter() - start,
    }


# -- training from the cache ------------------------------------------------------------------------


class IndexedDataset(ListDataset):
    """A list of data whose items carry their position under ``INDEX_KEY`` (for per-datum lookups)."""

    def __getitem__(self, index: int) -> dict:
        return {**self.data[index], INDEX_KEY: int(index)}


def pop_indices(data: Sequence[dict]) -> tuple[list[dict], list[int] | None]:
    """Split the ``INDEX_KEY`` off a batch of items; None when the items carry none (evaluation)."""
    if not data or INDEX_KEY not in data[0]:
        return list(data), None
    return [{k: v for k, v in d.items() if k != INDEX_KEY} for d in data], [int(d[INDEX_KEY]) for d in data]


class CachedPrefixCollator:
    """``collate`` plus, for indexed training items, the cached prefix states under ``PREFIX_KEY``."""

    def __init__(self, pad_token_id: int, cache: PrefixCache, dtype: torch.dtype = torch.float32):
        self.pad_token_id = pad_token_id
        self.cache = cache
        self.dtype = dtype

    def __call__(self, data: Sequence[dict]) -> dict[str, torch.Tensor]:
        items, indices = pop_indices(data)
        batch = collate(items, self.pad_token_id)
        if indices is not None:
            for item, i in zip(items, indices):
                n = int(self.cache.index[i, 2]) if 0 <= i < len(self.cache) else -1
                if n != len(item["input_ids"]):
                    raise SalfError(
                        f"training datum {i} has {len(item['input_ids'])} tokens but the prefix cache holds {n}",
                        "the data changed since the cache was built: rebuild it",
                    )
            batch[PREFIX_KEY] = self.cache.batch(indices, batch["input_ids"].shape[1], self.dtype)
        return batch


@dataclass
class _SkipState:
    hidden: torch.Tensor | None = None
    """The cached states of the forward in progress (None: run the real prefix)."""
    wrap: dict[type, Callable[[torch.Tensor], Any]] = field(default_factory=dict)
    """Per block class, how to dress hidden states as that block's output (learnt from one real call)."""


def _output_wrapper(output: Any) -> Callable[[torch.Tensor], Any]:
    """From one real block output, a function that puts other hidden states in the same structure."""
    if isinstance(output, torch.Tensor):
        return lambda h: h
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        if any(extra is not None for extra in output[1:]):
            raise SalfError(
                "the frozen blocks return more than hidden states (attention weights or a key/value cache), "
                "which a cached prefix cannot reproduce",
                "train with output_attentions=False and use_cache=False",
            )
        n = len(output)
        return lambda h: (h, *([None] * (n - 1)))
    raise SalfError(f"a block returned {type(output).__name__}, which a cached prefix cannot stand in for")


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


@dataclass
class CacheAttachment:
    """Hooks that make a model train from cached prefix states; ``remove()`` takes them off."""

    boundary: int
    """Blocks ``0..boundary-1`` are skipped when a batch brings ``salf_prefix``."""
    skipped_forwards: int = 0
    """Forwards that ran from the cache (the prefix skipped)."""
    _model: nn.Module | None = field(repr=False, default=None)
    _saved: list[tuple[nn.Module, Any]] = field(repr=False, default_factory=list)
    _handles: list[Any] = field(repr=False, default_factory=list)
    removed: bool = False

    def __post_init__(self) -> None:
        if self.boundary < 1:
            raise SalfError(f"a cache attachment needs boundary >= 1, got {self.boundary}")

    def remove(self) -> None:
        if self.removed:
            return
        for handle in self._handles:
            handle.remove()
        for block, previous in self._saved:
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous
        self._handles.clear()
        self._saved.clear()
        self.removed = True


def attach_prefix_cache(model: nn.Module, boundary: int) -> CacheAttachment:
    """Let ``model`` take its prefix output from the batch key ``salf_prefix`` instead of computing it.

    ``model`` is what the training loop calls (a PEFT wrapper is fine). While a forward brings
    ``salf_prefix`` ([B, T, H], what ``CachedPrefixCollator`` adds), blocks ``0..boundary-1`` return it
    in their own output structure without computing anything (the structure is learnt from one real
    call of the first block, on the first cached forward); without it, the model runs unchanged.
    Parameters of the skipped part must be frozen: a cached prefix cannot train them.
    """
    inner = _inner(model)
    parts = find_parts(inner)
    if not 1 <= boundary <= parts.num_layers:
        raise SalfError(f"boundary {boundary} is outside 1..{parts.num_layers} for this model")
    trainable = [
        name
        for name, p in inner.named_parameters()
        if p.requires_grad
        and _prefix_group(parts.group_of(name), boundary)
        and parts.group_of(name) != "other"
    ]
    if trainable:
        raise SalfError(
            f"the prefix cache skips blocks 0..{boundary - 1}, but {trainable[0]} there is trainable",
            "apply a plan whose first trainable block is at or above the cache's boundary (salf.method.freeze.apply_plan)",
        )
    state = _SkipState()
    attachment = CacheAttachment(boundary=boundary, _model=model)

    def take_prefix(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = kwargs.pop(PREFIX_KEY, None)
        state.hidden = hidden if isinstance(hidden, torch.Tensor) else None
        if state.hidden is not None:
            attachment.skipped_forwards += 1
        return args, kwargs

    def drop_prefix(module: nn.Module, args: Any, output: Any) -> None:
        state.hidden = None

    def skipping(block: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if state.hidden is None:
                return original(*args, **kwargs)
            x = _hidden_arg(args, kwargs)
            wrap = state.wrap.get(type(block))
            if wrap is None:
                with torch.no_grad():
                    wrap = state.wrap[type(block)] = _output_wrapper(original(*args, **kwargs))
            h = state.hidden
            if x is not None:
                if tuple(x.shape) != tuple(h.shape):
                    raise SalfError(
                        f"the cached prefix states have shape {tuple(h.shape)} but the batch's hidden states "
                        f"have {tuple(x.shape)}",
                        "cached training needs right-padded batches made by CachedPrefixCollator",
                    )
                h = h.to(device=x.device, dtype=x.dtype)
            return wrap(h)

        return forward

    for block in list(parts.blocks)[:boundary]:
        previous = block.__dict__.get("forward")
        attachment._saved.append((block, previous))
        block.forward = skipping(block, block.forward)
    attachment._handles.append(model.register_forward_pre_hook(take_prefix, with_kwargs=True))
    attachment._handles.append(model.register_forward_hook(drop_prefix, always_call=True))
    return attachment


@dataclass
class CachedTraining:
    """Everything ``salf.training.trainer.train`` swaps in to train from a prefix cache."""

    cache: PrefixCache
    dataset: IndexedDataset
    collator: CachedPrefixCollator
    attachment: CacheAttachment

    def metrics(self) -> dict[str, Any]:
        """What ``salf.training.trainer.train`` adds to metrics.json."""
        return {
            "prefix_cache": {
                "path": str(self.cache.path),
                "boundary": self.cache.boundary,
                "dtype": self.cache.keys.dtype,
                "n_data": len(self.cache),
                "n_tokens": self.cache.n_tokens,
                "bytes": self.cache.manifest.get("bytes"),
                "build_seconds": self.cache.manifest.get("build_seconds"),
                "reused": self.cache.reused,
                "cached_forwards": self.attachment.skipped_forwards,
            }
        }

    def remove(self) -> None:
        self.attachment.remove()
        self.cache.close()


def prepare_cached_training(
    model: nn.Module,
    train_data: Sequence[dict],
    boundary: int,
    cache_dir: str | os.PathLike,
    pad_token_id: int,
    *,
    tokenizer: Any = None,
    dtype: str = "float32",
    rebuild: bool = False,
    batch_size: int = 8,
    show_progress: bool = False,
    device: torch.device | str | None = None,
) -> CachedTraining:
    """Build (or reuse, after checking its keys) the cache of ``train_data`` at ``boundary`` and attach it.

    Call it after the plan is applied (the prefix must be frozen) and before the ``Trainer`` is built;
    use the returned ``dataset`` and ``collator`` for training and ``remove()`` afterwards. ``device``:
    where to run the prefix while building (the training device: the model is moved there). Under a
    process group the main process builds while the others wait at a barrier (build a cache that takes
    longer than the group's timeout beforehand, in one process).
    """
    build = dict(dtype=dtype, batch_size=batch_size, tokenizer=tokenizer, rebuild=rebuild, device=device)
    if is_distributed():
        # One process builds (or reuses) the cache, the others wait for it, then open and check it.
        keys = CacheKeys.compute(model, train_data, boundary, dtype, tokenizer)
        if (Path(cache_dir) / MANIFEST).is_file() and not rebuild:
            PrefixCache.open(cache_dir).check(keys)  # stale: every rank refuses it, none waits
        if is_main_process():
            cache = build_prefix_cache(
                model, train_data, boundary, cache_dir, show_progress=show_progress, **build
            )
            dist.barrier()
        else:
            dist.barrier()
            cache = PrefixCache.open(cache_dir)
            cache.check(keys)
            cache.reused = True
    else:
        cache = build_prefix_cache(
            model, train_data, boundary, cache_dir, show_progress=show_progress, **build
        )
    param = next(_inner(model).parameters())
    attachment = attach_prefix_cache(model, boundary)
    return CachedTraining(
        cache=cache,
        dataset=IndexedDataset(train_data),
        collator=CachedPrefixCollator(pad_token_id, cache, dtype=param.dtype),
        attachment=attachment,
    )


__all__ = [
    "CacheAttachment",
    "CacheKeys",
    "CachedPrefixCollator",
    "CachedTraining",
    "IndexedDataset",
    "PrefixCache",
    "attach_prefix_cache",
    "build_prefix_cache",
    "check_disk_space",
    "data_fingerprint",
    "model_key",
    "prepare_cached_training",
    "tokenizer_fingerprint",
]
