"""``TaskBench``: every unit of one task (oracle sweep, plans, baselines, per-datum, ceiling and
equal-compute runs) for one seed at a time, loading the model and data only when needed.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import cached_property
from typing import Any

import numpy as np
import torch

from salf.bench.baselines import BASELINES, BaselineContext, TrainVariant
from salf.bench.measured import PeakRSS, boundary_histogram, exact_match, per_datum_flops
from salf.bench.progress import Progress, now
from salf.bench.records import (
    MetaRecord,
    PerDatumPlan,
    Record,
    Variant,
    baseline_variant,
    boundary_variant,
    oracle_variant,
    plan_name,
    record_from_dict,
    run_metrics,
)
from salf.bench.store import RunStore
from salf.bench.suite import PER_DATUM_ESTIMATOR, PER_DATUM_FILL, PER_DATUM_POLICY, BenchSuite
from salf.bench.sweeps import active_sweeps
from salf.bench.taskbench_plans import PlanUnits
from salf.bench.tasks import PreparedTask
from salf.config.plan import DEFAULT_LENS
from salf.errors import SalfError
from salf.method.freeze import FreezeSpec
from salf.method.lenses import default_cell_key


class TaskBench(PlanUnits):
    """Runs every unit of one task for one seed at a time, loading the model and data only when needed."""

    def __init__(self, prepared: PreparedTask, suite: BenchSuite, store: RunStore, progress: Progress):
        self.prepared = prepared
        self.task = prepared.task
        self.suite = suite
        self.store = store
        self.progress = progress
        self.recipe = self.task.recipe_fingerprint()
        self.trained = 0
        self.skipped = 0

    # -- resources ----------------------------------------------------------------------------
    @cached_property
    def loaded(self):
        from salf.commands.loading import load
        from salf.config.commands import ModelSource
        from salf.config.data import DataConfig

        return load(ModelSource(self.prepared.model_path, str(self.prepared.train_file), self.task.head_pooling),
                    DataConfig(label_mode=self.task.label_mode, max_length=self.task.max_length, limit=self.task.train_limit,
                               seed=self.task.data_seed))

    @cached_property
    def eval_data(self):
        from salf.data.encode import load_task_data
        from salf.data.tasks import DataConfig

        data = self.loaded.data
        names = data.label_names if data.label_names is not None else None
        config = DataConfig(max_length=self.task.max_length, limit=self.task.eval_limit, seed=self.task.data_seed,
                            label_mode=self.task.label_mode)
        return load_task_data(self.prepared.eval_file, self.loaded.model.tokenizer, config, label_names=names)

    @cached_property
    def default_cell(self) -> str:
        """The training data's row of ``salf.config.plan.DEFAULT_CELLS`` (what ``salf plan`` uses unless told)."""
        return default_cell_key(self.loaded.data.data)

    @cached_property
    def costs(self) -> dict[str, Any]:
        """The cost model's step cost of every boundary, timed (it is part of every plan's profiling time)."""
        return self._boundary_costs(untie_head=False)

    @cached_property
    def costs_untied(self) -> dict[str, Any]:
        """``costs`` with a tied output head untied at every k > 0 (``head_modes`` with 'untie')."""
        return self._boundary_costs(untie_head=True)

    def _boundary_costs(self, untie_head: bool) -> dict[str, Any]:
        from salf.method.cost import boundary_costs
        from salf.method.cost_profile import CostShape, labelled_positions_estimate, profile_cost

        model = self.fresh_model(0).model
        data = self.loaded.data.data
        seq = max(2, round(float(np.mean([len(d["input_ids"]) for d in data]))))
        started = time.perf_counter()
        # The runs project only the labelled positions through a causal LM's head (TrainConfig's default).
        projected = labelled_positions_estimate(data, self.task.batch_size, seq)
        profile = profile_cost(model, CostShape(self.task.batch_size, seq, projected_positions=projected))
        per_k = boundary_costs(profile, untie_head=untie_head)
        seconds = time.perf_counter() - started
        full = per_k[0].total
        return {"step_costs": per_k, "ratio": np.array([c.total / full for c in per_k]), "seconds": seconds,
                "seq_len": seq,
                "memory_ratio": [c.memory_bytes / per_k[0].memory_bytes for c in per_k]}

    def fresh_model(self, seed: int):
        """The pretrained model again, with its fresh head drawn from ``seed`` (the same for every boundary),
        pooling as the task says."""
        from salf.models.loading import load_model

        data = self.loaded.data
        torch.manual_seed(seed)
        lm = load_model(self.prepared.model_path, data.task,
                        label_names=data.label_names if data.task == "classification" else None,
                        head_pooling=self.task.head_pooling)
        # Eager attention: its matmuls are what FlopCounterMode counts on every backend (CPU sdpa counts 0).
        if hasattr(lm.model, "set_attn_implementation"):
            lm.model.set_attn_implementation("eager")
        return lm

    # -- units --------------------------------------------------------------------------------
    def _unit(self, seed: int | None, variant: str, weight: float, make: Callable[[], dict[str, Any]],
              recipe: str | None = None) -> Record:
        """``make``'s record, or the stored one of the same ``recipe`` (default: the task's)."""
        recipe = recipe or self.recipe
        key = RunStore.key(self.task.name, seed, variant)
        found = self.store.get(key, recipe)
        if found is not None:
            self.skipped += 1
            self.progress.finish(key, weight, None, "skip")
            return found
        started = time.perf_counter()
        body = make()
        seconds = time.perf_counter() - started
        record = record_from_dict({"key": key, "task": self.task.name, "seed": seed, "variant": variant,
                                   "recipe": recipe, **body, "seconds": seconds, "finished": now()})
        self.store.add(record)
        self.progress.finish(key, weight, seconds, body.get("status", "done"))
        return record

    def units_weight(self) -> float:
        """Progress weight of the planned work of one seed (a training step weighs 1)."""
        t = self.task
        oracle_runs = len(self.oracle_grid())  # the plans' own boundaries come on top
        runs = oracle_runs * t.steps + sum(t.steps for b in self._baselines() if BASELINES.get(b).trains)
        runs += t.steps if self.suite.per_datum else 0  # (without loading the data to see if its lens is traced)
        runs += sum(sweep.weight(self) for sweep in active_sweeps(t))
        profiling = len(self.lenses()) * self._trace_weight() + sum(not BASELINES.get(b).trains for b in self._baselines())
        return runs + profiling + (t.ceiling_steps or 0)

    def _trace_weight(self) -> float:
        return max(1.0, self.task.trace_sample / (3 * self.task.batch_size))

    def _baselines(self) -> list[str]:
        return list(self.suite.baselines) if self.suite.baselines is not None else BASELINES.names()

    def _per_datum_lens(self) -> str | None:
        """The lens whose trace the per-datum variant uses (None: no per-datum variant)."""
        if not self.suite.per_datum:
            return None
        lens = DEFAULT_LENS[self.default_cell]
        return lens if lens in self.prepared.lenses(self.suite.lenses) else None

    @staticmethod
    def per_datum_variants(lens: str) -> tuple[str, str]:
        """(its boundaries, its run): the record names of the per-datum variant from ``lens``."""
        name = plan_name(lens, PER_DATUM_ESTIMATOR, PER_DATUM_POLICY)
        return str(Variant("salf-per-datum-plan", name)), str(Variant("salf-per-datum", name))

    def meta(self) -> Record:
        def make() -> dict[str, Any]:
            c, data = self.costs, self.loaded.data
            return {"kind": "meta", "data_task": data.task, "default_cell": self.default_cell,
                    "num_layers": self.prepared.num_layers,
                    "model_path": self.prepared.model_path, "model": self.task.model, "n_train": len(data.data),
                    "n_eval": len(self.eval_data.data), "label_names": data.label_names,
                    "train_file": str(self.prepared.train_file), "eval_file": str(self.prepared.eval_file),
                    "predicted_step_flops_ratio": c["ratio"].tolist(), "predicted_memory_ratio": c["memory_ratio"],
                    "cost_profile_seconds": c["seconds"],
                    "cost_seq_len": c["seq_len"], "task_config": asdict(self.task), **self._data_fingerprints()}

        record = self._unit(None, "meta", 0.0, make)
        self._check_same_data(record)
        return record

    def _data_fingerprints(self) -> dict[str, str]:
        return {"train_fingerprint": self.loaded.data.fingerprint, "eval_fingerprint": self.eval_data.fingerprint}

    def _check_same_data(self, stored: Record) -> None:
        """Refuse to resume on data other than the stored runs': a corpus read from the machine (Debian's
        package lists after an ``apt-get update``) can change between sessions, and a sweep mixing two
        samples compares its boundaries on different data. Runs stored before salf recorded fingerprints
        carry none and are not checked."""
        here = self._data_fingerprints()
        there = {k: getattr(stored, k) if isinstance(stored, MetaRecord) else None for k in here}
        if all(v is None for v in there.values()) or there == here:
            return
        raise SalfError(
            f"task {self.task.name}: the data built now differ from those its stored runs were trained on "
            f"(fingerprints {there} there, {here} here); its corpus changed since, e.g. the package lists",
            "resume on the machine and data that started it, start a new --out, or pass --no-resume to "
            "train every run again on the new data")

    def run_seed(self, seed: int) -> None:
        n = self.prepared.num_layers
        self.meta()
        oracle = {0: self._train(seed, oracle_variant(0), "oracle", FreezeSpec.from_boundary(0, n), boundary=0)}
        plans = self._plans(seed)
        baselines = self._run_baselines(seed, trained=False)
        boundaries = self.oracle_boundaries([*plans, *baselines])
        # units_weight counted the stride's grid; the plans' own boundaries are known only now.
        self.progress.grow(self.task.steps * len(set(boundaries) - self.oracle_grid()))
        for k in boundaries:
            oracle[k] = self._train(seed, oracle_variant(k), "oracle", FreezeSpec.from_boundary(k, n), boundary=k)
        # Baselines with runs of their own come after the sweep: a seed whose sweep is done scores every
        # plan and boundary baseline even if the session ends during LoRA or LISA.
        baselines += self._run_baselines(seed, trained=True)
        if self._per_datum_lens():
            self._per_datum(seed, oracle)
        if self.task.ceiling_steps:
            self._train(seed, str(Variant("ceiling", "full")), "ceiling", FreezeSpec.full(n), boundary=0, steps=self.task.ceiling_steps)
        if self.task.equal_compute_for(seed):
            self._equal_compute(seed, oracle, [*plans, *baselines])
        for sweep in active_sweeps(self.task):  # extra sweeps of the suite's options (salf.bench.sweeps)
            sweep.run(self, seed, oracle)

    def oracle_boundaries(self, picked: list[Record]) -> list[int]:
        """The boundaries k > 0 the oracle trains: those the plans and baselines picked first, the default plan's
        before all (so the plans are scored early in a session that may end), then the ``oracle_stride`` grid and
        the last boundary."""
        from salf.bench.analysis import default_plan

        n = self.prepared.num_layers
        default = default_plan(self.default_cell)
        picked = sorted(picked, key=lambda r: r.variant != default)  # the default plan's boundary first
        chosen = [k for r in picked if isinstance(k := getattr(r, "boundary", None), int) and 0 < k <= n]
        return list(dict.fromkeys([*chosen, *sorted(self.oracle_grid() - {0})]))

    def oracle_grid(self) -> set[int]:
        """The boundaries the oracle trains whatever the plans pick: every ``oracle_stride``-th, and the last."""
        n = self.prepared.num_layers
        return {*range(0, n + 1, self.task.oracle_stride), n}

    def check_sweeps(self) -> None:
        """Refuse an extra sweep the task's model cannot run, before anything trains."""
        for sweep in active_sweeps(self.task):
            sweep.check(self)

    def replan_seed(self, seed: int) -> None:
        """Only what decides boundaries: every lens x estimator x policy plan and every baseline that does not
        train, for a seed whose sweep has started. Trains nothing: a new estimator or policy is scored against
        the oracle runs already finished (a plan's quality is the oracle run at its boundary)."""
        if self.store.get(RunStore.key(self.task.name, seed, oracle_variant(0)), self.recipe) is None:
            return
        self.meta()
        self._plans(seed)
        self._run_baselines(seed, trained=False)

    def _train(self, seed: int, variant: str, kind: str, spec: FreezeSpec, boundary: int | None = None,
               steps: int | None = None, run: TrainVariant | None = None, extra: dict | None = None) -> Record:
        steps = steps or self.task.steps
        return self._unit(seed, variant, steps, lambda: self._do_train(seed, variant, kind, spec, boundary, steps,
                                                                       run, extra or {}))

    def train_config(self, seed: int, steps: int, run: TrainVariant | None = None):
        """The task's ``TrainConfig`` for one run (``run``: a baseline's rate and LoRA settings)."""
        from salf.training.config import TrainConfig

        t = self.task
        return TrainConfig(
            max_steps=steps, batch_size=t.batch_size, learning_rate=(run.learning_rate if run and run.learning_rate
                                                                     else t.lr),
            head_learning_rate=t.head_lr, warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, save_steps=None,
            seed=seed, lora=bool(run and run.lora), lora_rank=run.lora_rank if run else 8, overwrite=True,
            logging_steps=max(1, steps // 10), show_progress=False)

    def run_dir(self, seed: int, variant: str):
        return self.prepared.out_dir / "runs" / self.task.name / f"seed{seed}" / variant.replace("/", "_").replace("=", "")

    def _do_train(self, seed: int, variant: str, kind: str, spec: FreezeSpec, boundary: int | None, steps: int,
                  run: TrainVariant | None, extra: dict, boundaries: Sequence[int] | None = None,
                  rates: tuple[float, float | None] | None = None) -> dict[str, Any]:
        """One training run; ``rates``: (body, head) learning rates instead of the task's (a searched rate)."""
        from dataclasses import replace

        from salf.training import run as training_run  # looked up per call: tests stand in for run.train
        from salf.training.config import TrainingInterrupted
        from salf.training.inputs import RunExtras, TrainingData

        t = self.task
        lm = self.fresh_model(seed)
        config = self.train_config(seed, steps, run)
        if rates is not None:
            config = replace(config, learning_rate=rates[0], head_learning_rate=rates[1])
        callbacks = list(run.callbacks()) if run else []
        run_dir = self.run_dir(seed, variant)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        status, error = "done", None
        run_dir.mkdir(parents=True, exist_ok=True)
        # The Trainer prints its log lines when its progress bar is off: they go to the run's train.log.
        with PeakRSS() as rss, open(run_dir / "train.log", "w") as log, \
                contextlib.redirect_stdout(log):
            try:
                data = TrainingData(self.loaded.data.data, self.eval_data.data, self.loaded.data.task)
                metrics = training_run.train(lm.model, lm.tokenizer, data, spec, config, run_dir,
                                             RunExtras(callbacks=callbacks, boundaries=boundaries))
            except TrainingInterrupted:
                raise
            except SalfError as e:  # a diverged run is a result (recorded, not retried), not a crash
                metrics, status, error = {}, "failed", str(e)
        metrics.pop("model_dir", None)
        metrics["process_peak_rss_bytes"] = metrics.pop("peak_rss_bytes", None)
        metrics.update(run_peak_rss_bytes=rss.peak, run_rss_growth_bytes=rss.peak - rss.start)
        if status == "done" and self.loaded.data.task == "completion":
            started = time.perf_counter()
            metrics.update(exact_match(lm.model, lm.tokenizer, self.eval_data.data[: t.em_limit], t.generation_batch))
            metrics["exact_match_seconds"] = time.perf_counter() - started
        if not self.suite.keep_models:
            shutil.rmtree(run_dir / "model", ignore_errors=True)
        self.trained += 1
        details = dict(extra)
        if run is not None:
            details.update(run.describe(callbacks))
        del lm
        return {"kind": kind, "boundary": boundary, "status": status, "error": error, "steps": steps,
                "spec": spec.to_dict(), "metrics": metrics, "details": details}

    def _per_datum(self, seed: int, oracle: dict[int, Record]) -> Record:
        """The per-datum variant's own run: every batch trained from its data's boundary."""
        lens = self._per_datum_lens()
        assert lens is not None
        plan_variant, variant = self.per_datum_variants(lens)

        def make() -> dict[str, Any]:
            from salf.training.perdatum import datum_boundaries

            plan = self.store.get(RunStore.key(self.task.name, seed, plan_variant), self.recipe)
            if not isinstance(plan, PerDatumPlan):
                raise SalfError(f"{self.task.name} seed {seed}: the per-datum boundaries of lens {lens} are missing",
                                "rerun the benchmark with resume: the trace is redone")
            n, data = self.prepared.num_layers, self.loaded.data.data
            if plan.n_train != len(data):
                raise SalfError(f"the per-datum boundaries were made for {plan.n_train} training data, "
                                f"the task has {len(data)}", "rerun without resume")
            boundaries = datum_boundaries(plan.traced_boundaries, plan.traced_indices, len(data),
                                          plan.boundary, n, fill=PER_DATUM_FILL)
            counts = np.bincount(boundaries, minlength=n + 1)
            histogram = {str(k): int(c) for k, c in enumerate(counts) if c}
            body = self._do_train(seed, variant, "per-datum", FreezeSpec.from_boundary(int(boundaries.min()), n),
                                  None, self.task.steps, None, {}, boundaries=boundaries.tolist())
            body.update(lens=lens, estimator=plan.estimator, policy=plan.policy, fill=PER_DATUM_FILL,
                        global_boundary=plan.boundary, boundary_histogram=histogram,
                        mean_boundary=float(boundaries.mean()), n_traced=len(plan.traced_indices),
                        traced_boundary_histogram=boundary_histogram(plan.traced_boundaries),
                        profiling_seconds=plan.profiling_seconds)
            if body["status"] == "done":
                body["metrics"].update(per_datum_flops(body["metrics"], oracle, self.costs["ratio"]))
                tokens = body["metrics"]["per_datum"]["padded_tokens_per_boundary"]
                total = sum(tokens.values())
                body["mean_boundary_trained"] = sum(int(k) * v for k, v in tokens.items()) / total if total else None
            return body

        return self._unit(seed, variant, self.task.steps, make)

    def _run_baselines(self, seed: int, trained: bool) -> list[Record]:
        """The baselines that train runs of their own (``trained``), or those that only choose a boundary."""
        out = []
        for name in self._baselines():
            baseline = BASELINES.get(name)
            variant = baseline_variant(name)
            if baseline.trains != trained:
                continue
            if baseline.trains:
                key = RunStore.key(self.task.name, seed, variant)
                if self.store.get(key, self.recipe) is None:
                    try:
                        choice = baseline.decide(self._baseline_context(seed))
                    except SalfError as e:  # e.g. no default plan to put LoRA on: reported, not fatal
                        out.append(self._unit(seed, variant, self.task.steps, lambda e=e: {  # its planned weight
                            "kind": "baseline", "boundary": None, "status": "unavailable", "error": str(e)}))
                        continue
                    out.append(self._train(seed, variant, "baseline", choice.variant.spec, run=choice.variant,
                                           extra=choice.details))
                else:
                    out.append(self._train(seed, variant, "baseline", FreezeSpec.full(self.prepared.num_layers)))
                continue

            def decide(baseline=baseline) -> dict[str, Any]:
                ctx = self._baseline_context(seed)
                started = time.perf_counter()
                try:
                    choice = baseline.decide(ctx)
                except SalfError as e:  # e.g. too few classes for the variability ratio: reported, not fatal
                    return {"kind": "baseline", "boundary": None, "status": "unavailable", "error": str(e)}
                profiling = time.perf_counter() - started - ctx.load_seconds
                return {"kind": "baseline", "boundary": choice.boundary, "status": "done",
                        "profiling_seconds": profiling, "details": choice.details}

            out.append(self._unit(seed, variant, 1.0, decide))
        return out

    def _baseline_context(self, seed: int) -> BaselineContext:
        from salf.bench.analysis import default_plan

        def default_boundary() -> int | None:
            plan = self.store.get(RunStore.key(self.task.name, seed, default_plan(self.default_cell)),
                                  self.recipe)
            return getattr(plan, "boundary", None)

        return BaselineContext(load=lambda: self.fresh_model(seed), data=self.loaded.data, num_layers=self.prepared.num_layers,
                               cost=self.costs["ratio"], seed=seed, batch_size=self.task.batch_size,
                               learning_rate=self.task.lr, settings=self.task.baselines, default_boundary=default_boundary)

    def _equal_compute(self, seed: int, oracle: dict[int, Record], chosen: list[Record]) -> None:
        full = run_metrics(oracle[0]).get("flops_per_padded_token")
        boundaries = sorted({k for r in chosen if (k := getattr(r, "boundary", None)) not in (None, 0)})
        for k in boundaries:
            per = run_metrics(oracle[k]).get("flops_per_padded_token")
            if not full or not per:
                continue
            steps = max(1, round(self.task.steps * full / per))
            self.progress.grow(steps)
            self._train(seed, boundary_variant("equal-compute", k), "equal-compute", FreezeSpec.from_boundary(k, self.prepared.num_layers),
                        boundary=k, steps=steps, extra={"steps_for_full_flops": steps})


__all__ = ["Progress", "TaskBench"]
