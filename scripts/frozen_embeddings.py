"""Full fine-tuning with the input embeddings frozen (with a tied output head, the head too), beside plain full
fine-tuning, with a benchmark task's own recipe, data and seed: is a boundary's gain over full fine-tuning the
frozen blocks', or the frozen embeddings'?

    python scripts/frozen_embeddings.py --suite smollm2 --task smollm2-debian-text --seeds 0,1 \\
        --out bench_out/frozen-embeddings --data-dir bench_out/smollm2

Records go to OUT/runs.json (the benchmark's format; a finished run is read back, not retrained): variants
`baseline/embeddings-frozen` and `oracle/k=0`. --data-dir: a `salf bench --out` folder whose built data to reuse.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from salf.bench.progress import Progress
from salf.bench.store import RunStore
from salf.bench.suite import BenchSuite, parse_seeds
from salf.bench.taskbench import TaskBench
from salf.bench.tasks import PreparedTask
from salf.method.freeze import FreezeSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, help="a `salf bench --out` folder whose data/ to reuse")
    a = parser.parse_args()
    suite = BenchSuite.load(a.suite)
    task = next(t for t in suite.tasks if t.name == a.task)
    if a.data_dir is not None and (a.data_dir / "data").is_dir() and not (a.out / "data").exists():
        shutil.copytree(a.data_dir / "data", a.out / "data")
    prepared = PreparedTask.prepare(task, a.out)
    store = RunStore(a.out / "runs.json", suite, True)
    bench = TaskBench(prepared, suite, store, Progress(a.out / "progress.log", 0.0, False))
    bench.meta()  # the task's facts (model, data fingerprints, predicted costs), as `salf bench` records them
    n = prepared.num_layers
    for seed in parse_seeds(a.seeds):
        for variant, kind, spec in (("baseline/embeddings-frozen", "baseline",
                                     FreezeSpec(trainable_blocks=tuple(range(n)), embeddings=False)),
                                    ("oracle/k=0", "oracle", FreezeSpec.full(n))):
            m = bench._train(seed, variant, kind, spec, boundary=0).metrics
            print(f"{task.name} seed {seed} {variant}: eval loss {m.get('eval_loss'):.4f}, train loss "
                  f"{m.get('train_loss'):.4f}, exact match {m.get('exact_match')}", flush=True)


if __name__ == "__main__":
    main()
