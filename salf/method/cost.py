"""Exact cost of one training step for any set of trainable blocks, full or LoRA.

The model is rebuilt from its config on the ``meta`` device (shapes only: no memory, no arithmetic)
and one batch is run through it a few times under ``torch.utils.flop_counter.FlopCounterMode``, each
time with a different ``requires_grad`` pattern. Hooks cut the model at every block boundary: each
block receives a fresh leaf tensor as its input, so every block (and the head) forms its own small
autograd graph whose backward is run and counted on its own. One pass therefore measures every block
in one *mode*; three passes (four more for a head tied to the embedding, two more for LoRA) give the
whole ``CostProfile``:

========  ====================  ===================  ==========================================
mode      block input needs     block weights        meaning in a real step
          a gradient            trainable
========  ====================  ===================  ==========================================
full      yes                   yes                  trainable block above the lowest one
input     yes                   no                   frozen block above the lowest trainable one
lowest    no                    yes                  the lowest trainable block
========  ====================  ===================  ==========================================

``step_cost`` composes the per-block figures for any plan: a block below the lowest trainable one
costs its forward only; the lowest costs ``lowest``; a block above it costs ``full`` if it is trained
and ``input`` if it is frozen. Measuring the ``lowest`` mode (rather than assuming "weight gradients
only") matters: BERT's post-LN attention needs no gradient for its Q/K/V inputs there, while GPT-2's
pre-LN block still needs one to reach ``ln_1``'s weights.

FLOPs are what ``FlopCounterMode`` counts: matrix products (``mm``, ``bmm``, ``addmm``, attention
kernels, convolutions). Elementwise work, norms, softmax and the embedding gather count zero, as they
do in the step that is measured. Activation bytes are the tensors autograd saves for backward, found
with ``torch.autograd.graph.saved_tensors_hooks``: each storage counted once, parameters and views of
parameters excluded, attributed to the block that was running when it was first saved; tensors that
every block receives (rotary tables, masks) are counted once per step, however many blocks save them.

Attention: the profile uses the attention implementation of the model it profiles. ``eager``
attention is plain matrix products, counted the same on every device. ``sdpa`` and flash attention
are profiled as the fused kernels a GPU runs (``_fused_attention``): ``FlopCounterMode``'s sdpa
formulas (backward 5/4 of eager's, since the kernel recomputes the scores) and O(T) saved state
instead of the T x T probabilities; on an H200 this matched real ``sdpa`` steps exactly. On CPU,
``FlopCounterMode`` has no formula for the fused CPU kernel
(``_scaled_dot_product_flash_attention_for_cpu``) and counts that attention as zero, so a real CPU
step of an ``sdpa`` model measures less than its profile by the attention FLOPs; measure CPU steps
with ``eager`` attention (as ``salf.models.tiny`` models use).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from salf.errors import SalfError
from salf.models.arch import ARCHITECTURES, ModelParts, find_parts
from salf.models.pooling import apply_head_pooling

TASKS = ("causal-lm", "classification")

OPTIMIZER_STATES: dict[str, int] = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0}
"""fp32 state tensors the optimizer keeps per trainable parameter (Adam: exp_avg and exp_avg_sq)."""

OPTIMIZER_STATE_BYTES = 4
"""Optimizer states are kept in fp32 (mixed-precision practice), whatever the parameter dtype."""

_LEARNED_POSITIONS = ("gpt2", "opt", "bert")
"""Model types with a learned position table: a step longer than the table fails on a real model."""


MODES = ("full", "input", "lowest")
"""Block modes of a full fine-tuning profile (see the module docstring)."""
LORA_MODES = ("lora_full", "lora_lowest")
"""Block modes of a LoRA-adapted block: frozen base, trainable adapters; input needs a gradient or not."""


@dataclass
class CostProfile:
    """Measured cost pieces of one model at one batch shape, from which ``step_cost`` composes any plan.

    FLOPs are per training step of ``batch_size`` x ``seq_len`` tokens; bytes are per step too.
    Per-block figures are lists with one entry per block, kept per *mode* (``MODES``, and
    ``LORA_MODES`` when ``lora_rank`` is set): ``backward_blocks["full"][j]`` is block j's backward
    when it is trained above the lowest trainable block, ``["input"]`` when it is frozen above it
    (input gradient only), ``["lowest"]`` when it is the lowest trainable block.
    """

    model_type: str
    """``config.model_type`` of the profiled model."""
    task: str
    """'causal-lm' or 'classification'."""
    batch_size: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence."""
    dtype_bytes: int
    """Bytes per parameter of the model's floating dtype."""
    attn_implementation: str
    """Attention implementation the profile was measured with ('eager', 'sdpa', ...)."""
    tied_head: bool
    """The output projection shares its weight with the input embedding (trained with the embeddings)."""
    forward_blocks: list[float]
    """Forward FLOPs of each block."""
    backward_blocks: dict[str, list[float]]
    """Backward FLOPs of each block, per mode."""
    activation_blocks: dict[str, list[int]]
    """Bytes each block saves for backward, per mode (tensors shared between blocks excluded)."""
    shared_activation_blocks: dict[str, list[int]]
    """Bytes of tensors that every block receives (rotary tables, masks) and this block saves, per mode:
    stored once per step, so a step counts the largest of these over its active blocks."""
    params_blocks: list[int]
    """Parameters of each block."""
    params_embeddings: int
    """Parameters of the embeddings (including a tied output projection)."""
    params_norm: int
    """Parameters of the final norm."""
    params_head: int
    """Parameters of the head (lm_head / score / classifier, head extras), tied weights excluded."""
    params_other: int
    """Parameters in none of the groups above (trained only together with the embeddings)."""
    forward_embeddings: float
    """Forward FLOPs before block 0 (embeddings, position tables)."""
    forward_head: float
    """Forward FLOPs after the last block (final norm, head, pooler, loss)."""
    forward_other: float
    """Forward FLOPs between blocks, outside any block (usually 0)."""
    backward_embeddings: float
    """Backward FLOPs of trainable embeddings (the gather's gradient counts 0)."""
    activation_embeddings: int
    """Bytes saved for backward by trainable embeddings (the token ids)."""
    backward_head: dict[str, float]
    """Backward FLOPs after the last block (norm, head, loss), per head mode (``head_key``)."""
    activation_head: dict[str, int]
    """Bytes saved for backward after the last block, per head mode."""
    lora_rank: int | None = None
    """LoRA rank of the ``lora_*`` modes; None when LoRA was not profiled."""
    lora_forward: list[float] | None = None
    """Extra forward FLOPs of each block's adapters (paid only where adapters are placed)."""
    lora_params: list[int] | None = None
    """Adapter parameters of each block."""
    lora_dtype_bytes: int | None = None
    """Bytes per adapter parameter (peft keeps the adapters of 16-bit models in fp32)."""
    profiled_blocks: int = 0
    """Blocks actually run to measure the profile (fewer than ``num_layers`` when identical blocks
    were measured once and replicated); 0 means all."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SalfError(f"unknown task {self.task!r}", f"use one of {', '.join(TASKS)}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise SalfError(f"batch_size and seq_len must be >= 1, got {self.batch_size} and {self.seq_len}")
        if self.dtype_bytes < 1:
            raise ValueError(f"dtype_bytes must be >= 1, got {self.dtype_bytes}")
        n = len(self.forward_blocks)
        if n < 1:
            raise ValueError("a cost profile needs at least one block")
        modes = MODES + (LORA_MODES if self.lora_rank is not None else ())
        for name in ("backward_blocks", "activation_blocks", "shared_activation_blocks"):
            table = getattr(self, name)
            if set(table) != set(modes):
                raise ValueError(f"{name} has modes {sorted(table)}, expected {sorted(modes)}")
            for mode, values in table.items():
                if len(values) != n:
                    raise ValueError(f"{name}[{mode!r}] has {len(values)} entries for {n} blocks")
        lora = (self.lora_forward, self.lora_params, self.lora_dtype_bytes)
        if self.lora_rank is None and any(v is not None for v in lora):
            raise ValueError("LoRA figures given without a lora_rank")
        if self.lora_rank is not None:
            if self.lora_rank < 1 or any(v is None for v in lora):
                raise ValueError(f"lora_rank={self.lora_rank} needs lora_forward, lora_params and lora_dtype_bytes")
            if len(self.lora_forward) != n or len(self.lora_params) != n:
                raise ValueError(f"lora_forward and lora_params need {n} entries")
        if len(self.params_blocks) != n:
            raise ValueError(f"params_blocks has {len(self.params_blocks)} entries for {n} blocks")
        needed = {head_key(i, h, t) for i in (False, True) for h in (False, True)
                  for t in ((False, True) if self.tied_head else (False,))}
        for name in ("backward_head", "activation_head"):
            missing = needed - set(getattr(self, name))
            if missing:
                raise ValueError(f"{name} lacks head modes {sorted(missing)}")

    @property
    def num_layers(self) -> int:
        return len(self.forward_blocks)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_params(self) -> int:
        return (self.params_embeddings + sum(self.params_blocks) + self.params_norm + self.params_head
                + self.params_other)

    @property
    def weight_grad_blocks(self) -> list[float]:
        """W_j: what training block j adds to its backward (weight gradients), full - input."""
        return [f - i for f, i in zip(self.backward_blocks["full"], self.backward_blocks["input"])]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostProfile:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise SalfError(f"cost profile has unknown fields {sorted(unknown)}",
                            "write it with CostProfile.to_dict of the same salf version")
        return cls(**dict(data))


def head_key(input_grad: bool, head: bool, tied: bool) -> str:
    """Key of one head mode: does the head's input need a gradient (anything below is trained), are
    the head's own weights (final norm, head layers) trainable, is a tied output projection trainable."""
    return f"i{int(input_grad)}h{int(head)}t{int(tied)}"


@dataclass
class StepCost:
    """Cost of one training step of one plan: FLOPs split by pass, and memory by kind (bytes)."""

    forward: float
    """Forward FLOPs (every layer runs forward, trained or not)."""
    backward_input: float
    """Backward FLOPs spent on gradients with respect to activations."""
    backward_weight: float
    """Backward FLOPs that training adds: gradients of trainable weights (and, with LoRA, the
    adapters' own input gradients)."""
    param_bytes: int
    """All parameters (LoRA adapters included where placed)."""
    grad_bytes: int
    """Gradients of trainable parameters."""
    optimizer_bytes: int
    """Optimizer state of trainable parameters."""
    activation_bytes: int
    """Tensors saved for backward."""
    trainable_params: int
    """Parameters that receive gradients and optimizer updates."""
    total_params: int
    """All parameters of the model as trained (adapters included)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} is negative: {getattr(self, f.name)}")

    @property
    def backward(self) -> float:
        return self.backward_input + self.backward_weight

    @property
    def total(self) -> float:
        return self.forward + self.backward

    @property
    def memory_bytes(self) -> int:
        """Parameters + gradients + optimizer state + saved activations."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    def ratio_to(self, other: StepCost) -> float:
        """Step FLOPs of this plan as a fraction of ``other``'s (usually full fine-tuning)."""
        if other.total <= 0:
            raise ValueError("cannot take a ratio to a step of zero FLOPs")
        return self.total / other.total

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "backward": self.backward, "total": self.total, "memory_bytes": self.memory_bytes}


# --------------------------------------------------------------------------------------------- composition


def step_cost(
    profile: CostProfile,
    trainable_blocks: Iterable[int],
    train_embeddings: bool = False,
    train_head: bool = True,
    optimizer: str = "adamw",
) -> StepCost:
    """Cost of one step that trains ``trainable_blocks`` (any set, contiguous or not).

    ``train_head`` trains the final norm and the head (with LoRA too: the head is trained fully, as
    peft's ``modules_to_save``). ``train_embeddings`` trains the embeddings, and with them a tied
    output projection. With a LoRA profile the trainable blocks carry adapters and their base
    weights stay frozen; frozen blocks carry none.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise SalfError(f"unknown optimizer {optimizer!r}", f"use one of {', '.join(OPTIMIZER_STATES)}")
    n = profile.num_layers
    chosen = sorted(set(trainable_blocks))
    trained_set = set(chosen)
    bad = [j for j in chosen if not 0 <= j < n]
    if bad:
        raise SalfError(f"block indices {bad} are out of range for a model of {n} blocks", f"use 0..{n - 1}")
    lora = profile.lora_rank is not None
    full, low = ("lora_full", "lora_lowest") if lora else ("full", "lowest")
    lowest = chosen[0] if chosen else n
    first_grad = 0 if train_embeddings else lowest + 1  # blocks from here on need their input's gradient
    bwd, act, shared = profile.backward_blocks, profile.activation_blocks, profile.shared_activation_blocks
    frozen_in = bwd["input"]

    forward = (profile.forward_embeddings + profile.forward_head + profile.forward_other
               + sum(profile.forward_blocks))
    if lora:
        forward += sum(profile.lora_forward[j] for j in chosen)
    bwd_in = bwd_w = 0.0
    activation = 0
    shared_bytes = 0
    for j in range(n):
        trained = j in trained_set
        if j >= first_grad:
            mode = full if trained else "input"
            bwd_in += frozen_in[j]
            bwd_w += bwd[mode][j] - frozen_in[j]
        elif j == lowest:
            mode = low
            # The weight gradients are those of 'full'; the rest of 'lowest' is the input gradients
            # inside the block that its weights still need (none for BERT's post-LN Q/K/V). With LoRA,
            # 'full' also holds the adapters' gradients into the block input, which the lowest block
            # skips: the split is then capped so that neither part goes negative (the sum is exact).
            weight = min(bwd[full][j] - frozen_in[j], bwd[low][j])
            bwd_w += weight
            bwd_in += bwd[low][j] - weight
        else:
            continue
        activation += act[mode][j]
        shared_bytes = max(shared_bytes, shared[mode][j])
    activation += shared_bytes

    if train_embeddings:
        bwd_w += profile.backward_embeddings
        activation += profile.activation_embeddings
    head_input = train_embeddings or bool(chosen)
    key = head_key(head_input, train_head, train_embeddings and profile.tied_head)
    head_in = profile.backward_head[head_key(True, False, False)] if head_input else 0.0
    bwd_in += head_in
    bwd_w += profile.backward_head[key] - head_in
    activation += profile.activation_head[key]

    trainable = 0
    if train_embeddings:
        trainable += profile.params_embeddings + profile.params_other
    if train_head:
        trainable += profile.params_norm + profile.params_head
    adapters = 0
    if lora:
        adapters = sum(profile.lora_params[j] for j in chosen)
    else:
        trainable += sum(profile.params_blocks[j] for j in chosen)
    adapter_bytes = adapters * (profile.lora_dtype_bytes or profile.dtype_bytes)
    state_bytes = OPTIMIZER_STATES[optimizer] * OPTIMIZER_STATE_BYTES
    return StepCost(
        forward=float(forward),
        backward_input=float(bwd_in),
        backward_weight=float(bwd_w),
        param_bytes=profile.total_params * profile.dtype_bytes + adapter_bytes,
        grad_bytes=trainable * profile.dtype_bytes + adapter_bytes,
        optimizer_bytes=(trainable + adapters) * state_bytes,
        activation_bytes=int(activation),
        trainable_params=trainable + adapters,
        total_params=profile.total_params + adapters,
    )


def boundary_costs(profile: CostProfile, train_head: bool = True, optimizer: str = "adamw") -> list[StepCost]:
    """Step cost at every boundary k = 0..L.

    k = 0 is full fine-tuning (embeddings included; with a LoRA profile: adapters on every block and
    frozen embeddings); k > 0 freezes the embeddings and blocks 0..k-1 and trains blocks k..L-1 plus
    (``train_head``) the final norm and head. k = L trains the head alone.
    """
    n = profile.num_layers
    lora = profile.lora_rank is not None
    return [
        step_cost(profile, range(k, n), train_embeddings=(k == 0 and not lora), train_head=train_head,
                  optimizer=optimizer)
        for k in range(n + 1)
    ]


# --------------------------------------------------------------------------------------------- measuring


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
) -> MeasuredStep:
    """Run one real training step (forward, ``loss.backward()``) under ``FlopCounterMode`` and count it.

    The count is ``FlopCounterMode``'s (same formulas and decompositions); ``module_tracking=True``
    runs the public ``FlopCounterMode`` itself, with its per-module hooks, which only makes it slower.

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
                out = model(**batch)
            flops = flops or mode.get_total_flops
            forward = flops()
            loss = getattr(out, "loss", None)
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
    'head' (everything after the last block, loss included).
    """

    def __init__(self, model: nn.Module, parts: ModelParts, input_grad: bool, head_input_grad: bool):
        self.model = model
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
                    out = self.model(**batch)
                self._switch("done")
                self.roots["head"] = out.loss
                for part, root in self.roots.items():
                    if root.requires_grad:
                        before = self.flops()
                        (root if root.dim() == 0 else root.sum()).backward()
                        self.backward[part] += self.flops() - before
        finally:
            for handle in handles:
                handle.remove()
        return self


def _silence_padding_check(model: nn.Module) -> None:
    # transformers' padding warning calls `.item()` on the ids, which a meta tensor cannot do.
    for module in model.modules():
        if hasattr(module, "warn_if_padding_and_no_attention_mask"):
            module.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None


def _dtype_of(config: Any, model: nn.Module | None) -> torch.dtype:
    if model is not None:
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _task_of(model: nn.Module) -> str:
    return "classification" if "SequenceClassification" in type(model).__name__ else "causal-lm"


FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Attention implementations profiled as the fused kernel a GPU runs (see ``_fused_attention``)."""
_FUSED = "salf_fused_attention"


def _fused_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention as a GPU runs ``sdpa`` / flash attention, for the meta device.

    On the meta device ``scaled_dot_product_attention`` always takes its math path: two counted
    matrix products forward, four backward, and the T x T probabilities saved. A GPU runs a fused
    kernel instead, which ``FlopCounterMode`` counts with its sdpa formulas (four products forward,
    five backward: the scores are recomputed) and which saves only O(T) state (the log-sum-exp).
    Calling the fused kernels' own operators reproduces both: the flash kernel without a mask (it
    takes grouped K/V heads as they are), the memory-efficient kernel with one (padding, sliding
    window), as ``sdpa`` chooses on a GPU.
    """
    causal = query.shape[2] > 1 and attention_mask is None and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if attention_mask is None:
        out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, causal, scale=scaling)[0]
    else:
        groups = query.shape[1] // key.shape[1]
        if groups > 1:  # the memory-efficient kernel needs one K/V head per query head
            key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
        bias = attention_mask
        if bias.dtype == torch.bool:  # as sdpa converts a boolean mask before the kernel
            bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill(~bias, float("-inf"))
        bias = bias[..., : key.shape[2]].expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, dropout, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _register_fused_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(_FUSED, _fused_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_FUSED, sdpa_mask)


def build_model(config: Any, task: str, num_labels: int, dtype: torch.dtype, attn: str,
                device: str | torch.device = "meta") -> nn.Module:
    """The model of ``config`` with random weights on ``device``, in training mode.

    On the meta device (profiling) a fused attention implementation is replaced by ``_fused_attention``,
    which costs what the GPU kernel costs; on a real device the model keeps ``attn`` itself. A classifier
    pools as its config records (``salf.models.pooling``: a mean-pooling head saves its token weights for backward).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    meta = torch.device(device).type == "meta"
    config = copy.deepcopy(config)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    if task == "classification":
        config.num_labels = num_labels
    if meta and attn in FUSED_ATTENTION:
        _register_fused_attention()
        attn = _FUSED
    try:
        with torch.device(device):
            model = auto.from_config(config, attn_implementation=attn, dtype=dtype)
    except (ValueError, KeyError) as e:
        raise SalfError(f"cannot build a {task} model for model type {config.model_type!r}: {e}",
                        "use the config of a transformers causal LM or sequence classifier") from e
    if task == "classification":
        apply_head_pooling(model, None)
    if meta:
        _silence_padding_check(model)
    return model.train()


def _meta_batch(task: str, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta") if task == "classification" else ids
    return {"input_ids": ids, "labels": labels}


def _block_linear_names(parts: ModelParts) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in parts.blocks.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D))})


def lora_config_for(model: nn.Module, rank: int, blocks: Iterable[int], alpha: float | None = None,
                    dropout: float = 0.0, task: str | None = None):
    """The ``peft.LoraConfig`` that places LoRA where salf does (and where the cost profile measures it).

    Rank-``rank`` adapters go on every ``nn.Linear`` / ``Conv1D`` inside the chosen ``blocks``, and
    nowhere else. For a classification model the final norm and head are trained fully
    (``modules_to_save``); a causal LM's head stays frozen.
    """
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise SalfError("LoRA needs the peft package", "pip install 'salf[lora]'") from e
    if rank < 1:
        raise SalfError(f"LoRA rank must be >= 1, got {rank}")
    parts = find_parts(model)
    layers = sorted(set(blocks))
    if not layers:
        raise SalfError("LoRA needs at least one block to adapt", "train at least one block, or the head alone without LoRA")
    task = task or _task_of(model)
    save = None
    if task == "classification":
        names = [*parts.head_names, *([parts.norm_name] if parts.norm_name else [])]
        # Parameter-free parts (dropout) are left out: peft matches names by suffix ('lora_dropout').
        save = [name for name in names if any(True for _ in model.get_submodule(name).parameters())]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=_block_linear_names(parts),
        layers_to_transform=layers,
        layers_pattern=parts.blocks_name.rsplit(".", 1)[-1],
        modules_to_save=save,
    )


def _group_params(model: nn.Module, parts: ModelParts) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        group = parts.group_of(name)
        counts["blocks" if group.startswith("block:") else group] += p.numel()
    return counts


def _run(model: nn.Module, parts: ModelParts, batch: dict, input_grad: bool,
         trainable: Callable[[str], bool], head_input_grad: bool | None = None) -> _Probe:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trainable(name)))
    head_input_grad = input_grad if head_input_grad is None else head_input_grad
    return _Probe(model, parts, input_grad, head_input_grad).run(batch)


def _per_layer_lists(config: Any, n: int) -> dict[str, list]:
    """Config entries with one value per layer (``layer_types`` and the like)."""
    return {k: list(v) for k, v in config.to_dict().items() if isinstance(v, (list, tuple)) and len(v) == n}


def _representatives(config: Any, n: int) -> list[int]:
    """For each block, the first block with the same per-layer config values (itself if unique)."""
    lists = _per_layer_lists(config, n)
    first: dict[tuple, int] = {}
    return [first.setdefault(tuple(repr(v[j]) for v in lists.values()), j) for j in range(n)]


def _reduced_config(config: Any, depth: int) -> Any:
    n = config.num_hidden_layers
    reduced = copy.deepcopy(config)
    for key, values in _per_layer_lists(config, n).items():
        setattr(reduced, key, values[:depth])
    reduced.num_hidden_layers = depth
    return reduced


def profile_cost(
    model_or_config: Any,
    batch_size: int,
    seq_len: int,
    lora_rank: int | None = None,
    task: str | None = None,
    num_labels: int = 2,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    replicate: bool = True,
) -> CostProfile:
    """Measure the cost profile of a model (or a transformers config) at ``batch_size`` x ``seq_len``.

    A real model is never run: a meta-device copy is built from its config, with its dtype, task
    (``...ForSequenceClassification`` -> 'classification'), label count and attention
    implementation. For a config, ``task`` defaults to 'causal-lm', the dtype to the config's, and
    attention to the config's or 'eager'. ``lora_rank`` also profiles LoRA as ``lora_config_for``
    places it.

    ``replicate``: every block of a model type in ``salf.models.arch.ARCHITECTURES`` has the same code and
    shapes, differing at most in per-layer config lists (``layer_types``: sliding or full attention).
    A block's cost depends only on those, so one block of each kind is measured on a shallow copy of
    the model and its figures are copied to every block of the same kind (the tests check this
    against full-depth profiles). A meta-device pass costs ~0.05-0.1 s per block and a profile takes
    3-9 passes, so this keeps an 80-block model to a second or two instead of a minute. Other model
    types are always profiled at full depth.
    """
    model = None
    config = model_or_config
    if isinstance(model_or_config, nn.Module):
        model = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
        config = getattr(model, "config", None)
        if config is None:
            raise SalfError(f"{type(model).__name__} has no transformers config to profile",
                            "pass a transformers model or its PretrainedConfig")
        task = task or _task_of(model)
        if task == "classification":
            num_labels = getattr(config, "num_labels", num_labels)
    task = task or "causal-lm"
    if task not in TASKS:
        raise SalfError(f"unknown task {task!r}", f"use one of {', '.join(TASKS)}")
    if batch_size < 1 or seq_len < 1:
        raise SalfError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if lora_rank is not None and lora_rank < 1:
        raise SalfError(f"LoRA rank must be >= 1, got {lora_rank}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if getattr(config, "model_type", None) in _LEARNED_POSITIONS and max_pos and seq_len > max_pos:
        raise SalfError(f"seq_len {seq_len} exceeds the model's {max_pos} learned positions",
                        f"use seq_len <= {max_pos}")
    dtype = dtype or _dtype_of(config, model)
    attn = attn_implementation or getattr(config, "_attn_implementation", None) or "eager"

    n = getattr(config, "num_hidden_layers", None)
    if replicate and isinstance(n, int) and n > 1 and getattr(config, "model_type", None) in ARCHITECTURES:
        reps = _representatives(config, n)
        depth = max(reps) + 1
        if depth < n:
            profile = _profile(_reduced_config(config, depth), task, num_labels, dtype, attn, batch_size,
                               seq_len, lora_rank)
            return _replicate(profile, reps, n)
    return _profile(config, task, num_labels, dtype, attn, batch_size, seq_len, lora_rank)


def _replicate(profile: CostProfile, reps: list[int], n: int) -> CostProfile:
    data = profile.to_dict()

    def spread(values: list) -> list:
        return [values[r] for r in reps]

    for key in ("forward_blocks", "params_blocks", "lora_forward", "lora_params"):
        if data[key] is not None:
            data[key] = spread(data[key])
    for key in ("backward_blocks", "activation_blocks", "shared_activation_blocks"):
        data[key] = {mode: spread(values) for mode, values in data[key].items()}
    depth = profile.num_layers
    # Work between blocks (none in the supported types) happens at every one of the n - 1 gaps.
    data["forward_other"] = profile.forward_other / (depth - 1) * (n - 1) if depth > 1 else 0.0
    data["profiled_blocks"] = depth
    return CostProfile.from_dict(data)


def _profile(config: Any, task: str, num_labels: int, dtype: torch.dtype, attn: str, batch_size: int,
             seq_len: int, lora_rank: int | None) -> CostProfile:
    meta = build_model(config, task, num_labels, dtype, attn)
    parts = find_parts(meta)
    batch = _meta_batch(task, batch_size, seq_len)
    n = parts.num_layers
    groups = _group_params(meta, parts)
    out_emb = meta.get_output_embeddings() if hasattr(meta, "get_output_embeddings") else None
    in_emb = meta.get_input_embeddings()
    tied = out_emb is not None and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", False)

    def embeddings(name: str) -> bool:
        return parts.group_of(name) == "embeddings"

    def head(name: str) -> bool:
        return parts.group_of(name) in ("norm", "head")

    # One pass per block mode; the head is measured in the same passes. A tied head needs four more
    # (its own weights and the shared embedding, each trainable or not); in those the blocks are
    # fully frozen, so they run forward only.
    passes = {
        "full": _run(meta, parts, batch, True, lambda name: True),
        "input": _run(meta, parts, batch, True, lambda name: False),
        "lowest": _run(meta, parts, batch, False, lambda name: True),
    }
    head_passes = {
        head_key(True, True, tied): passes["full"],
        head_key(True, False, False): passes["input"],
        head_key(False, True, tied): passes["lowest"],
    }
    if tied:
        for head_input in (True, False):
            head_passes[head_key(head_input, True, False)] = _run(meta, parts, batch, False, head, head_input)
            head_passes[head_key(head_input, False, True)] = _run(meta, parts, batch, False, embeddings, head_input)
    backward_head = {key: float(p.backward["head"]) for key, p in head_passes.items()}
    activation_head = {key: int(p.saved.bytes["head"]) for key, p in head_passes.items()}
    backward_head[head_key(False, False, False)] = 0.0
    activation_head[head_key(False, False, False)] = 0

    def per_block(table: dict, cast: type) -> list:
        return [cast(table[j]) for j in range(n)]

    full = passes["full"]
    data: dict[str, Any] = dict(
        model_type=parts.model_type,
        task=task,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        attn_implementation=attn,
        tied_head=tied,
        forward_blocks=per_block(full.forward, float),
        backward_blocks={m: per_block(p.backward, float) for m, p in passes.items()},
        activation_blocks={m: per_block(p.saved.bytes, int) for m, p in passes.items()},
        shared_activation_blocks={m: per_block(p.saved.shared_bytes, int) for m, p in passes.items()},
        params_blocks=[sum(p.numel() for p in block.parameters()) for block in parts.blocks],
        params_embeddings=groups["embeddings"],
        params_norm=groups["norm"],
        params_head=groups["head"],
        params_other=groups["other"],
        forward_embeddings=float(full.forward["embeddings"]),
        forward_head=float(full.forward["head"]),
        forward_other=float(full.forward["other"]),
        backward_embeddings=float(full.backward["embeddings"]),
        activation_embeddings=int(full.saved.bytes["embeddings"]),
        backward_head=backward_head,
        activation_head=activation_head,
    )
    if tied:  # in the 'full' pass the embeddings were trained with the tied head; this pass trains them alone
        only = head_passes[head_key(False, False, True)]
        data["backward_embeddings"] = float(only.backward["embeddings"])
        data["activation_embeddings"] = int(only.saved.bytes["embeddings"])
    if lora_rank is not None:
        data["lora_rank"] = lora_rank
        lora = _profile_lora(meta, parts, batch, task, lora_rank, data["forward_blocks"])
        for key in ("backward_blocks", "activation_blocks", "shared_activation_blocks"):
            data[key].update(lora.pop(key))
        data.update(lora)
    return CostProfile(**data)


def _profile_lora(meta: nn.Module, parts: ModelParts, batch: dict, task: str, rank: int,
                  forward_blocks: list[float]) -> dict[str, Any]:
    try:
        from peft import get_peft_model
    except ImportError as e:
        raise SalfError("profiling LoRA needs the peft package", "pip install 'salf[lora]'") from e
    n = parts.num_layers
    config = lora_config_for(meta, rank, range(n), task=task)
    config.modules_to_save = None  # the head is costed by the full-model passes
    # peft injects the adapters into the same block objects, so `parts` still points at them.
    model = get_peft_model(meta, config).get_base_model()

    def adapter(name: str) -> bool:
        return "lora_" in name

    passes = {"lora_full": _run(model, parts, batch, True, adapter),
              "lora_lowest": _run(model, parts, batch, False, adapter)}
    sizes = [p.element_size() for name, p in model.named_parameters() if adapter(name)]
    return dict(
        lora_forward=[float(passes["lora_full"].forward[j]) - forward_blocks[j] for j in range(n)],
        lora_params=[sum(p.numel() for name, p in block.named_parameters() if adapter(name))
                     for block in parts.blocks],
        lora_dtype_bytes=sizes[0] if sizes else 4,
        backward_blocks={m: [float(p.backward[j]) for j in range(n)] for m, p in passes.items()},
        activation_blocks={m: [int(p.saved.bytes[j]) for j in range(n)] for m, p in passes.items()},
        shared_activation_blocks={m: [int(p.saved.shared_bytes[j]) for j in range(n)] for m, p in passes.items()},
    )


__all__ = [
    "FUSED_ATTENTION",
    "LORA_MODES",
    "MODES",
    "OPTIMIZER_STATES",
    "CostProfile",
    "MeasuredStep",
    "StepCost",
    "boundary_costs",
    "head_key",
    "lora_config_for",
    "measure_step_flops",
    "profile_cost",
    "step_cost",
]
