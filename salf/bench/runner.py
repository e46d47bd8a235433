"""``salf bench``: does the plan land on the oracle's cost-quality frontier? (METHOD.md, "How we know it works")

A **suite** (JSON under ``bench/``) is a list of tasks; a task is a model, data, a training recipe and
seeds. For every task and seed the benchmark runs

1. the **oracle sweep**: one fine-tuning per boundary k = 0..L (embeddings frozen for k > 0), same data,
   steps, recipe and seed; eval loss, accuracy and macro-F1 (classification) or exact match of greedy
   generations (completion), measured train FLOPs, wall time, median step time and memory;
2. **salf plans**: one trace per applicable lens, then every estimator x policy picks a boundary; the
   profiling time (trace + cost profile + plan) is timed. A plan's quality is the oracle run at its
   boundary: the same recipe, seed and data, so the run would be identical; nothing is retrained;
3. **baselines** (``salf.bench.baselines.BASELINES``): depth-only policies, gradient-norm,
   hidden-state variability and cosine change give boundaries (reusing the oracle runs); LoRA and LISA
   get their own runs;
4. **per-datum** (METHOD §4, ``BenchSuite.per_datum``): the default lens's trace (the one the plans
   above already made; not traced again), ``PER_DATUM_ESTIMATOR`` and ``knee`` give every traced datum its
   own boundary and every other datum the plan's global boundary; one run of its own trains each batch
   at its data's boundary (``salf.training.run.train(..., boundaries=...)``) with the oracle's recipe, steps and
   seed, and is compared with the single-boundary plan. Its FLOPs are every boundary's measured FLOPs per
   padded token (the oracle run at that boundary) times the padded tokens it trained at that boundary;
5. optionally a **ceiling** (full fine-tuning for ``ceiling_steps``) and **equal-compute** runs (each
   planned boundary trained for as many steps as fit in the full run's FLOPs).
6. optionally **extra sweeps** (``salf.bench.sweeps``, task options): every boundary again at its own
   searched learning rate (``lr_search``: ``oracle-searched/k=K``) and, for a model with a tied output
   head, every boundary with the head untied plus salf's default plan costed untied (``head_modes``
   with 'untie': ``oracle-untied/k=K``, ``salf-untied/...``). Shown beside the main sweep in their own
   tables; the regret tables stay on the main (shared-rate, tied) sweep.

Everything lands in ``out_dir``: ``runs.json`` (every run and plan, rewritten atomically after each),
``results.md`` (first every plan and baseline's regret per model, pooled over tasks and seeds; then per task
the oracle, plans and baselines with regret, trade-off regret and share kept, predicted vs measured savings,
profiling share, mean ± std over seeds), ``summary.json`` (the same numbers), ``frontier.png`` and
``progress.log``. A finished run is never repeated: its key (task, seed, variant) and the task's recipe
fingerprint are looked up in ``runs.json`` on restart. ``salf bench-table DIR...`` (``bench_table``) pools
the per-model table over several output directories.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from salf.bench.progress import Progress
from salf.bench.report import BenchResult, write_reports
from salf.bench.store import RunStore, complete_records
from salf.bench.suite import BenchSuite
from salf.bench.taskbench import TaskBench
from salf.bench.tasks import PreparedTask
from salf.errors import SalfError


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-load progress bars or info lines from transformers during hours of runs (restored after)."""
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    ds_bars = ds_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            ds_logging.enable_progress_bar()


def report_bench(suite: BenchSuite, out_dir: str | Path) -> BenchResult:
    """Write the reports of the finished seeds in ``out_dir/runs.json`` without training anything."""
    started = time.perf_counter()
    out = Path(out_dir)
    store = RunStore(out / "runs.json", suite, resume=True)
    if not store.records:
        raise SalfError(f"{out / 'runs.json'} holds no runs", f"run `salf bench --suite {suite.name} --out {out}` first")
    analysis, paths = write_reports(suite, complete_records(store.records.values()), out)
    return BenchResult(suite, out, analysis, 0, len(store.records), time.perf_counter() - started, paths)


def run_bench(suite: BenchSuite, out_dir: str | Path, resume: bool = True, show_progress: bool = True,
              report_suite: BenchSuite | None = None, replan: bool = False) -> BenchResult:
    """Run (or resume) ``suite`` into ``out_dir``; finished runs in ``out_dir/runs.json`` are not repeated.

    ``replan``: train nothing; plan every started seed again with every registered lens, estimator, policy
    and boundary baseline missing from ``runs.json`` (``TaskBench.replan_seed``).

    ``report_suite`` (default ``suite``): the suite the reports cover, e.g. the whole suite when this
    process runs only some of its tasks.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if suite.threads:
        torch.set_num_threads(suite.threads)
    store = RunStore(out / "runs.json", suite, resume)
    if not resume:
        (out / "progress.log").unlink(missing_ok=True)
    with _quiet_transformers():
        prepared = [PreparedTask.prepare(t, out) for t in suite.tasks]
        progress = Progress(out / "progress.log", 0.0, show_progress)
        benches = [TaskBench(p, suite, store, progress) for p in prepared]
        progress.grow(sum(b.units_weight() * len(b.task.seeds) for b in benches))
        # The Trainer runs a full garbage collection after every run (accelerate's free_memory); with torch,
        # transformers and the data loaded that scans some 500 000 objects (about a second). Freezing
        # them leaves it only what the run made.
        gc.freeze()
        try:
            for b in benches:  # an extra sweep the model cannot run is refused before anything trains
                b.check_sweeps()
            for b in benches:
                for seed in b.task.seeds:
                    (b.replan_seed if replan else b.run_seed)(seed)
                for name in ("loaded", "eval_data", "costs", "costs_untied"):
                    b.__dict__.pop(name, None)
                gc.collect()
        finally:
            gc.unfreeze()
            torch.set_num_threads(threads)
            progress.close()
            records = store.save()
    # Complete seeds only: another process sharing out_dir may be mid-seed.
    analysis, paths = write_reports(report_suite or suite, complete_records(records.values()), out)
    return BenchResult(suite, out, analysis, sum(b.trained for b in benches), sum(b.skipped for b in benches),
                       time.perf_counter() - started, paths)


__all__ = ["report_bench", "run_bench"]
