"""Exact cost of one training step for any set of trainable blocks, full or LoRA.

This module holds the figures and composes them (``CostProfile``, ``step_cost``, ``boundary_costs``);
``salf.method.cost_profile.profile_cost`` measures them, with the counting passes of
``salf.method.cost_counting`` and the LoRA passes of ``salf.method.cost_lora``.

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

A causal LM trained on completions projects only its labelled positions through the output head
(``salf.method.cost_counting.projected_forward``); a profile made with ``projected_positions`` runs its
passes the same way, so the head's figures are those of the positions a step really projects.

FLOPs are what ``FlopCounterMode`` counts: matrix products (``mm``, ``bmm``, ``addmm``, attention
kernels, convolutions). Elementwise work, norms, softmax and the embedding gather count zero, as they
do in the step that is measured. Activation bytes are the tensors autograd saves for backward, found
with ``torch.autograd.graph.saved_tensors_hooks``: each storage counted once, parameters and views of
parameters excluded, attributed to the block that was running when it was first saved; tensors that
every block receives (rotary tables, masks) are counted once per step, however many blocks save them.

Attention: the profile uses the attention implementation of the model it profiles. ``eager``
attention is plain matrix products, counted the same on every device. ``sdpa`` and flash attention
are profiled as the fused kernels a GPU runs (``salf.method.cost_profile``): ``FlopCounterMode``'s sdpa
formulas (backward 5/4 of eager's, since the kernel recomputes the scores) and O(T) saved state
instead of the T x T probabilities; on an H200 this matched real ``sdpa`` steps exactly. On CPU,
``FlopCounterMode`` has no formula for the fused CPU kernel
(``_scaled_dot_product_flash_attention_for_cpu``) and counts that attention as zero, so a real CPU
step of an ``sdpa`` model measures less than its profile by the attention FLOPs; measure CPU steps
with ``eager`` attention (as ``salf.models.tiny`` models use).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from salf.errors import SalfError

HEAD_KINDS = ("causal-lm", "classification")
"""The model heads the cost model knows (``CostProfile.task``); data tasks are ``salf.config.Task``."""


OPTIMIZER_STATES: dict[str, int] = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0}
"""fp32 state tensors the optimizer keeps per trainable parameter (Adam: exp_avg and exp_avg_sq)."""


OPTIMIZER_STATE_BYTES = 4
"""Optimizer states are kept in fp32 (mixed-precision practice), whatever the parameter dtype."""


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
    params_output_projection: int = 0
    """Parameters of a tied output projection (counted once, in ``params_embeddings``): an untied head
    (``salf.models.heads.untie_head``) adds a trainable copy of this size. 0 when the head is not tied."""
    projected_positions: int | None = None
    """Positions per sequence that a step projects through a causal LM's output head, fewer than ``seq_len``
    when training projects the labelled positions only (``TrainConfig.project_labelled_only``: a completion's
    few target tokens); None: every position. The head's figures (``forward_head``, ``backward_head``,
    ``activation_head``) were measured projecting this many, so the head's vocabulary-sized products (forward,
    input gradient, weight gradient) scale with it while the blocks still see every token."""

    def __post_init__(self) -> None:
        if self.task not in HEAD_KINDS:
            raise SalfError(f"unknown task {self.task!r}", f"use one of {', '.join(HEAD_KINDS)}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise SalfError(f"batch_size and seq_len must be >= 1, got {self.batch_size} and {self.seq_len}")
        if self.projected_positions is not None and not 1 <= self.projected_positions <= self.seq_len:
            raise SalfError(f"projected_positions must be in 1..{self.seq_len}, got {self.projected_positions}")
        if self.projected_positions is not None and self.task != "causal-lm":
            raise SalfError("only a causal LM projects chosen positions through its head",
                            "leave projected_positions out for a classifier")
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


def step_cost(
    profile: CostProfile,
    trainable_blocks: Iterable[int],
    train_embeddings: bool = False,
    train_head: bool = True,
    optimizer: str = "adamw",
    untie_head: bool = False,
) -> StepCost:
    """Cost of one step that trains ``trainable_blocks`` (any set, contiguous or not).

    ``train_head`` trains the final norm and the head (with LoRA too: the head is trained fully, as
    peft's ``modules_to_save``). ``train_embeddings`` trains the embeddings, and with them a tied
    output projection. ``untie_head`` (a no-op for an untied model) gives the head its own copy of a
    tied projection: one more parameter matrix, trained with the head (its weight gradient and
    optimizer state), while the embeddings follow ``train_embeddings``. With a LoRA profile the
    trainable blocks carry adapters and their base weights stay frozen; frozen blocks carry none.
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
    untied = untie_head and profile.tied_head
    # The projection's weight gradient is paid when it trains: with the embeddings while tied, with the
    # head once untied (the same matmul either way, measured in the tied profile's head passes).
    projection_trained = (train_head if untied else train_embeddings) and profile.tied_head
    key = head_key(head_input, train_head, projection_trained)
    head_in = profile.backward_head[head_key(True, False, False)] if head_input else 0.0
    bwd_in += head_in
    bwd_w += profile.backward_head[key] - head_in
    activation += profile.activation_head[key]

    trainable = 0
    if train_embeddings:
        trainable += profile.params_embeddings + profile.params_other
    if train_head:
        trainable += profile.params_norm + profile.params_head
    copy = profile.params_output_projection if untied else 0
    if train_head:
        trainable += copy
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
        param_bytes=(profile.total_params + copy) * profile.dtype_bytes + adapter_bytes,
        grad_bytes=trainable * profile.dtype_bytes + adapter_bytes,
        optimizer_bytes=(trainable + adapters) * state_bytes,
        activation_bytes=int(activation),
        trainable_params=trainable + adapters,
        total_params=profile.total_params + copy + adapters,
    )


def boundary_costs(profile: CostProfile, train_head: bool = True, optimizer: str = "adamw",
                   untie_head: bool = False) -> list[StepCost]:
    """Step cost at every boundary k = 0..L.

    k = 0 is full fine-tuning (embeddings included; with a LoRA profile: adapters on every block and
    frozen embeddings); k > 0 freezes the embeddings and blocks 0..k-1 and trains blocks k..L-1 plus
    (``train_head``) the final norm and head. k = L trains the head alone. ``untie_head`` unties a tied
    head at every k > 0 (at k = 0 the tied projection trains with the embeddings anyway).
    """
    n = profile.num_layers
    lora = profile.lora_rank is not None
    return [
        step_cost(profile, range(k, n), train_embeddings=(k == 0 and not lora), train_head=train_head,
                  optimizer=optimizer, untie_head=untie_head and k > 0)
        for k in range(n + 1)
    ]


def head_kind_of(model: nn.Module) -> str:
    return "classification" if "SequenceClassification" in type(model).__name__ else "causal-lm"


__all__ = [
    "HEAD_KINDS",
    "LORA_MODES",
    "MODES",
    "OPTIMIZER_STATES",
    "OPTIMIZER_STATE_BYTES",
    "CostProfile",
    "StepCost",
    "boundary_costs",
    "head_key",
    "head_kind_of",
    "step_cost",
]
