"""``salf cost``: per-boundary step FLOPs, memory and projected step time of a model, from its config alone.

``--measure`` also builds the model with random weights on this machine (CUDA if present, in bf16 with
sdpa; else the CPU in fp32 with eager attention, whose matmuls FlopCounterMode counts) and times real
optimizer steps at every projected boundary (``salf.method.measure``).
"""

from __future__ import annotations

import os
from typing import Any

from salf.config.commands import CostOptions
from salf.errors import SalfError
from salf.method.cost_profile import CostShape
from salf.method.projection import (
    CostResult,
    StepTraining,
    Throughput,
    parse_boundaries,
    project,
    read_model_config,
)


def random_batch(config: Any, task: str, batch: int, seq: int, device: str) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=g).to(device)
    labels = torch.randint(0, config.num_labels, (batch,), generator=g).to(device) if task == "classification" else ids
    return {"input_ids": ids, "labels": labels}


def run(options: CostOptions) -> CostResult:
    """Per-boundary FLOPs, memory and projected step time from a config alone.

    With ``--measure``, projected with the dtype and attention the measurement uses. ``--threads``: torch CPU
    threads while measuring (1 is steadiest on a machine shared with other jobs).
    """
    import torch

    o = options
    config, seq, batch, task = o.config, o.seq, o.batch, o.task
    dtype, attention, device = None, "sdpa", None
    if o.measure:
        if o.lora:
            raise SalfError("--measure trains full weights", "drop --lora to measure (the projection works for LoRA)")
        if o.optimizer != "adamw":
            raise SalfError("--measure steps AdamW", "drop --optimizer to measure")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype, attention = ("bfloat16", "sdpa") if device == "cuda" else ("float32", "eager")
    projection = project(config, CostShape(batch, seq), StepTraining(o.lora_rank if o.lora else None, o.optimizer),
                         boundaries=parse_boundaries(o.boundaries),
                         throughput=Throughput(o.accelerator, o.peak_tflops, o.utilisation),
                         task=task, dtype=dtype, attention=attention)
    if not o.measure:
        return CostResult(projection)
    from salf.method.cost_profile import build_model
    from salf.method.measure import measure_boundaries

    if o.threads:
        torch.set_num_threads(o.threads)
    loaded = read_model_config(config)
    torch.manual_seed(0)  # random weights: timing and memory do not depend on the values
    model = build_model(loaded, task, loaded.num_labels, getattr(torch, dtype), attention, device=device)
    if task == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = 0  # a sequence classifier needs one to find each row's last token
    measured = measure_boundaries(model, random_batch(loaded, task, batch, seq, device),
                                  [r.boundary for r in projection.rows], steps=o.measure_steps, repeats=o.measure_repeats)
    where = (torch.cuda.get_device_name() if device == "cuda" else
             f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    return CostResult(projection, measured, f"{where}, torch {torch.__version__}, {dtype}, {attention} attention")
