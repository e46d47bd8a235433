"""Counting one pass of a training step: FLOPs (``FlopCounterMode``) and the bytes autograd saves for
backward (``saved_tensors_hooks``), per block, with the model cut at every block boundary (``_Probe``).

``measure_step_flops`` counts a real step of a real model the same way (used to check the profile).
``labelled_positions`` and ``projected_forward`` are the forward of a training step that projects only the
labelled positions through a causal LM's head: the trainer (``salf.training.hf_trainer``) trains with them and the
profile counts them, so both run the same operators.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from salf.data.batch import IGNORE_INDEX
from salf.errors import SalfError
from salf.models.arch import ModelParts


def _flop_mode() -> tuple[Any, Callable[[], int]]:
    """A dispatch mode that counts FLOPs exactly as ``FlopCounterMode`` does, and a reader of the total.

    ``FlopCounterMode`` also tracks the module hierarchy with global hooks, which the profile does
    not need (it cuts the model itself) and which nearly doubles the time of a meta-device pass.
    Its inner dispatch mode, used alone, applies the same FLOP formulas and decompositions.
    """
    counter = FlopCounterMode(display=False)
    try:
        from torch.utils.flop_counter import _FlopCounterMode

        return _FlopCounterMode(counter), counter.get_total_flops
    except ImportError:  # private class moved: use the public counter, hooks and all
        return counter, counter.get_total_flops


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):  # tensor subclasses without a storage
        return None


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage (its own size where it has none)."""
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, AttributeError):
        return t.numel() * t.element_size()


class _SavedBytes:
    """Adds up the bytes autograd saves for backward: once per storage, parameters excluded.

    ``part()`` names who is running (the bytes are attributed to it). Storages in ``shared`` (tensors
    every block receives) are counted once per part in ``shared_bytes`` instead, since all blocks
    save the same one.
    """

    def __init__(self, model: nn.Module, part: Callable[[], Any] = lambda: None):
        self.exclude = {k for p in model.parameters() if (k := _storage_key(p)) is not None}
        self.part = part
        self.shared: set[int] = set()
        self._alive: list[torch.Tensor] = []
        self.seen: set[Any] = set()
        self.bytes: dict[Any, int] = defaultdict(int)
        self.shared_bytes: dict[Any, int] = defaultdict(int)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def share(self, tensors: list[torch.Tensor]) -> None:
        """Mark tensors as shared by all blocks. They are kept alive for the pass: a storage key is an
        address, and a freed one could be reused by a later tensor (the logits) and miscounted."""
        for t in tensors:
            key = _storage_key(t)
            if key is not None and key not in self.shared:
                self.shared.add(key)
                self._alive.append(t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is None:
            self.bytes[self.part()] += t.numel() * t.element_size()
        elif key in self.shared:
            if (self.part(), key) not in self.seen:
                self.seen.add((self.part(), key))
                self.shared_bytes[self.part()] += tensor_bytes(t)
        elif key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.part()] += tensor_bytes(t)
        return t

    def __enter__(self) -> _SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


@dataclass
class MeasuredStep:
    """What one real training step cost, as ``FlopCounterMode`` and the saved-tensor hooks saw it."""

    forward: int
    """FLOPs counted during the forward pass (loss included)."""
    backward: int
    """FLOPs counted during ``loss.backward()``."""
    activation_bytes: int
    """Bytes saved for backward (one count per storage, parameters excluded)."""

    @property
    def total(self) -> int:
        return self.forward + self.backward


def measure_step_flops(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    trainable_param_predicate: Callable[[str], bool] | None = None,
    module_tracking: bool = False,
    logits_to_keep: torch.Tensor | None = None,
) -> MeasuredStep:
    """Run one real training step (forward, ``loss.backward()``) under ``FlopCounterMode`` and count it.

    The count is ``FlopCounterMode``'s (same formulas and decompositions); ``module_tracking=True``
    runs the public ``FlopCounterMode`` itself, with its per-module hooks, which only makes it slower.
    ``logits_to_keep`` (positions, ``labelled_positions``) runs the step as salf trains a causal LM on
    completions: only those positions go through the head (``projected_forward``).

    ``trainable_param_predicate(name)`` sets ``requires_grad`` of every parameter in
    ``model.named_parameters()`` (a tied weight appears once, under its first name: the
    embedding's); None keeps the model's own pattern. The flags and ``.grad`` fields are restored
    afterwards; no optimizer step is taken.
    """
    params = list(model.named_parameters())
    before = {name: (p.requires_grad, p.grad) for name, p in params}
    try:
        if trainable_param_predicate is not None:
            for name, p in params:
                p.requires_grad_(bool(trainable_param_predicate(name)))
        for _, p in params:
            p.grad = None
        mode, flops = (FlopCounterMode(display=False), None) if module_tracking else _flop_mode()
        with mode:
            with _SavedBytes(model) as saved:
                loss = _step_loss(model, batch, logits_to_keep)
            flops = flops or mode.get_total_flops
            forward = flops()
            if loss is None:
                raise SalfError("the model returned no loss", "include labels in the batch")
            if loss.requires_grad:
                loss.backward()
            total = flops()
    finally:
        for name, p in params:
            p.requires_grad_(before[name][0])
            p.grad = before[name][1]
    return MeasuredStep(forward=int(forward), backward=int(total - forward), activation_bytes=saved.total)


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """The sequence positions t whose next-token label ``labels[:, t + 1]`` is set (not -100) in any row.

    A causal LM's loss reads its logits at these positions only (the model shifts the labels by one), so
    they are the only ones a training step needs to project through the output head. One set for the
    whole batch (``logits_to_keep`` takes the same positions for every row): the union over its rows.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def loss_on_positions(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """The next-token cross-entropy of ``logits`` projected at positions ``keep`` (batch x len(keep) x vocab).

    Computed as transformers' ``ForCausalLMLoss`` computes the model's own loss, so that both agree up to
    float rounding: in float32, -100 ignored, the mean over labelled tokens, or their sum divided by
    ``num_items_in_batch`` when the Trainer gives it (the loss of gradient accumulation over several batches).
    Positions left out of ``keep`` carry no label in any row, so they add nothing to the sum or the count.
    """
    target = labels[:, keep + 1].reshape(-1).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target,
                                       ignore_index=IGNORE_INDEX, reduction=reduction)
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def projected_forward(model: nn.Module, batch: Mapping[str, Any], keep: torch.Tensor,
                      num_items_in_batch: torch.Tensor | int | None = None) -> Any:
    """Run a causal LM on ``batch`` projecting only positions ``keep`` through its head; its output, with
    ``loss`` from ``loss_on_positions``.

    The labels are kept from the model: its own loss would compare the kept logits with unshifted,
    full-length labels.
    """
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    out = model(**inputs, logits_to_keep=keep)
    return dataclasses.replace(out, loss=loss_on_positions(out.logits, batch["labels"], keep, num_items_in_batch))


def _step_loss(model: nn.Module, batch: Mapping[str, Any], keep: torch.Tensor | None) -> torch.Tensor | None:
    """The loss of one training step's forward: the model's own, or with ``keep`` the projected one."""
    out = model(**batch) if keep is None else projected_forward(model, batch, keep)
    return getattr(out, "loss", None)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    return type(value)((new, *value[1:]))


class _Probe:
    """Hooks that cut a model at every block boundary, run one step, and count every part alone.

    Each block receives a fresh leaf as its input (``requires_grad=input_grad``) and the head a fresh
    leaf in place of the last block's output, so each part is its own autograd graph. Forward FLOPs
    and saved bytes go to the part running at the time; each part's backward is run on its own.
    Parts: 'embeddings' (everything before block 0), block indices, 'other' (between blocks),
    'head' (everything after the last block, loss included). ``keep``: the positions projected through
    the head (None: all of them), as in ``measure_step_flops``.
    """

    def __init__(self, model: nn.Module, parts: ModelParts, input_grad: bool, head_input_grad: bool,
                 keep: torch.Tensor | None = None):
        self.model = model
        self.keep = keep
        self.parts = parts
        self.input_grad = input_grad
        self.head_input_grad = head_input_grad
        self.part: Any = "embeddings"
        self.forward: dict[Any, int] = defaultdict(int)
        self.backward: dict[Any, int] = defaultdict(int)
        self.roots: dict[Any, torch.Tensor] = {}
        self.mode, self.flops = _flop_mode()
        self.saved = _SavedBytes(model, lambda: self.part)
        self._mark = 0

    def _switch(self, part: Any) -> None:
        now = self.flops()
        self.forward[self.part] += now - self._mark
        self._mark = now
        self.part = part

    def _leaf(self, t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        return t.detach().requires_grad_(requires_grad)

    def _pre(self, j: int):
        def hook(module, args, kwargs):
            self._switch(j)
            if args and isinstance(args[0], torch.Tensor):
                x = args[0]
                args = (self._leaf(x, self.input_grad), *args[1:])
                rest = (args[1:], kwargs)
            elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
                x = kwargs["hidden_states"]
                kwargs = {**kwargs, "hidden_states": self._leaf(x, self.input_grad)}
                rest = (args, {k: v for k, v in kwargs.items() if k != "hidden_states"})
            else:
                raise SalfError(f"cannot find the hidden states passed to block {j} of {self.parts.model_type!r}",
                                "salf.method.cost expects blocks called with the hidden states first")
            self.saved.share([t for t in tree_flatten(rest)[0] if isinstance(t, torch.Tensor)])
            if j == 0:
                self.roots["embeddings"] = x
            return args, kwargs

        return hook

    def _post(self, j: int, last: bool):
        def hook(module, args, output):
            h = _first_tensor(output)
            if h is None:
                raise SalfError(f"block {j} of {self.parts.model_type!r} returned no tensor")
            self.roots[j] = h
            self._switch("head" if last else "other")
            return _replace_first(output, self._leaf(h, self.head_input_grad)) if last else None

        return hook

    def run(self, batch: Mapping[str, torch.Tensor]) -> _Probe:
        handles = []
        for j, block in enumerate(self.parts.blocks):
            handles.append(block.register_forward_pre_hook(self._pre(j), with_kwargs=True))
            handles.append(block.register_forward_hook(self._post(j, j == len(self.parts.blocks) - 1)))
        try:
            with self.mode:
                with self.saved:
                    loss = _step_loss(self.model, batch, self.keep)
                self._switch("done")
                self.roots["head"] = loss
                for part, root in self.roots.items():
                    if root.requires_grad:
                        before = self.flops()
                        (root if root.dim() == 0 else root.sum()).backward()
                        self.backward[part] += self.flops() - before
        finally:
            for handle in handles:
                handle.remove()
        return self


def run_probe(model: nn.Module, parts: ModelParts, batch: dict, input_grad: bool,
         trainable: Callable[[str], bool], head_input_grad: bool | None = None,
         keep: torch.Tensor | None = None) -> _Probe:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trainable(name)))
    head_input_grad = input_grad if head_input_grad is None else head_input_grad
    return _Probe(model, parts, input_grad, head_input_grad, keep).run(batch)


__all__ = ["MeasuredStep", "labelled_positions", "loss_on_positions", "measure_step_flops", "projected_forward",
           "run_probe", "tensor_bytes"]
