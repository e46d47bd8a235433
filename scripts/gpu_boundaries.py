"""Measure step time and peak memory per boundary for a ~1B Llama-style model on one GPU.

Built from its config (Llama-3.2-1B sizes, random weights: timing does not depend on the values),
bf16, sdpa attention, AdamW on the trainable parameters only, salf's own freezing (no-grad prefix).
Run on a GPU machine from the repository root:

    PYTHONPATH=. python3 scripts/gpu_boundaries.py --out gpu_boundaries.json

Compare with the projection from the config alone: `salf cost --config scripts/llama_1b.json --seq 1024 --batch 4`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from salf.freeze import FreezeSpec, apply_plan

CONFIG = Path(__file__).with_name("llama_1b.json")


def measure(model, batch, k: int, layers: int, steps: int, warmup: int) -> dict:
    report = apply_plan(model, FreezeSpec.from_boundary(k, layers))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated()
    del opt
    report.remove()
    for p in model.parameters():
        p.grad = None
    torch.cuda.empty_cache()
    return {"boundary": k, "step_seconds_median": statistics.median(times), "step_seconds_min": min(times),
            "peak_memory_bytes": peak, "trainable_params": report.trainable_params, "total_params": report.total_params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    config = AutoConfig.from_pretrained(CONFIG)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model.train()
    layers = config.num_hidden_layers
    ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    rows = []
    for k in range(0, layers + 1, 2):
        rows.append(measure(model, batch, k, layers, a.steps, a.warmup))
        print(json.dumps(rows[-1]), flush=True)
    full = rows[0]
    for r in rows:
        r["time_ratio"] = r["step_seconds_median"] / full["step_seconds_median"]
        r["memory_ratio"] = r["peak_memory_bytes"] / full["peak_memory_bytes"]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": a.seq, "batch": a.batch,
              "dtype": "bfloat16", "attention": "sdpa", "num_parameters": sum(p.numel() for p in model.parameters()),
              "rows": rows}
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
