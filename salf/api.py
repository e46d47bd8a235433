"""The Python API: plan, apply and train with a model and data already in memory.

    import salf
    from salf import PlanConfig, TrainConfig

    plan = salf.plan(model, rows, PlanConfig(policy="budget=0.6"), tokenizer=tokenizer)
    salf.apply_plan(model, plan)                  # freeze what the plan freezes (salf.train does it too)
    metrics = salf.train(model, rows, plan=plan, config=TrainConfig(max_steps=100), tokenizer=tokenizer,
                         out="runs/planned")

``rows`` are dicts with the fields of a data file (text | prompt+completion | messages | text+label), a
``datasets.Dataset``, or data salf already tokenized (``TaskData``). The file-based commands (``salf plan``,
``salf train``) load a model and a file, then call the same functions (``salf.commands``).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from salf.config.data import DataConfig
from salf.config.plan import DEFAULT_CELLS, PlanConfig
from salf.config.train import AUTO, TrainConfig
from salf.data.encode import encode_rows
from salf.data.tasks import TaskData
from salf.errors import SalfError
from salf.fileio import write_json
from salf.method.cost import boundary_costs
from salf.method.cost_profile import CostShape, labelled_positions_estimate, profile_cost
from salf.method.freeze import FreezeReport
from salf.method.freeze import apply_plan as apply_spec
from salf.method.gain import ESTIMATORS, estimate_gains
from salf.method.lenses import LENSES, default_cell_key
from salf.method.plan import Plan, PolicyChoice, check_policy, make_plan, model_fingerprint
from salf.method.trace import Trace, trace_model
from salf.models.heads import head_mode_for
from salf.models.loading import LoadedModel, wrap_model
from salf.training.distributed import is_main_process
from salf.training.inputs import RunExtras, TrainingData
from salf.training.recipes import resolve_recipe
from salf.training.run import train as run_training
from salf.training.trainer import pad_id_of
from salf.training.tuning import search_rate, size_to_budget

Data = TaskData | Iterable[dict]
"""What the API takes as data: rows as dicts (a list, a ``datasets.Dataset``), or tokenized ``TaskData``."""


def data_info(task_data: TaskData) -> dict[str, Any]:
    """What a plan or a run records about its data."""
    return {"path": task_data.source, "fingerprint": task_data.fingerprint, "n": len(task_data), "task": task_data.task,
            "label_names": task_data.label_names, "n_truncated": task_data.n_truncated}


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    """What a plan records about its model (the fingerprint lets ``salf train`` refuse another model)."""
    return {**model_fingerprint(loaded.model), "name_or_path": loaded.name_or_path, "fresh_head": loaded.fresh_head,
            "head_pooling": loaded.head_pooling}


def tokenize(data: Data, tokenizer: Any, config: DataConfig | None = None,
             label_names: list[str] | None = None) -> TaskData:
    """``data`` tokenized for its task (``TaskData`` passes through unchanged)."""
    if isinstance(data, TaskData):
        return data
    if tokenizer is None:
        raise SalfError("rows of text need a tokenizer", "pass tokenizer=AutoTokenizer.from_pretrained(...)")
    if isinstance(data, (str, Path)):
        raise SalfError(f"salf.plan and salf.train take data in memory, got the path {str(data)!r}",
                        "read it first (e.g. datasets.load_dataset), or use `salf plan --data FILE`")
    return encode_rows([dict(row) for row in data], tokenizer, config, label_names)


def prepare(model: Any, data: Data, tokenizer: Any = None, config: DataConfig | None = None) -> tuple[LoadedModel, TaskData]:
    """The model described as salf describes a loaded one, and the data tokenized for it."""
    if isinstance(model, LoadedModel):
        return model, tokenize(data, model.tokenizer, config)
    task_data = tokenize(data, tokenizer, config)
    if tokenizer is None:  # data already tokenized (TaskData), but the model still needs its pad token
        raise SalfError("salf needs the model's tokenizer (for its pad token)", "pass tokenizer=...")
    loaded = wrap_model(model, tokenizer, task_data.task)
    labels = getattr(model.config, "num_labels", None)
    if task_data.task == "classification" and task_data.label_names and labels != len(task_data.label_names):
        raise SalfError(f"the data have {len(task_data.label_names)} classes but the model's head has {labels}",
                        "make the model with num_labels equal to the number of classes")
    return loaded, task_data


def check_plan_config(config: PlanConfig) -> None:
    """Fail in a second, not after a long trace: unknown lens, estimator or policy names."""
    if config.policy is not None:
        check_policy(config.policy)
    if config.estimator is not None:
        ESTIMATORS.get(config.estimator)
    if config.trace.lens is not None:
        LENSES.get(config.trace.lens)


def trace_for(loaded: LoadedModel, data: TaskData, config: PlanConfig) -> Trace:
    """One no-grad pass of ``loaded`` over (a sample of) ``data``: each latent space's deviation."""
    lens = config.trace.lens or DEFAULT_CELLS[default_cell_key(data.data)].lens
    return trace_model(loaded.model, data.data, replace(config.trace, seed=config.seed, lens=lens), loaded.pad_token_id)


def mean_length(task_data: TaskData) -> int:
    return max(2, int(round(float(np.mean([len(d["input_ids"]) for d in task_data.data])))))


def plan_from_trace(loaded: LoadedModel, data: TaskData, trace: Trace, config: PlanConfig) -> Plan:
    """The plan: each block's gain from ``trace``, each boundary's cost from the model, the policy's choice."""
    key = default_cell_key(data.data)
    defaults = DEFAULT_CELLS[key]
    policy = config.policy or defaults.policy
    head_mode = head_mode_for(loaded.model, config.output_head)
    gains = estimate_gains(trace.mean, config.estimator or defaults.estimator, chance=trace.chance)
    seq = config.cost_seq or mean_length(data)
    # Training projects only the labelled positions through a causal LM's head (TrainConfig's default).
    shape = CostShape(config.cost_batch, seq, labelled_positions_estimate(data.data, config.cost_batch, seq))
    profile = profile_cost(loaded.model, shape, lora_rank=config.lora_rank if config.lora else None)
    costs = boundary_costs(profile, untie_head=head_mode == "untie")
    info = {**data_info(data), "trace_sample": trace.n_data, "default_cell": key}
    return make_plan(trace, gains, costs, PolicyChoice(policy, config.seed, config.per_datum), model_info(loaded),
                     info, head=head_mode)


def plan(model: Any, data: Data, config: PlanConfig | None = None, *, tokenizer: Any = None,
         data_config: DataConfig | None = None) -> Plan:
    """Trace ``model`` over ``data`` and choose where to fine-tune it (``Plan.boundary``, ``Plan.freeze_spec``).

    ``model``: a transformers model in memory (causal LM or sequence classifier); ``data``: rows or
    ``TaskData`` (see the module docstring); ``data_config``: how to read the rows (fields, task, max length).
    """
    config = config or PlanConfig()
    check_plan_config(config)
    loaded, task_data = prepare(model, data, tokenizer, data_config)
    return plan_from_trace(loaded, task_data, trace_for(loaded, task_data, config), config)


def apply_plan(model: Any, plan: Plan) -> FreezeReport:
    """Freeze ``model`` as ``plan`` says (the embeddings and blocks below its boundary); ``remove()`` undoes it."""
    if not isinstance(plan, Plan):
        return apply_spec(model, plan)  # a FreezeSpec
    return apply_spec(model, plan.freeze_spec())


@dataclass
class TrainingJob:
    """One fine-tuning run, its inputs all in memory: what ``salf.train`` and ``salf train`` both run."""

    model: LoadedModel
    train_data: TaskData
    config: TrainConfig
    out: Path
    eval_data: TaskData | None = None
    plan: Plan | None = None
    """None: full fine-tuning."""
    flops_budget: float | None = None
    """Size the run to this many training FLOPs (``salf.training.tuning.size_to_budget``)."""
    boundaries: list[int] | None = None
    """One boundary per training datum (per-datum training, ``salf.training.perdatum``)."""


def run_job(job: TrainingJob) -> dict[str, Any]:
    """Fine-tune: the recipe for what the config leaves out, ``lr='auto'``'s search, the budget, then training.

    Returns the metrics, also written to ``job.out/metrics.json`` (by the main process).
    """
    model, task = job.model.model, job.train_data.task
    config, recipe = resolve_recipe(job.config, task, getattr(model.config, "hidden_size", None))
    spec = job.plan.freeze_spec() if job.plan is not None and job.boundaries is None else None
    extra: dict[str, Any] = {"recipe": recipe, "data": data_info(job.train_data),
                             "eval_data": data_info(job.eval_data) if job.eval_data is not None else None}
    tokenizer = job.model.tokenizer
    if job.flops_budget is not None:
        config, extra["compute_budget"] = size_to_budget(model, pad_id_of(tokenizer, model), job.train_data.data,
                                                         spec, config, job.flops_budget)
    if job.config.learning_rate == AUTO:
        def fresh_model():  # a copy of the model the run will train, fresh head included: no reload from disk
            return copy.deepcopy(model)

        progress = (lambda line: print(line, file=sys.stderr, flush=True)) if config.show_progress else None
        config, extra["lr_search"] = search_rate(fresh_model, tokenizer, job.train_data.data, spec, config, task,
                                                 job.out, progress)
    metrics = run_training(model, tokenizer, TrainingData(job.train_data.data, job.eval_data.data if job.eval_data else None, task), spec, config, job.out, RunExtras(plan_dict=job.plan.to_dict() if job.plan else None, boundaries=job.boundaries))
    if "lr_search" in extra and metrics.get("train_seconds"):
        extra["lr_search"]["seconds_share_of_run"] = extra["lr_search"]["wall_seconds"] / metrics["train_seconds"]
    metrics.update(extra)
    if is_main_process():
        write_json(job.out / "metrics.json", metrics)
    return metrics


def train(model: Any, data: Data, *, plan: Plan | None = None, config: TrainConfig | None = None,
          tokenizer: Any = None, eval_data: Data | None = None, out: str | Path = "runs/salf",
          data_config: DataConfig | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` with ``plan`` (None: full fine-tuning); returns the run's metrics.

    The model is trained in place. ``config`` left out (or its recipe fields left None) trains with the recipe
    of the run's kind; ``out`` receives checkpoints, the model (safetensors) and metrics.json.
    """
    config = config or TrainConfig()
    loaded, train_data = prepare(model, data, tokenizer, data_config)
    held_out = None
    if eval_data is not None:
        held_out = tokenize(eval_data, loaded.tokenizer, data_config, label_names=train_data.label_names
                            if train_data.task == "classification" else None)
    if plan is not None:
        plan.check_model(model_info(loaded))
    started = time.perf_counter()
    metrics = run_job(TrainingJob(loaded, train_data, config, Path(out), held_out, plan))
    metrics.setdefault("wall_seconds", time.perf_counter() - started)
    return metrics


__all__ = ["TrainingJob", "apply_plan", "check_plan_config", "data_info", "model_info", "plan", "plan_from_trace",
           "prepare", "run_job", "tokenize", "trace_for", "train"]
