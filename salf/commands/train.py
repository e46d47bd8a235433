"""``salf train``: fine-tune with a plan (or fully) through the Hugging Face Trainer."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from salf.api import TrainingJob, model_info, run_job
from salf.commands.loading import load
from salf.config.commands import TrainOptions
from salf.config.train import AUTO
from salf.data.tasks import TaskData, split_holdout
from salf.errors import SalfError
from salf.method.plan import Plan
from salf.table import render_table
from salf.training.tuning import compute_budget


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


def run(options: TrainOptions) -> TrainResult:
    """Fine-tune ``--model`` on ``--data``, with ``--plan`` or fully.

    Options left out take the recipe of the run's kind (``salf.training.recipes``); ``--lr auto`` searches
    the rate for this plan first, ``--match-compute`` / ``--max-flops`` train as many steps as the budget
    buys (``salf.training.tuning``). With a plan, the head pools as the plan's model did (``training_pooling``).
    """
    config = replace(options.train, seed=options.inputs.data.seed, show_progress=options.output.progress)
    budget = compute_budget(options.budget.match_compute, options.budget.max_flops)
    plan = Plan.load(options.plan) if options.plan else None
    source = replace(options.inputs.source, classifier_pooling=training_pooling(options.inputs.source.classifier_pooling, plan))
    loaded = load(source, options.inputs.data)
    if plan is not None:
        plan.check_model(model_info(loaded.model))
    if options.eval_data:
        train_data, held_out = loaded.data, loaded.load_eval(options.eval_data)
    else:
        train_data, held_out = split_holdout(loaded.data, options.eval_fraction, options.inputs.data.seed)
    boundaries = None
    if options.per_datum:
        if plan is None or plan.per_datum_boundaries is None:
            raise SalfError("--per-datum needs a plan with per-datum boundaries", "make the plan with `salf plan --per-datum`")
        if config.learning_rate == AUTO or budget is not None:
            raise SalfError("--per-datum trains each batch at its own boundary; --lr auto and compute budgets size "
                            "one plan", "pass a fixed --lr and --max-steps with --per-datum")
        boundaries = datum_boundaries_for(plan, loaded.data, train_data)
    job = TrainingJob(loaded.model, train_data, config, Path(options.out), held_out, plan, budget, boundaries)
    return TrainResult(run_job(job), Path(options.out))


def training_pooling(requested: str | None, plan: Plan | None) -> str | None:
    """The head pooling to train with: the one asked for, else the plan's 'mean' (None: the checkpoint's own).

    A plan's boundary comes from a trace of the vector its head read, so training with another pooling
    would apply it to a model it was not made for: asking for a pooling other than the plan's is an error.
    Plans written before salf recorded the pooling carry none and are checked by their model fingerprint.
    """
    planned = plan.model.get("head_pooling") if plan is not None else None
    if requested is not None and planned is not None and requested != planned:
        raise SalfError(
            f"the plan was made with head pooling {planned!r}, but this run asks for --classifier-pooling {requested}",
            f"train with --classifier-pooling {planned} (or leave the flag out to use the plan's), "
            f"or make a new plan with --classifier-pooling {requested}",
        )
    return requested if requested is not None else ("mean" if planned == "mean" else None)


def datum_boundaries_for(plan: Plan, planned: TaskData, train_data: TaskData) -> list[int]:
    """Each training datum's own boundary, matched by token ids to the data the plan traced.

    The training data may be a held-out split of the planned file, so positions do not carry over;
    token ids do. Data the trace did not sample get the plan's global boundary.
    """
    by_ids = {tuple(planned.data[i]["input_ids"]): k
              for i, k in zip(plan.per_datum_indices or [], plan.per_datum_boundaries or [])}
    return [int(by_ids.get(tuple(d["input_ids"]), plan.boundary)) for d in train_data.data]
