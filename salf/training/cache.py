"""Frozen-prefix activation cache: compute the input of the first trainable block once, train from it.

With boundary k (METHOD.md section 5), the embeddings and blocks ``0..k-1`` are frozen and run in eval
mode without autograd, so a datum's hidden states at the input of block k never change during
training. ``build_prefix_cache`` runs that prefix once over the training data and stores each datum's
``[length, hidden]`` states on disk; training then feeds them into block k instead of recomputing the
prefix every epoch, removing the prefix's forward cost too.

The cache itself (building, the files on disk) is ``salf.training.cache_store``; what it is valid for,
``salf.training.cache_keys``.

Training from the cache (``attach_prefix_cache``) keeps the model's own forward: the embeddings still run
(a cheap gather that lets the model build its attention masks, position ids and rotary embeddings as
usual), every frozen block ``j < k`` has its ``forward`` replaced for the duration by one that returns
the cached hidden states in the block's own output structure instead of computing anything, so block k
receives exactly what the frozen prefix would have given it. The batch carries the cached states under
the key ``salf_prefix`` (added by ``CachedPrefixCollator`` from the datum index that ``IndexedDataset``
adds); a forward pre-hook on the model takes the key out before the model's ``forward`` sees it. A
forward without ``salf_prefix`` (evaluation) runs the real prefix. ``salf.training.run.train`` does all of this
(``PrefixCacheStrategy``) when ``TrainConfig.prefix_cache`` names a directory.
"""


from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from salf.data.batch import collate
from salf.errors import SalfError
from salf.method.freeze import FreezeReport, FreezeSpec
from salf.models.arch import find_parts, unwrap_peft
from salf.training.cache_keys import CacheKeys, feeds_prefix
from salf.training.cache_store import MANIFEST, CacheBuild, PrefixCache, build_prefix_cache
from salf.training.config import TrainConfig
from salf.training.distributed import is_distributed, is_main_process
from salf.training.strategy import IndexedDataset, pop_indices

PREFIX_KEY = "salf_prefix"
"""Batch key holding the cached hidden states [B, T, H] (taken out before the model's forward)."""

# -- training from the cache ------------------------------------------------------------------------


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
    inner = unwrap_peft(model)
    parts = find_parts(inner)
    if not 1 <= boundary <= parts.num_layers:
        raise SalfError(f"boundary {boundary} is outside 1..{parts.num_layers} for this model")
    trainable = [
        name
        for name, p in inner.named_parameters()
        if p.requires_grad
        and feeds_prefix(parts.group_of(name), boundary)
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
    """The ``Batching`` of the prefix-cache strategy: what the loop swaps in to train from the cache."""

    cache: PrefixCache
    dataset: IndexedDataset
    collator: CachedPrefixCollator
    attachment: CacheAttachment

    sampler = None  # the Trainer's own batches: every datum has the same boundary

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        """What the run adds to metrics.json."""
        metrics["prefix_cache"] = {
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

    def remove(self) -> None:
        self.attachment.remove()
        self.cache.close()


def prepare_cached_training(
    model: nn.Module,
    train_data: Sequence[dict],
    boundary: int,
    pad_token_id: int,
    config: TrainConfig,
    *,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
) -> CachedTraining:
    """Build (or reuse, after checking its keys) the cache of ``train_data`` at ``boundary`` and attach it.

    The cache is ``config.prefix_cache``, stored in ``config.prefix_cache_dtype``, replaced when stale if
    ``config.prefix_cache_rebuild``, built in batches of ``config.eval_batch_size or config.batch_size``
    with a progress bar if ``config.show_progress``.

    Call it after the plan is applied (the prefix must be frozen) and before the ``Trainer`` is built;
    use the returned ``dataset`` and ``collator`` for training and ``remove()`` afterwards. ``device``:
    where to run the prefix while building (the training device: the model is moved there). Under a
    process group the main process builds while the others wait at a barrier (build a cache that takes
    longer than the group's timeout beforehand, in one process).
    """
    if config.prefix_cache is None:
        raise SalfError("the config names no prefix cache", "set TrainConfig.prefix_cache to a directory")
    cache_dir, dtype, rebuild = config.prefix_cache, config.prefix_cache_dtype, config.prefix_cache_rebuild
    show_progress = config.show_progress
    build = dict(build=CacheBuild(dtype=dtype, batch_size=config.eval_batch_size or config.batch_size,
                                  rebuild=rebuild), tokenizer=tokenizer, device=device)
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
    param = next(unwrap_peft(model).parameters())
    attachment = attach_prefix_cache(model, boundary)
    return CachedTraining(
        cache=cache,
        dataset=IndexedDataset(train_data),
        collator=CachedPrefixCollator(pad_token_id, cache, dtype=param.dtype),
        attachment=attachment,
    )


@dataclass
class PrefixCacheStrategy:
    """Train from a frozen-prefix cache in ``config.prefix_cache`` (a ``TrainingStrategy``)."""

    def plan_spec(
        self, spec: FreezeSpec | None, n_data: int, num_layers: int, config: TrainConfig
    ) -> FreezeSpec | None:
        return spec

    def prepare(
        self,
        model: nn.Module,
        train_data: Sequence[dict],
        report: FreezeReport,
        pad_id: int,
        tokenizer: Any,
        config: TrainConfig,
        device: torch.device,
    ) -> CachedTraining:
        return prepare_cached_training(
            model,
            train_data,
            report.prefix_blocks,
            pad_id,
            config,
            tokenizer=tokenizer,
            device=device,  # build on the training device, where the Trainer puts the model anyway
        )


__all__ = [
    "CacheAttachment",
    "CachedPrefixCollator",
    "CachedTraining",
    "PrefixCacheStrategy",
    "attach_prefix_cache",
    "prepare_cached_training",
]
