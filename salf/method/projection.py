"""Plan past this machine: project the step cost of every boundary for a model you cannot load here.

Only the model's config is needed (a local ``config.json`` or a hub name). The model is built on the
``meta`` device, so a 70B config costs no memory, and costed with exactly the code the planner uses
(``salf.method.cost_profile.profile_cost`` + ``salf.method.cost.boundary_costs``). Step time is FLOPs divided by an
accelerator's dense bf16 peak times a utilisation (model FLOPs utilisation, MFU) that you supply:
0.4 is typical of a well-tuned fine-tuning run, 0.2-0.3 of an untuned one (on an H200, a 1B-class
Llama in bf16 with sdpa, batch 4 x 2048, ran real steps at 0.38-0.39 of 989 TFLOP/s, and the measured
time ratios between boundaries matched the FLOP ratios within 4%).

The *physical limit* columns bound what freezing can save: freezing blocks 0..k-1 of L removes their
backward pass, about 2/3 of their FLOPs (backward ~ 2 x forward), so at most (k/L)(2/3) of block FLOPs;
caching the frozen prefix's output across epochs removes its forward too, so at most k/L.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from salf import table
from salf.errors import SalfError
from salf.method.cost import OPTIMIZER_STATES, CostProfile, boundary_costs
from salf.method.cost_profile import CostShape, profile_cost
from salf.method.measure import MeasuredBoundary
from salf.models.builtin import is_builtin, resolve_builtin

# Dense (no structured sparsity) bf16 tensor-core peak per accelerator, FLOP/s, from the vendors' datasheets.
ACCELERATORS: dict[str, float] = {
    "h100": 989e12,  # NVIDIA H100 SXM5 datasheet: BF16 1,979 TFLOPS "with sparsity" -> 989 dense
    "h100-pcie": 756e12,  # NVIDIA H100 PCIe datasheet: BF16 1,513 TFLOPS with sparsity -> 756 dense
    "h200": 989e12,  # NVIDIA H200 SXM datasheet: BF16 1,979 TFLOPS with sparsity (same compute as H100 SXM)
    "b200": 2250e12,  # NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS per GPU with sparsity -> 2.25 dense
    "a100": 312e12,  # NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS (624 with sparsity)
    "l40s": 362e12,  # NVIDIA L40S datasheet: BF16 tensor core 733 TFLOPS with sparsity -> 362 dense
    "l4": 121e12,  # NVIDIA L4 datasheet: BF16 tensor core 242 TFLOPS with sparsity -> 121 dense
    "a10": 125e12,  # NVIDIA A10 datasheet: BF16 tensor core 125 TFLOPS (250 with sparsity)
    "v100": 125e12,  # NVIDIA V100 SXM2 datasheet: FP16 tensor core 125 TFLOPS (no bf16)
    "t4": 65e12,  # NVIDIA T4 datasheet: mixed-precision FP16 tensor core 65 TFLOPS (no bf16)
    "mi300x": 1307e12,  # AMD Instinct MI300X datasheet: BF16 dense 1,307.4 TFLOPS
}


@dataclass
class BoundaryProjection:
    """Projected cost of one training step at one boundary (bytes are per device, no sharding)."""

    boundary: int
    """k: blocks 0..k-1 and the embeddings are frozen (k = 0: full fine-tuning)."""
    trainable_blocks: int
    """Blocks trained (L - k)."""
    forward_flops: float
    """Forward FLOPs of one step."""
    backward_flops: float
    """Backward FLOPs of one step."""
    total_flops: float
    """Forward + backward FLOPs of one step."""
    ratio_to_full: float
    """Step FLOPs as a fraction of full fine-tuning's (k = 0)."""
    param_bytes: int
    """All parameters."""
    grad_bytes: int
    """Gradients of trainable parameters."""
    optimizer_bytes: int
    """Optimizer state of trainable parameters."""
    activation_bytes: int
    """Tensors saved for backward."""
    step_seconds: float
    """Projected step time: total FLOPs / (peak x utilisation)."""
    limit_saving: float
    """Most that freezing k of L blocks can save, as a fraction of block FLOPs: (k/L)(2/3)."""
    limit_saving_cached: float
    """The same with the frozen prefix's output cached across epochs: k/L."""

    def __post_init__(self) -> None:
        if self.boundary < 0 or self.trainable_blocks < 0:
            raise ValueError(f"boundary {self.boundary} / trainable blocks {self.trainable_blocks} must be >= 0")

    @property
    def saving(self) -> float:
        """Fraction of full fine-tuning's step FLOPs this boundary saves."""
        return 1.0 - self.ratio_to_full

    @property
    def memory_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saving": self.saving, "memory_bytes": self.memory_bytes}


@dataclass
class Projection:
    """Projected per-boundary step costs of one model config at one batch shape on one accelerator."""

    model: str
    """What was projected: the config path or hub name (or the config's model type)."""
    model_type: str
    """``config.model_type``."""
    num_layers: int
    """Blocks L."""
    total_params: int
    """Parameters of the model (a tied output projection counted once)."""
    batch_size: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence."""
    lora_rank: int | None
    """LoRA rank on the trained blocks, or None for full-weight training."""
    attention: str
    """Attention implementation costed ('sdpa': the fused GPU kernel; 'eager')."""
    accelerator: str | None
    """Key of ``ACCELERATORS``, or None when only ``peak_flops`` was given."""
    peak_flops: float
    """Dense peak FLOP/s used for step time."""
    utilisation: float
    """Fraction of peak assumed to be achieved (MFU)."""
    rows: list[BoundaryProjection]
    """One entry per projected boundary, in increasing k."""
    profile_seconds: float
    """Wall time the projection took."""

    def __post_init__(self) -> None:
        if not 0 < self.utilisation <= 1:
            raise SalfError(f"utilisation must be in (0, 1], got {self.utilisation}", "e.g. 0.4")
        if self.peak_flops <= 0:
            raise SalfError(f"peak FLOP/s must be positive, got {self.peak_flops}")

    def row(self, boundary: int) -> BoundaryProjection:
        for r in self.rows:
            if r.boundary == boundary:
                return r
        raise KeyError(f"boundary {boundary} was not projected")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rows"}
        return {**data, "rows": [r.to_dict() for r in self.rows]}


def read_model_config(config_or_path: Any):
    """A transformers config from a config object, a local ``config.json`` / model folder, a hub name or a
    ``builtin:NAME`` (``salf.models.builtin``)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path
    if is_builtin(config_or_path):
        config_or_path = resolve_builtin(config_or_path)
    if isinstance(config_or_path, str) and config_or_path.startswith("tiny:"):
        return tiny_spec_config(config_or_path)
    if not isinstance(config_or_path, (str, os.PathLike)):
        raise SalfError(f"cannot read a model config from a {type(config_or_path).__name__}",
                        "pass a path to config.json, a model folder, a hub model name or a PretrainedConfig")
    path = Path(config_or_path).expanduser()
    local = path.exists()
    if not local and (path.suffix == ".json" or str(config_or_path).startswith((".", "/", "~"))):
        raise SalfError(f"no config file at {path}", "check the path to the model's config.json")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        if local:
            raise SalfError(f"cannot read a transformers config from {path}: {e}",
                            "pass the model's config.json (with a model_type) or its folder") from e
        raise SalfError(f"cannot fetch the config of {config_or_path!r} from the Hugging Face hub: {e}",
                        "check the name and network access (or HF_HUB_OFFLINE), or pass a local config.json") from e


def tiny_spec_config(spec: str):
    """``tiny:TYPE[:key=value,...]``: a small random config of a supported type (``salf.models.tiny``), with overrides.

    E.g. ``tiny:llama`` or ``tiny:llama:hidden_size=1024,intermediate_size=4096,num_hidden_layers=4``.
    """
    import json

    from salf.models.tiny import TINY_CONFIGS, tiny_config

    _, _, rest = spec.partition(":")
    model_type, _, overrides = rest.partition(":")
    if model_type not in TINY_CONFIGS:
        raise SalfError(f"no tiny config for {model_type!r}", f"use tiny:TYPE with TYPE one of {', '.join(TINY_CONFIGS)}")
    kwargs = {}
    for item in filter(None, (x.strip() for x in overrides.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SalfError(f"override {item!r} in {spec!r} is not key=value", "write e.g. tiny:llama:hidden_size=512")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return tiny_config(model_type, **kwargs)


def _peak(accelerator: str | None, peak_tflops: float | None) -> tuple[str | None, float]:
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise SalfError(f"peak_tflops must be positive, got {peak_tflops}")
        return accelerator, peak_tflops * 1e12
    if accelerator is None:
        raise SalfError("no accelerator and no peak FLOP/s given", f"pick one of {', '.join(ACCELERATORS)} or give peak_tflops")
    key = accelerator.lower()
    if key not in ACCELERATORS:
        raise SalfError(f"unknown accelerator {accelerator!r}",
                        f"use one of {', '.join(ACCELERATORS)}, or give its dense bf16 peak as peak_tflops")
    return key, ACCELERATORS[key]


@dataclass(frozen=True)
class Throughput:
    """The FLOP/s a step is assumed to run at: an accelerator's dense bf16 peak times a utilisation (MFU)."""

    accelerator: str | None = "h100"
    """Key of ``ACCELERATORS`` (any case), or None when ``peak_tflops`` is given."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s; overrides the accelerator's table entry."""
    utilisation: float = 0.4
    """Fraction of peak achieved (model FLOPs utilisation), in (0, 1]."""

    def __post_init__(self) -> None:
        if not 0 < self.utilisation <= 1:
            raise SalfError(f"utilisation must be in (0, 1], got {self.utilisation}", "e.g. 0.4")
        _peak(self.accelerator, self.peak_tflops)  # unknown accelerator, no peak or a non-positive one

    @property
    def key(self) -> str | None:
        """The accelerator's key in ``ACCELERATORS`` (lower case), or the given name with ``peak_tflops``."""
        return _peak(self.accelerator, self.peak_tflops)[0]

    @property
    def peak_flops(self) -> float:
        """Dense peak FLOP/s."""
        return _peak(self.accelerator, self.peak_tflops)[1]


@dataclass(frozen=True)
class StepTraining:
    """What a projected step trains besides the blocks after the boundary, and with which optimizer."""

    lora_rank: int | None = None
    """LoRA rank of adapters on the trained blocks; None trains their full weights."""
    optimizer: str = "adamw"
    """Optimizer whose state is counted (a key of ``salf.method.cost.OPTIMIZER_STATES``)."""
    train_head: bool = True
    """Train the final norm and the head."""

    def __post_init__(self) -> None:
        if self.lora_rank is not None and self.lora_rank < 1:
            raise SalfError(f"LoRA rank must be >= 1, got {self.lora_rank}")
        if self.optimizer not in OPTIMIZER_STATES:
            raise SalfError(f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZER_STATES)}")


def project(
    config_or_path: Any,
    shape: CostShape,
    training: StepTraining = StepTraining(),
    boundaries: Iterable[int] | None = None,
    throughput: Throughput = Throughput(),
    task: str = "causal-lm",
    dtype: str | None = None,
    attention: str = "sdpa",
) -> Projection:
    """Project the step cost of each boundary of a model from its config alone, at ``shape`` (batch x
    sequence length; ``shape.projected_positions`` for a causal LM trained on completions).

    ``training``: LoRA or full weights, the optimizer and the head. ``throughput`` turns FLOPs into step
    time. ``dtype`` ('bfloat16', 'float32'...) overrides the config's for parameter and activation bytes.
    ``attention`` is the attention implementation trained with: 'sdpa' (default) or a flash attention is
    costed as the fused GPU kernel (no T x T probabilities stored), 'eager' as plain matrix products.
    ``boundaries`` defaults to every k = 0..L; ratios are always to full fine-tuning.
    """
    import torch

    start = time.perf_counter()
    accelerator, peak = throughput.key, throughput.peak_flops
    lora_rank = training.lora_rank
    config = read_model_config(config_or_path)
    torch_dtype = None
    if dtype is not None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise SalfError(f"unknown dtype {dtype!r}", "use bfloat16, float16 or float32")
    profile: CostProfile = profile_cost(config, shape, lora_rank=lora_rank, task=task, dtype=torch_dtype,
                                        attn_implementation=attention)
    n = profile.num_layers
    costs = boundary_costs(profile, train_head=training.train_head, optimizer=training.optimizer)
    ks = sorted(set(range(n + 1) if boundaries is None else boundaries))
    bad = [k for k in ks if not 0 <= k <= n]
    if bad:
        raise SalfError(f"boundaries {bad} are out of range for a model of {n} blocks", f"use 0..{n}")
    full = costs[0]
    rows = [
        BoundaryProjection(
            boundary=k,
            trainable_blocks=n - k,
            forward_flops=costs[k].forward,
            backward_flops=costs[k].backward,
            total_flops=costs[k].total,
            ratio_to_full=costs[k].ratio_to(full),
            param_bytes=costs[k].param_bytes,
            grad_bytes=costs[k].grad_bytes,
            optimizer_bytes=costs[k].optimizer_bytes,
            activation_bytes=costs[k].activation_bytes,
            step_seconds=costs[k].total / (peak * throughput.utilisation),
            limit_saving=k / n * 2 / 3,
            limit_saving_cached=k / n,
        )
        for k in ks
    ]
    name = str(config_or_path) if isinstance(config_or_path, (str, os.PathLike)) else profile.model_type
    return Projection(
        model=name,
        model_type=profile.model_type,
        num_layers=n,
        total_params=profile.total_params,
        batch_size=shape.batch_size,
        seq_len=shape.seq_len,
        lora_rank=lora_rank,
        attention=profile.attn_implementation,
        accelerator=accelerator,
        peak_flops=peak,
        utilisation=throughput.utilisation,
        rows=rows,
        profile_seconds=time.perf_counter() - start,
    )


def render_projection(projection: Projection) -> str:
    """The projection as an aligned terminal table."""
    p = projection
    where = p.accelerator or "custom accelerator"
    training = f"LoRA r={p.lora_rank}" if p.lora_rank else "full weights"
    title = (f"{p.model} ({p.model_type}, {p.num_layers} blocks, {p.total_params / 1e9:.2f}B params), "
             f"batch {p.batch_size} x {p.seq_len} tokens, {training}, {p.attention} attention; step time on {where} at "
             f"{p.peak_flops / 1e12:.0f} TFLOP/s x {p.utilisation:.0%}")
    headers = ["k", "trained", "fwd TFLOP", "bwd TFLOP", "total TFLOP", "vs full", "saving",
               "limit", "limit+cache", "params", "grads", "optimizer", "activations", "step s"]
    rows = [
        [r.boundary, r.trainable_blocks, r.forward_flops / 1e12, r.backward_flops / 1e12, r.total_flops / 1e12,
         f"{r.ratio_to_full:.1%}", f"{r.saving:.1%}", f"{r.limit_saving:.1%}", f"{r.limit_saving_cached:.1%}",
         table.human_bytes(r.param_bytes), table.human_bytes(r.grad_bytes), table.human_bytes(r.optimizer_bytes),
         table.human_bytes(r.activation_bytes), r.step_seconds]
        for r in p.rows
    ]
    note = ("limit: most that freezing blocks 0..k-1 can save of block FLOPs, (k/L)(2/3) without and k/L with "
            "a cache of the frozen prefix's output; saving is of the whole step (head included).")
    return table.render_table(headers, rows, title=title) + "\n" + note


__all__ = ["ACCELERATORS", "BoundaryProjection", "Projection", "StepTraining", "Throughput", "project",
           "read_model_config", "render_projection"]


@dataclass
class CostResult:
    """``salf cost`` output: the projection, and with ``--measure`` real steps on this machine, as a table or JSON."""

    projection: Projection
    measured: list[MeasuredBoundary] | None = None
    """Real training steps per boundary (``salf.method.measure``), when asked for."""
    device: str | None = None
    """Where the steps were measured, in words."""

    def render(self) -> str:
        text = render_projection(self.projection)
        if self.measured:
            text += "\n\n" + render_measured(self.projection, self.measured, self.device or "")
        return text

    def to_json(self) -> dict[str, Any]:
        data = self.projection.to_dict()
        if self.measured:
            data["measured"] = {"device": self.device, "rows": compare_measured(self.projection, self.measured)}
        return data


def compare_measured(projection: Projection, measured: list[MeasuredBoundary]) -> list[dict[str, Any]]:
    """Predicted against measured, per boundary: FLOPs, step time, saved activations, gradients + optimizer state."""
    full = next((m for m in measured if m.boundary == 0), None)
    rows = []
    for m in measured:
        r = projection.row(m.boundary)
        time_ratio = m.step_seconds_median / full.step_seconds_median if full else None
        flops_ratio = m.total_flops / full.total_flops if full and full.total_flops else None
        predicted_saving = 1.0 - r.ratio_to_full
        rows.append({
            "boundary": m.boundary, "predicted_flops_ratio": r.ratio_to_full, "measured_flops_ratio": flops_ratio,
            "measured_time_ratio": time_ratio,
            # how much of the predicted saving the wall clock delivered (1.0 = exactly as predicted)
            "saving_delivered": (1.0 - time_ratio) / predicted_saving if time_ratio is not None and predicted_saving > 0
            else None,
            "predicted_activation_bytes": r.activation_bytes, "measured_activation_bytes": m.activation_bytes,
            "predicted_state_bytes": r.grad_bytes + r.optimizer_bytes,
            "measured_state_bytes": m.grad_bytes + m.optimizer_bytes,
            "peak_memory_bytes": m.peak_memory_bytes, "step_seconds_median": m.step_seconds_median,
            "timed_steps": len(m.step_seconds), "measured": m.to_dict()})
    return rows


def render_measured(projection: Projection, measured: list[MeasuredBoundary], device: str) -> str:
    rows = compare_measured(projection, measured)
    steps = rows[0]["timed_steps"] if rows else 0
    show_peak = any(r["peak_memory_bytes"] for r in rows)  # CUDA only
    headers = ["k", "FLOPs vs full: predicted", "measured", "step time vs full", "saving delivered",
               "activations: predicted", "measured", "grads+optimizer: predicted", "measured", "step ms",
               *(["peak memory"] if show_peak else [])]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    body = []
    for r in rows:
        line = [r["boundary"], pct(r["predicted_flops_ratio"]), pct(r["measured_flops_ratio"]),
                pct(r["measured_time_ratio"]), "-" if r["saving_delivered"] is None else f"{r['saving_delivered']:.2f}",
                table.human_bytes(r["predicted_activation_bytes"]), table.human_bytes(r["measured_activation_bytes"]),
                table.human_bytes(r["predicted_state_bytes"]), table.human_bytes(r["measured_state_bytes"]),
                r["step_seconds_median"] * 1e3]
        if show_peak:
            line.append(table.human_bytes(r["peak_memory_bytes"] or 0))
        body.append(line)
    title = f"Measured on {device}: real optimizer steps per boundary (median of {steps} timed steps each)"
    note = ("saving delivered: measured step-time saving / predicted FLOP saving (1.00 = as predicted). "
            "Measured FLOPs and saved bytes come from FlopCounterMode and saved-tensor hooks on one step.")
    return table.render_table(headers, body, title=title) + "\n" + note


def parse_boundaries(text: str | None) -> list[int] | None:
    if text in (None, "", "all"):
        return None
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise SalfError(f"--boundaries {text!r} is not a list of block indices", "write e.g. --boundaries 0,8,16 or all") from None
