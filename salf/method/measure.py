"""Measure real training steps per boundary, to check the cost model on this machine (``salf cost --measure``).

For each boundary k the model is frozen with salf's own plan (``salf.method.freeze.apply_plan``: no-grad
prefix, no optimizer state for frozen parameters) and trained for a few real optimizer steps on one
fixed batch. Recorded per k:

- step FLOPs and the bytes saved for backward, from one step under ``FlopCounterMode`` and the
  saved-tensor hooks (``salf.method.cost_counting.measure_step_flops``): the quantities the cost model predicts;
- gradient and optimizer-state bytes actually allocated after an optimizer step;
- the median wall time of a full step (forward, backward, optimizer step), and on CUDA the peak
  allocated memory.

Wall time on a shared machine drifts, so the boundaries are swept ``repeats`` times in alternating
order (0..L, L..0, ...) and each boundary's time is the median over all its timed steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from salf.method.cost_counting import measure_step_flops, tensor_bytes
from salf.method.freeze import FreezeSpec, apply_plan

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, as the Trainer builds it (fused on CUDA: the fast path a GPU user gets)."""
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=1e-5, fused=fused)


@dataclass
class MeasuredBoundary:
    """Real training steps of one boundary."""

    boundary: int
    """k: embeddings and blocks 0..k-1 frozen."""
    forward_flops: int
    """Forward FLOPs of one step (FlopCounterMode)."""
    backward_flops: int
    """Backward FLOPs of one step (FlopCounterMode)."""
    activation_bytes: int
    """Bytes saved for backward in one step (saved-tensor hooks, each storage once, parameters excluded)."""
    grad_bytes: int
    """Bytes of the gradients allocated after a step."""
    optimizer_bytes: int
    """Bytes of the optimizer state allocated after a step."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of every timed step (forward, backward, optimizer step)."""
    peak_memory_bytes: int | None = None
    """CUDA only: peak allocated memory over this boundary's steps (the largest over repeats)."""
    trainable_params: int = 0
    """Parameters trained at this boundary."""

    @property
    def total_flops(self) -> int:
        return self.forward_flops + self.backward_flops

    @property
    def step_seconds_median(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_flops": self.total_flops, "step_seconds_median": self.step_seconds_median}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(model: nn.Module, batch: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer, steps: int,
                 warmup: int, device: torch.device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def measure_boundaries(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    boundaries: Sequence[int],
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 2,
    optimizer: OptimizerFactory = default_optimizer,
    count_flops: bool = True,
) -> list[MeasuredBoundary]:
    """Train ``model`` on ``batch`` at every boundary in ``boundaries``; see the module docstring.

    ``count_flops=False`` skips the FlopCounterMode step (FLOPs and saved bytes are then 0), e.g. on a
    GPU where one extra step of a large model is not wanted. The model is left without a plan.
    """
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"steps {steps} must be >= 1, warmup {warmup} >= 0, repeats {repeats} >= 1")
    from salf.models.arch import find_parts

    num_layers = find_parts(model).num_layers
    device = next(model.parameters()).device
    model.train()
    results: dict[int, MeasuredBoundary] = {}
    order = list(dict.fromkeys(boundaries))
    for repeat in range(repeats):
        for k in order if repeat % 2 == 0 else order[::-1]:
            report = apply_plan(model, FreezeSpec.from_boundary(k, num_layers))
            try:
                if k not in results:
                    counted = measure_step_flops(model, batch) if count_flops else None
                    results[k] = MeasuredBoundary(
                        boundary=k, forward_flops=counted.forward if counted else 0,
                        backward_flops=counted.backward if counted else 0,
                        activation_bytes=counted.activation_bytes if counted else 0,
                        grad_bytes=0, optimizer_bytes=0, trainable_params=report.trainable_params)
                params = [p for p in model.parameters() if p.requires_grad]
                opt = optimizer(params)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                # one untimed step allocates the gradients and the optimizer state, which are then counted
                model(**batch).loss.backward()
                results[k].grad_bytes = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
                opt.step()
                results[k].optimizer_bytes = sum(tensor_bytes(v) for state in opt.state.values() for v in state.values()
                                                 if isinstance(v, torch.Tensor) and v.dim() > 0)
                opt.zero_grad(set_to_none=True)
                results[k].step_seconds += _timed_steps(model, batch, opt, steps, warmup, device)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device)
                    results[k].peak_memory_bytes = max(results[k].peak_memory_bytes or 0, peak)
                del opt
            finally:
                report.remove()
                for p in model.parameters():
                    p.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return [results[k] for k in order]
