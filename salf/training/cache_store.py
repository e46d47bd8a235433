"""The frozen-prefix cache on disk: build it once, open it, read batches of cached states.

On disk (one directory, built in a temporary sibling and renamed into place, so a half-built cache is
never seen):

- ``shard-00000.safetensors``, ...: one tensor ``hidden`` each, ``[tokens, hidden_size]``, the data's
  sequences concatenated without padding, in ``float32`` or ``bfloat16``;
- ``index.safetensors``: ``index`` ``[N, 3]`` int64, per datum (shard, offset, length);
- ``manifest.json``: the keys the cache is valid for (``salf.training.cache_keys``), sizes and provenance.

A cache whose keys differ from what the caller would build now is refused; ``rebuild=True`` replaces
it. A directory that is not a salf cache is never deleted.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from salf import __version__
from salf.data.batch import collate
from salf.errors import SalfError
from salf.fileio import write_json
from salf.models.arch import ModelParts, find_parts, unwrap_peft
from salf.training.cache_keys import (
    CACHE_FORMAT,
    DTYPES,
    CacheKeys,
    data_fingerprint,
    model_key,
    tokenizer_fingerprint,
)

MANIFEST = "manifest.json"
INDEX = "index.safetensors"
DISK_MARGIN_BYTES = 64 << 20
"""Free space kept beyond the cache's own size when building (manifest, index, file-system slack)."""

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
                "build one with salf.training.cache_store.build_prefix_cache or give the directory it was built in",
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
            raise SalfError(f"datum {i} has no input_ids", "tokenize the data with salf.data.encode.load_task_data")


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


@dataclass(frozen=True)
class CacheBuild:
    """How ``build_prefix_cache`` writes a cache: the stored precision, the prefix pass's batches, the shard
    size, and whether a stale cache is replaced."""

    dtype: str = "float32"
    """Precision of the stored hidden states: a key of ``salf.training.cache_keys.DTYPES``."""
    batch_size: int = 8
    """Data per batch of the prefix pass (longest first, so little padding)."""
    rebuild: bool = False
    """Replace an existing cache whose keys differ (stale) instead of refusing it."""
    shard_bytes: int = 1 << 30
    """Largest shard file; a datum's states are never split across shards."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SalfError(f"unknown cache dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if self.batch_size < 1 or self.shard_bytes < 1:
            raise SalfError(
                f"batch_size and shard_bytes must be positive, got {self.batch_size}, {self.shard_bytes}"
            )


def build_prefix_cache(
    model: nn.Module,
    data: Sequence[dict],
    boundary: int,
    out_dir: str | os.PathLike,
    *,
    build: CacheBuild = CacheBuild(),
    tokenizer: Any = None,
    show_progress: bool = True,
    device: torch.device | str | None = None,
) -> PrefixCache:
    """Run the frozen prefix (embeddings and blocks ``0..boundary-1``, eval mode, no grad) over ``data``
    once and store every datum's output in ``out_dir``; returns the opened cache.

    An existing cache with the same keys is reused as it is; one with other keys (stale) is refused with
    a ``SalfError`` unless ``build.rebuild``; a non-empty directory that is not a cache is always refused.
    Data are run longest first in batches of ``build.batch_size`` (little padding); the suffix is never run.
    Needs ``N_tokens x hidden_size x (4 | 2)`` bytes on disk, checked before anything is written.
    ``device``: run the prefix there, moving the model there first (as the ``Trainer`` would) and leaving
    it there; None runs it where the model is.
    """
    dtype, batch_size, rebuild, shard_bytes = build.dtype, build.batch_size, build.rebuild, build.shard_bytes
    _check_data(data)
    inner = unwrap_peft(model)
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


