"""Which vector should e5-small's classification head read: its first token, or the mean of its tokens?

multilingual-e5-small was trained on mean-pooled vectors and its checkpoint has no pooler, so
``BertForSequenceClassification``'s first-token pooler starts from a vector nobody trained to summarise
the text. This trains the same task at a few boundaries with each head pooling (same data, seed and
recipe as ``bench/e5-quick.json``) and writes one JSON line per run plus a Markdown table to
``bench/results/head-pooling/`` (about 30 minutes per seed on the 2-core CPU machine):

    python scripts/head_pooling.py [--corpus debian-section] [--seeds 0] [--boundaries 12,6,0]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from salf.bench.suite import BenchSuite
from salf.commands.loading import load
from salf.config import DataConfig
from salf.config.commands import ModelSource
from salf.data.corpora import build_corpus
from salf.data.encode import load_task_data
from salf.fileio import write_atomic
from salf.method.freeze import FreezeSpec
from salf.training.config import TrainConfig
from salf.training.inputs import TrainingData
from salf.training.run import train

OUT = Path(__file__).resolve().parent.parent / "bench" / "results" / "head-pooling"
MODEL = "builtin:e5-small"


def run(corpus: str, seed: int, boundary: int, pooling: str, work: Path) -> dict:
    task = next(t for t in BenchSuite.load("e5-quick").tasks if t.corpus == corpus)
    files = build_corpus(corpus, work / "data", seed=task.data_seed, limit=task.corpus_limit)
    torch.manual_seed(seed)  # the fresh head is drawn when the model loads
    loaded = load(ModelSource(MODEL, str(files.train_path), pooling), DataConfig(max_length=task.max_length, seed=task.data_seed))
    held = load_task_data(files.eval_path, loaded.model.tokenizer, replace(loaded.config, limit=task.eval_limit),
                          label_names=loaded.data.label_names)
    lm, data = loaded.model, loaded.data
    lm.model.set_attn_implementation("eager")
    config = TrainConfig(max_steps=task.steps, batch_size=task.batch_size, learning_rate=task.lr,
                         head_learning_rate=task.head_lr, warmup_ratio=task.warmup_ratio, seed=seed, overwrite=True,
                         save_steps=None, show_progress=False)
    started = time.perf_counter()
    metrics = train(lm.model, lm.tokenizer, TrainingData(data.data, held.data, "classification"), FreezeSpec.from_boundary(boundary, 12), config, work / f"run-{corpus}-{pooling}-k{boundary}-s{seed}")
    return {"corpus": corpus, "pooling": pooling, "boundary": boundary, "seed": seed,
            "eval_accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"],
            "train_loss": metrics["train_loss"], "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="debian-section")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--boundaries", default="12,6,0")
    parser.add_argument("--work", default="bench_out/head-pooling")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for pooling in ("first", "mean"):
            for boundary in (int(k) for k in args.boundaries.split(",")):
                rows.append(run(args.corpus, seed, boundary, pooling, Path(args.work)))
                print(json.dumps(rows[-1]), flush=True)
    write_atomic(OUT / f"{args.corpus}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    lines = ["| seed | k | first: accuracy | loss | mean: accuracy | loss |", "|---|---|---|---|---|---|"]
    by = {(r["seed"], r["boundary"], r["pooling"]): r for r in rows}
    for seed, boundary in sorted({(r["seed"], r["boundary"]) for r in rows}):
        first, mean = by[seed, boundary, "first"], by[seed, boundary, "mean"]
        lines.append(f"| {seed} | {boundary} | {first['eval_accuracy']:.3f} | {first['eval_loss']:.3f} | "
                     f"{mean['eval_accuracy']:.3f} | {mean['eval_loss']:.3f} |")
    write_atomic(OUT / f"{args.corpus}.md", f"e5-small, {args.corpus}, head pooling first vs mean\n\n"
                 + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
