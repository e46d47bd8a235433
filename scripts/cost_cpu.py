"""Cost side of the benchmark on this machine: real optimizer steps per boundary vs the cost model.

Random models built from configs (every causal architecture of the table and BERT at the tiny test
size, a GPT-2 the size of the causal benchmark fixture, and a Llama wide enough that its blocks
dominate the step) are trained for a few real AdamW steps at every boundary with salf's freezing
(``salf cost --measure``, CPU: fp32, eager attention, 1 torch thread). Writes one JSON per model and
``summary.md`` to ``bench/results/cost-cpu/`` (about 15 minutes on the 2-core CPU machine):

    python scripts/cost_cpu.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from salf.commands.cost import run as cost
from salf.config.commands import CostOptions
from salf.fileio import write_atomic, write_json

OUT = Path(__file__).resolve().parent.parent / "bench" / "results" / "cost-cpu"
FIXTURE = "tiny:gpt2:n_embd=256,n_layer=8,n_head=4,vocab_size=4096,n_positions=256"
WIDE = ("tiny:llama:hidden_size=1024,intermediate_size=2816,num_hidden_layers=4,num_attention_heads=16,"
        "num_key_value_heads=16")
MODELS = [*((f"tiny-{a}", f"tiny:{a}", 64, "causal-lm") for a in ("gpt2", "llama", "qwen2", "gemma", "phi",
                                                                  "gpt_neox", "opt")),
          ("tiny-bert", "tiny:bert", 64, "classification"),
          ("gpt2-fixture-size", FIXTURE, 128, "causal-lm"),
          ("llama-wide", WIDE, 128, "causal-lm")]


def main() -> None:
    only = set(sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["| model | blocks | params | k (trained blocks) | predicted FLOPs x full | measured FLOPs x full | "
             "measured step time x full | saving delivered | activations measured = predicted | "
             "grads+optimizer measured = predicted |", "|" + "---|" * 10]
    for name, config, seq, task in MODELS:
        if only and name not in only:
            continue
        result = cost(CostOptions(config, seq=seq, batch=4, task=task, measure=True, measure_steps=4, measure_repeats=2,
                                  threads=1))
        data = {"config": config, "seq": seq, "batch": 4, "task": task, "device": result.device, **result.to_json()}
        write_json(OUT / f"{name}.json", data)
        rows = data["measured"]["rows"]
        n = data["num_layers"]
        for r in rows:
            k = r["boundary"]
            lines.append(
                f"| {name} | {n} | {data['total_params'] / 1e6:.2f}M | {k} ({n - k}) | {r['predicted_flops_ratio']:.3f} | "
                f"{r['measured_flops_ratio']:.3f} | {r['measured_time_ratio']:.3f} | "
                + ("-" if r["saving_delivered"] is None else f"{r['saving_delivered']:.2f}") + " | "
                + ("yes" if r["measured_activation_bytes"] == r["predicted_activation_bytes"] else "no") + " | "
                + ("yes" if r["measured_state_bytes"] == r["predicted_state_bytes"] else "no") + " |")
        delivered = [r["saving_delivered"] for r in rows if r["saving_delivered"] is not None]
        print(f"{name}: saving delivered median {statistics.median(delivered):.2f}", flush=True)
    write_atomic(OUT / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"out": str(OUT)}))


if __name__ == "__main__":
    main()
