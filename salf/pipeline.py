"""The stages chained into the commands ``salf trace | plan | train | demo``.

Each command is a typed function whose keyword arguments are the CLI's flags, so
``salf plan --model M --data D`` and ``salf.pipeline.plan(model="M", data="D", out=...)`` are the same
code. Results carry ``render()`` (terminal table) and ``to_json()``.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from salf.data.encode import load_task_data
from salf.data.tasks import DataConfig, TaskData, split_holdout
from salf.errors import SalfError
from salf.fileio import write_json
from salf.method.cost import boundary_costs
from salf.method.cost_profile import CostShape, labelled_positions_estimate, profile_cost
from salf.method.gain import DEFAULT_ESTIMATOR, estimate_gains
from salf.method.lenses import TraceConfig
from salf.method.plan import Plan, PolicyChoice, check_policy, default_policy, make_plan, model_fingerprint
from salf.method.trace import Trace, trace_model
from salf.models.heads import check_head_mode, head_mode_for, head_note
from salf.models.loading import LoadedModel, load_config, load_model, load_tokenizer
from salf.table import render_table
from salf.training.distributed import is_main_process
from salf.training.run import train as run_training
from salf.training.trainer import pad_id_of
from salf.training.tuning import (
    AUTO,
    Flags,
    compute_budget,
    parse_learning_rate,
    recipe_config,
    search_rate,
    size_to_budget,
)


@dataclass
class Loaded:
    """A model with its tokenized data, loaded together so the label mapping matches the head."""

    model: LoadedModel
    data: TaskData
    config: DataConfig
    """How ``data`` was read; evaluation files are read the same way."""

    def load_eval(self, path: str | Path) -> TaskData:
        """Evaluation data read like the training data, with the training data's label mapping."""
        names = self.data.label_names if self.data.task == "classification" else None
        return load_task_data(path, self.model.tokenizer, replace(self.config, limit=None), label_names=names)


def load(model: str, data: str, task: str | None = None, label_mode: str = "head", max_length: int = 256,
         limit: int | None = None, seed: int = 0, label_names: list[str] | None = None,
         head_pooling: str | None = None) -> Loaded:
    """Tokenize ``data`` with the model's tokenizer, then load the model with a head for its task.

    ``head_pooling``: what a BERT-style classifier's head reads ('first', 'mean'; None: the checkpoint's own),
    see ``salf.models.loading.load_model``.
    """
    config = DataConfig(task=task, label_mode=label_mode, max_length=max_length, limit=limit, seed=seed)
    # Truncate to the model's positions, as load_model caps its own tokenizer: a saved tokenizer may
    # carry no limit (GPT-2 style), and longer sequences would overrun learned position embeddings.
    tokenizer = load_tokenizer(model, load_config(model, {}))
    task_data = load_task_data(data, tokenizer, config, label_names=label_names)
    loaded = load_model(model, task_data.task, label_names=task_data.label_names if task_data.task == "classification" else None,
                        head_pooling=head_pooling)
    return Loaded(loaded, task_data, config)


def data_info(task_data: TaskData) -> dict[str, Any]:
    return {"path": task_data.source, "fingerprint": task_data.fingerprint, "n": len(task_data), "task": task_data.task,
            "label_names": task_data.label_names, "n_truncated": task_data.n_truncated}


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    return {**model_fingerprint(loaded.model), "name_or_path": loaded.name_or_path, "fresh_head": loaded.fresh_head,
            "head_pooling": loaded.head_pooling}


@dataclass
class TraceResult:
    trace: Trace
    out: Path | None

    def render(self) -> str:
        rows = [[i, float(m), float(s)] for i, (m, s) in enumerate(zip(self.trace.mean, self.trace.std))]
        title = (f"trace: lens {self.trace.lens}, {self.trace.n_data} data, {self.trace.seconds:.1f}s"
                 + (f" -> {self.out}" if self.out else ""))
        return render_table(["latent space", "deviation", "std"], rows, title)

    def to_json(self) -> dict[str, Any]:
        return self.trace.to_dict()


def run_trace(loaded: Loaded, lens: str | None = None, sample_size: int = 256, batch_size: int = 8,
              pooling: str = "auto", seed: int = 0, show_progress: bool = True) -> Trace:
    config = TraceConfig(lens=lens, sample_size=sample_size, batch_size=batch_size, pooling=pooling, seed=seed,
                         show_progress=show_progress)
    return trace_model(loaded.model.model, loaded.data.data, config, loaded.model.pad_token_id)


def trace(model: str, data: str, out: str, task: str | None = None, label_mode: str = "head", max_length: int = 256,
          limit: int | None = None, seed: int = 0, lens: str | None = None, sample_size: int = 256,
          trace_batch_size: int = 8, pooling: str = "auto", head_pooling: str | None = None, no_progress: bool = False,
          **_: Any) -> TraceResult:
    loaded = load(model, data, task, label_mode, max_length, limit, seed, head_pooling=head_pooling)
    result = run_trace(loaded, lens, sample_size, trace_batch_size, pooling, seed, not no_progress)
    write_json(out, {**result.to_dict(), "model": model_info(loaded.model), "data": data_info(loaded.data)})
    return TraceResult(result, Path(out))


@dataclass
class PlanResult:
    plan: Plan
    out: Path | None = None
    figure: Path | None = None
    trace_seconds: float = 0.0
    plan_seconds: float = 0.0

    def render(self) -> str:
        p = self.plan
        rows = []
        for k in range(p.num_layers + 1):
            rows.append([
                k, p.trace[k], p.gains[k] if k < p.num_layers else None, p.benefit[k], p.cost[k],
                "<- plan" if k == p.boundary else ("trained" if k > p.boundary and k < p.num_layers else ""),
            ])
        table = render_table(["k / block", "deviation", "gain", "benefit(k)", "cost(k)", ""], rows,
                             f"plan: lens {p.lens}, estimator {p.estimator}, policy {p.policy}, fit R² {p.fit.get('r2', float('nan')):.3f}")
        pred = p.predicted
        summary = (
            f"\nboundary k={p.boundary} of {p.num_layers}: freeze embeddings + blocks 0..{p.boundary - 1}, "
            f"train blocks {p.boundary}..{p.num_layers - 1} + head\n"
            f"predicted step FLOPs {pred['step_flops_ratio']:.3f} x full (saving {pred['step_flops_saving']:.1%}), "
            f"activation memory {pred['activation_memory_ratio']:.3f} x, trainable parameters {pred['trainable_params_ratio']:.3f} x\n"
            f"profiling: trace {self.trace_seconds:.1f}s, plan {self.plan_seconds:.1f}s"
        )
        if p.boundary == 0:
            summary = summary.replace("freeze embeddings + blocks 0..-1, ", "full fine-tuning: ")
        elif p.boundary == p.num_layers:
            summary = summary.replace(f"train blocks {p.boundary}..{p.num_layers - 1} + head",
                                      "train only the head (and the final norm)")
        if p.head is not None:
            summary += "\noutput head: " + head_note(p.head, p.boundary)
        if self.out:
            summary += f"\nwrote {self.out}" + (f" and {self.figure}" if self.figure else "")
        return table + summary

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "paths": {"plan": str(self.out), "figure": str(self.figure)}}


def mean_length(task_data: TaskData) -> int:
    return max(2, int(round(float(np.mean([len(d["input_ids"]) for d in task_data.data])))))


def run_plan(loaded: Loaded, trace_result: Trace, policy: str | None = None, estimator: str = DEFAULT_ESTIMATOR,
             cost_seq: int | None = None, cost_batch: int = 8, lora: bool = False, lora_rank: int = 8,
             seed: int = 0, per_datum: bool = False, head: str | None = None) -> Plan:
    """``policy`` None: ``salf.method.plan.DEFAULT_POLICY`` for the data's labels. ``head``: 'tied' or 'untie' for
    a model with a tied output head (None: ``DEFAULT_HEAD_MODE``)."""
    policy = policy or default_policy(loaded.data.data)
    head_mode = head_mode_for(loaded.model.model, head)
    gains = estimate_gains(trace_result.mean, estimator, chance=trace_result.chance)
    seq = cost_seq or mean_length(loaded.data)
    # Training projects only the labelled positions through a causal LM's head (TrainConfig's default).
    profile = profile_cost(loaded.model.model,
                           CostShape(cost_batch, seq, labelled_positions_estimate(loaded.data.data, cost_batch, seq)),
                           lora_rank=lora_rank if lora else None)
    costs = boundary_costs(profile, untie_head=head_mode == "untie")
    info = {**data_info(loaded.data), "trace_sample": trace_result.n_data}
    return make_plan(trace_result, gains, costs, PolicyChoice(policy, seed, per_datum), model_info(loaded.model), info,
                     head=head_mode)


def plan(model: str, data: str, out: str, task: str | None = None, label_mode: str = "head", max_length: int = 256,
         limit: int | None = None, seed: int = 0, lens: str | None = None, sample_size: int = 256,
         trace_batch_size: int = 8, pooling: str = "auto", policy: str | None = None, estimator: str = DEFAULT_ESTIMATOR,
         cost_seq: int | None = None, cost_batch: int = 8, lora: bool = False, lora_rank: int = 8,
         trace_file: str | None = None, figure: str | None = None, per_datum: bool = False,
         head_pooling: str | None = None, no_progress: bool = False, head: str | None = None, **_: Any) -> PlanResult:
    from salf.method.gain import ESTIMATORS
    from salf.report.plan_figure import plot_plan

    if policy is not None:
        check_policy(policy)  # fail in a second, not after a long trace
    check_head_mode(head)
    ESTIMATORS.get(estimator)
    loaded = load(model, data, task, label_mode, max_length, limit, seed, head_pooling=head_pooling)
    t0 = time.perf_counter()
    if trace_file:
        trace_result = _load_trace_file(trace_file, loaded)
    else:
        trace_result = run_trace(loaded, lens, sample_size, trace_batch_size, pooling, seed, not no_progress)
    t1 = time.perf_counter()
    result = run_plan(loaded, trace_result, policy, estimator, cost_seq, cost_batch, lora, lora_rank, seed, per_datum,
                      head)
    t2 = time.perf_counter()
    out_path = result.save(out)
    fig_path = plot_plan(result, figure or Path(out).with_suffix(".png"))
    return PlanResult(result, out_path, fig_path, t1 - t0, t2 - t1)


def _load_trace_file(trace_file: str, loaded: Loaded) -> Trace:
    """A trace written by ``salf trace``, checked against the data and the model it is reused for."""
    import json

    path = Path(trace_file)
    fix = f"write it with `salf trace --model M --data D --out {trace_file}`, or leave --trace-file out"
    if not path.is_file():
        raise SalfError(f"trace file {trace_file} not found", fix)
    try:
        stored = json.loads(path.read_text())
        if stored.get("data", {}).get("fingerprint") not in (None, loaded.data.fingerprint):
            raise SalfError(f"{trace_file} was traced on other data", "trace again, or pass the data it was traced on")
        trace = Trace.from_dict(stored)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise SalfError(f"{trace_file} is not a trace written by `salf trace` ({type(e).__name__}: {e})", fix) from None
    traced_pooling, pooling = stored.get("model", {}).get("head_pooling"), loaded.model.head_pooling
    if traced_pooling is not None and pooling is not None and traced_pooling != pooling:
        raise SalfError(f"{trace_file} was traced with head pooling {traced_pooling!r}, but this model's head reads {pooling!r}",
                        f"pass --head-pooling {traced_pooling}, or trace again")
    want = stored.get("model", {}).get("fingerprint")
    if want not in (None, model_fingerprint(loaded.model.model)["fingerprint"]):
        raise SalfError(f"{trace_file} was traced with another model", "trace again, or pass the model it was traced with")
    return trace


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    out: Path

    def render(self) -> str:
        m = self.metrics
        keys = ["boundary", "steps", "train_loss", "eval_loss", "eval_accuracy", "eval_macro_f1", "eval_exact_match",
                "eval_token_accuracy", "train_seconds",
                "step_seconds_median", "train_flops", "trainable_params", "total_params", "peak_rss_bytes"]
        rows = [[k, m[k]] for k in keys if k in m]
        search = m.get("lr_search")
        if search:
            tried = ", ".join(f"{c['learning_rate']:.3g}" for c in search["candidates"] if c["rung"] == 0)
            rows.append(["lr (searched)", f"{search['learning_rate']:.3g} of {tried}; "
                         f"search cost {search['step_share']:.1%} of the run's steps"])
        budget = m.get("flops_budget")
        if budget:
            rows.append(["FLOPs budget used", budget["share_used"]])
        text = render_table(["metric", "value"], rows, f"training run -> {self.out}")
        return text + "".join(f"\nnote: {line}" for line in m.get("diagnosis", []))

    def to_json(self) -> dict[str, Any]:
        return self.metrics


def train(model: str, data: str, out: str, task: str | None = None, label_mode: str = "head", max_length: int = 256,
          limit: int | None = None, seed: int = 0, eval_data: str | None = None, eval_fraction: float = 0.1,
          plan: str | None = None, max_steps: int | None = None, epochs: float | None = None, batch_size: int | None = None,
          lr: float | str | None = None, head_lr: float | None = None, warmup_ratio: float | None = None,
          lr_search_budget: float = 0.15, match_compute: str | None = None, max_flops: float | None = None,
          lora: bool = False, lora_rank: int = 8, lora_merged: bool = False,
          gradient_checkpointing: bool = False, eval_steps: int | None = None, save_steps: int = 200,
          resume: bool = False, overwrite: bool = False, bf16: bool = False, prefix_cache: str | None = None,
          per_datum: bool = False, head_pooling: str | None = None, no_progress: bool = False,
          **_: Any) -> TrainResult:
    """Fine-tune ``model`` on ``data``, with ``plan`` (a plan file) or fully.

    Flags left out take the recipe of the run's kind (``salf.training.recipes``); ``lr='auto'`` searches
    the rate for this plan first, ``match_compute`` / ``max_flops`` train as many steps as the budget
    buys (``salf.training.tuning``). With a plan, the head pools as the plan's model did: ``head_pooling``
    None takes the plan's, and one that differs from it is an error (see ``training_pooling``).
    """
    flags = Flags(lr=parse_learning_rate(lr), head_lr=head_lr, batch_size=batch_size, warmup_ratio=warmup_ratio,
                  epochs=epochs)
    budget = compute_budget(match_compute, max_flops)
    plan_obj = Plan.load(plan) if plan else None
    pooling = training_pooling(head_pooling, plan_obj)
    loaded = load(model, data, task, label_mode, max_length, limit, seed, head_pooling=pooling)
    if plan_obj is not None:
        plan_obj.check_model(model_info(loaded.model))
    train_data, held_out = (loaded.data, None) if eval_data else split_holdout(loaded.data, eval_fraction, seed)
    if eval_data:
        held_out = loaded.load_eval(eval_data)
    width = getattr(loaded.model.model.config, "hidden_size", None)  # scales the recipe's rate
    config, recipe = recipe_config(
        loaded.data.task, flags, width=width, max_steps=max_steps, lora=lora, lora_rank=lora_rank,
        lora_save_merged=lora_merged, gradient_checkpointing=gradient_checkpointing, eval_steps=eval_steps,
        save_steps=save_steps, resume=resume, overwrite=overwrite, bf16=bf16, seed=seed,
        show_progress=not no_progress, prefix_cache=prefix_cache)
    boundaries = None
    if per_datum:
        if plan_obj is None or plan_obj.per_datum_boundaries is None:
            raise SalfError("--per-datum needs a plan with per-datum boundaries", "make the plan with `salf plan --per-datum`")
        if flags.lr == AUTO or budget is not None:
            raise SalfError("--per-datum trains each batch at its own boundary; --lr auto and compute budgets size "
                            "one plan", "pass a fixed --lr and --max-steps with --per-datum")
        boundaries = datum_boundaries_for(plan_obj, loaded.data, train_data)
    # With per-datum boundaries each batch gets its own spec; train() derives the widest one itself.
    spec = plan_obj.freeze_spec() if plan_obj is not None and boundaries is None else None
    tokenizer = loaded.model.tokenizer
    # Which data the run saw (fingerprints of the tokenized examples): a corpus can change between runs.
    extra: dict[str, Any] = {"recipe": recipe, "data": data_info(train_data), "eval_data": data_info(held_out)}
    if budget is not None:
        config, extra["compute_budget"] = size_to_budget(loaded.model.model, pad_id_of(tokenizer, loaded.model.model),
                                                         train_data.data, spec, config, budget)
    if flags.lr == AUTO:
        def fresh_model():  # a copy of the model the run will train, fresh head included: no reload from disk
            return copy.deepcopy(loaded.model.model)

        progress = None if no_progress else (lambda line: print(line, file=sys.stderr, flush=True))
        config, extra["lr_search"] = search_rate(fresh_model, tokenizer, train_data.data, spec, config,
                                                 loaded.data.task, out, lr_search_budget, progress)
    metrics = run_training(loaded.model.model, tokenizer, train_data.data, held_out.data, spec, config, out,
                           plan_dict=plan_obj.to_dict() if plan_obj else None, task=loaded.data.task,
                           boundaries=boundaries)
    if "lr_search" in extra and metrics.get("train_seconds"):
        extra["lr_search"]["seconds_share_of_run"] = extra["lr_search"]["wall_seconds"] / metrics["train_seconds"]
    metrics.update(extra)
    if is_main_process():
        write_json(Path(out) / "metrics.json", metrics)
    return TrainResult(metrics, Path(out))


def training_pooling(requested: str | None, plan_obj: Plan | None) -> str | None:
    """The head pooling to train with: the one asked for, else the plan's 'mean' (None: the checkpoint's own).

    A plan's boundary comes from a trace of the vector its head read, so training with another pooling
    would apply it to a model it was not made for: asking for a pooling other than the plan's is an error.
    Plans written before salf recorded the pooling carry none and are checked by their model fingerprint.
    """
    planned = plan_obj.model.get("head_pooling") if plan_obj is not None else None
    if requested is not None and planned is not None and requested != planned:
        raise SalfError(
            f"the plan was made with head pooling {planned!r}, but this run asks for --head-pooling {requested}",
            f"train with --head-pooling {planned} (or leave the flag out to use the plan's), "
            f"or make a new plan with --head-pooling {requested}",
        )
    return requested if requested is not None else ("mean" if planned == "mean" else None)


def datum_boundaries_for(plan_obj: Plan, planned: TaskData, train_data: TaskData) -> list[int]:
    """Each training datum's own boundary, matched by token ids to the data the plan traced.

    The training data may be a held-out split of the planned file, so positions do not carry over;
    token ids do. Data the trace did not sample get the plan's global boundary.
    """
    by_ids = {tuple(planned.data[i]["input_ids"]): k
              for i, k in zip(plan_obj.per_datum_indices or [], plan_obj.per_datum_boundaries or [])}
    return [int(by_ids.get(tuple(d["input_ids"]), plan_obj.boundary)) for d in train_data.data]
