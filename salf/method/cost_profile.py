"""``profile_cost``: the ``CostProfile`` of a model, measured on a copy rebuilt on the ``meta`` device.

Each profiling pass (``salf.method.cost_counting``) runs one batch with one ``requires_grad`` pattern;
the passes together give every block's figures in every mode (``salf.method.cost`` composes them into
step costs). Deep models are profiled on a reduced config (one representative block per distinct block
shape) and the figures replicated. Fused attention (``sdpa``, flash) is profiled as the kernel a GPU
runs (``FUSED_ATTENTION``).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from salf.compat import dtype_kwargs
from salf.data.batch import IGNORE_INDEX
from salf.errors import SalfError
from salf.method.cost import HEAD_KINDS, CostProfile, head_key, head_kind_of
from salf.method.cost_counting import run_probe
from salf.method.cost_lora import profile_lora
from salf.models.arch import ARCHITECTURES, ModelParts, find_parts
from salf.models.pooling import apply_head_pooling

_LEARNED_POSITIONS = ("gpt2", "opt", "bert")
"""Model types with a learned position table: a step longer than the table fails on a real model."""


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
            model = auto.from_config(config, attn_implementation=attn, **dtype_kwargs(dtype))
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


def _meta_keep(projected_positions: int | None) -> torch.Tensor | None:
    """The positions the profile projects through the head (None: all). The counts depend on how many
    there are, not on which."""
    if projected_positions is None:
        return None
    return torch.arange(projected_positions, device="meta")


def labelled_positions_estimate(data: Sequence[dict], batch_size: int, seq_len: int) -> int | None:
    """Positions per sequence a training step of ``batch_size`` data projects through a causal LM's head
    (``salf.method.cost_counting.labelled_positions``), estimated from tokenized ``data``; None where a step
    projects every position (plain text, class-index labels), as training then does.

    Training projects the union of a batch's labelled positions over its rows. This estimates the union
    by the sum: the mean labelled positions per datum times the batch size, capped at ``seq_len``. Prompts
    of different lengths put their completions at different positions, so the rows of completion data
    seldom share one and the sum is close; where they do share (prompts of one length) the union is
    smaller (a batch's union is never more than its sum), so the estimate can overstate the head's cost
    but not understate it. Simulating batches would be closer, but would depend on the batch order,
    which the plan does not know.
    """
    counts = [sum(label != IGNORE_INDEX for label in d["labels"][1:])
              for d in data if not isinstance(d["labels"], int)]
    if not counts:
        return None
    positions = math.ceil(sum(counts) / len(counts) * batch_size)
    # The trainer projects every position once (nearly) all are labelled: see its fallback.
    return positions if positions < seq_len - 1 else None


def _group_params(model: nn.Module, parts: ModelParts) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        group = parts.group_of(name)
        counts["blocks" if group.startswith("block:") else group] += p.numel()
    return counts


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


@dataclass(frozen=True)
class CostShape:
    """The shape of the training step a cost profile is measured at."""

    batch_size: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence."""
    projected_positions: int | None = None
    """Positions of each sequence a step projects through a causal LM's head, as training on completions
    does (``labelled_positions_estimate``); None: all of them."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise SalfError(f"batch_size and seq_len must be >= 1, got {self.batch_size} and {self.seq_len}")
        if self.projected_positions is not None and not 1 <= self.projected_positions <= self.seq_len:
            raise SalfError(
                f"projected_positions {self.projected_positions} needs a causal LM and 1..{self.seq_len} positions",
                "leave it out to project every position",
            )


def profile_cost(
    model_or_config: Any,
    shape: CostShape,
    lora_rank: int | None = None,
    task: str | None = None,
    num_labels: int = 2,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    replicate: bool = True,
) -> CostProfile:
    """Measure the cost profile of a model (or a transformers config) at ``shape`` (batch x sequence length).

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

    ``shape.projected_positions`` (a causal LM only): a step projects only this many positions of each
    sequence through the head, as training on completions does (``labelled_positions_estimate``); None: all
    of them.
    """
    batch_size, seq_len, projected_positions = shape.batch_size, shape.seq_len, shape.projected_positions
    model = None
    config = model_or_config
    if isinstance(model_or_config, nn.Module):
        model = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
        config = getattr(model, "config", None)
        if config is None:
            raise SalfError(f"{type(model).__name__} has no transformers config to profile",
                            "pass a transformers model or its PretrainedConfig")
        task = task or head_kind_of(model)
        if task == "classification":
            num_labels = getattr(config, "num_labels", num_labels)
    task = task or "causal-lm"
    if task not in HEAD_KINDS:
        raise SalfError(f"unknown task {task!r}", f"use one of {', '.join(HEAD_KINDS)}")
    if lora_rank is not None and lora_rank < 1:
        raise SalfError(f"LoRA rank must be >= 1, got {lora_rank}")
    if projected_positions is not None and task != "causal-lm":
        raise SalfError(f"projected_positions {projected_positions} needs a causal LM and 1..{seq_len} positions",
                        "leave it out to project every position")
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
                               seq_len, lora_rank, projected_positions)
            return _replicate(profile, reps, n)
    return _profile(config, task, num_labels, dtype, attn, batch_size, seq_len, lora_rank, projected_positions)


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
             seq_len: int, lora_rank: int | None, projected_positions: int | None) -> CostProfile:
    meta = build_model(config, task, num_labels, dtype, attn)
    parts = find_parts(meta)
    batch = _meta_batch(task, batch_size, seq_len)
    keep = _meta_keep(projected_positions)
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
        "full": run_probe(meta, parts, batch, True, lambda name: True, keep=keep),
        "input": run_probe(meta, parts, batch, True, lambda name: False, keep=keep),
        "lowest": run_probe(meta, parts, batch, False, lambda name: True, keep=keep),
    }
    head_passes = {
        head_key(True, True, tied): passes["full"],
        head_key(True, False, False): passes["input"],
        head_key(False, True, tied): passes["lowest"],
    }
    if tied:
        for head_input in (True, False):
            head_passes[head_key(head_input, True, False)] = run_probe(meta, parts, batch, False, head, head_input,
                                                                       keep)
            head_passes[head_key(head_input, False, True)] = run_probe(meta, parts, batch, False, embeddings,
                                                                       head_input, keep)
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
        params_output_projection=out_emb.weight.numel() if tied else 0,
        params_other=groups["other"],
        forward_embeddings=float(full.forward["embeddings"]),
        forward_head=float(full.forward["head"]),
        forward_other=float(full.forward["other"]),
        backward_embeddings=float(full.backward["embeddings"]),
        activation_embeddings=int(full.saved.bytes["embeddings"]),
        backward_head=backward_head,
        activation_head=activation_head,
        projected_positions=projected_positions,
    )
    if tied:  # in the 'full' pass the embeddings were trained with the tied head; this pass trains them alone
        only = head_passes[head_key(False, False, True)]
        data["backward_embeddings"] = float(only.backward["embeddings"])
        data["activation_embeddings"] = int(only.saved.bytes["embeddings"])
    if lora_rank is not None:
        data["lora_rank"] = lora_rank
        lora = profile_lora(meta, parts, batch, task, lora_rank, data["forward_blocks"], keep)
        for key in ("backward_blocks", "activation_blocks", "shared_activation_blocks"):
            data[key].update(lora.pop(key))
        data.update(lora)
    return CostProfile(**data)


__all__ = ["FUSED_ATTENTION", "CostShape", "build_model", "labelled_positions_estimate", "profile_cost"]
