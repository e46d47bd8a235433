"""The training loop: a plan trained on the real Hugging Face ``Trainer``, and what it cost.

``fit`` is the whole run once the data strategy is chosen (``salf.training.run.train`` chooses it): it
checks the output directory (``salf.training.outputs``), optionally adds LoRA adapters to the planned
blocks only (``salf.training.lora``), applies the plan (``salf.method.freeze.apply_plan``), lets the
strategy (``salf.training.strategy``) swap in its dataset, collator and batch sampler, builds the
optimizer over the trainable parameters only (a fresh classification head gets its own learning rate),
trains with checkpoints and resume, evaluates, and writes

- ``out_dir/model``: the final model (safetensors) or, with LoRA, the adapter (``model-merged`` beside
  it when ``lora_save_merged``);
- ``out_dir/plan.json``: the plan the run used (when given);
- ``out_dir/metrics.json``: losses, accuracy, measured step time, FLOPs, memory, parameter counts;
- ``out_dir/history.json``: the loss of every step, ``[{"step", "loss", "seconds", "tokens"}, ...]``;
- ``out_dir/checkpoints/checkpoint-<step>``: the Trainer's checkpoints (every ``save_steps``).

This module names no strategy: a strategy is anything with the ``TrainingStrategy`` shape. The ``Trainer``
subclass it runs is ``salf.training.hf_trainer``; what its evaluation measures, ``salf.training.eval_metrics``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from salf.config.train import AUTO
from salf.data.batch import Collator, ListDataset
from salf.errors import SalfError
from salf.fileio import write_json
from salf.method.freeze import FreezeSpec, apply_plan
from salf.models.arch import find_parts
from salf.training.budget import FlopBudgetStop
from salf.training.callback import SalfCallback
from salf.training.config import TrainConfig, TrainingInterrupted
from salf.training.diagnosis import diagnose, label_entropy
from salf.training.distributed import is_main_process, rank_and_world
from salf.training.eval_metrics import EVAL_METRICS, top_token
from salf.training.hf_trainer import SalfTrainer
from salf.training.inputs import RunExtras, TrainingData
from salf.training.lora import add_lora
from salf.training.outputs import merge_history, prepare_out_dir
from salf.training.recipes import resolve_recipe
from salf.training.strategy import Batching, TrainingStrategy

TRAIN_FLOPS_METHOD = (
    "torch.utils.flop_counter.FlopCounterMode (matmul/attention FLOPs of forward + backward) measured over the "
    "first {n} training step(s) of this run, divided by the padded tokens of those steps, times the padded "
    "tokens of every step trained"
)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def _check_data(data: Sequence[dict], task: str, what: str) -> None:
    if not data:
        raise SalfError(f"the {what} data is empty", f"give at least one datum for {what}")
    for i, datum in enumerate(data):
        if not isinstance(datum, dict) or "input_ids" not in datum or "labels" not in datum:
            raise SalfError(
                f"{what} datum {i} is not a dict with input_ids and labels",
                "tokenize the data with salf.data.encode.load_task_data",
            )
        if not datum["input_ids"]:
            raise SalfError(f"{what} datum {i} has no tokens", "drop empty texts before training")
        is_class = isinstance(datum["labels"], (int, np.integer))
        if (task == "classification") != is_class:
            want = "one class index (int)" if task == "classification" else "a list of token labels"
            raise SalfError(
                f"{what} datum {i} has labels {type(datum['labels']).__name__} but task {task!r} needs {want}",
                "tokenize the data for the same task as the model",
            )
        if not is_class and len(datum["labels"]) != len(datum["input_ids"]):
            raise SalfError(f"{what} datum {i}: labels and input_ids differ in length")


def pad_id_of(tokenizer_or_pad_id: Any, model: nn.Module) -> int:
    """The pad token id a run collates with (the tokenizer's pad, else its eos, else the config's)."""
    return _pad_id(tokenizer_or_pad_id, model)[0]


def _pad_id(tokenizer_or_pad_id: Any, model: nn.Module) -> tuple[int, Any]:
    if isinstance(tokenizer_or_pad_id, (int, np.integer)) and not isinstance(tokenizer_or_pad_id, bool):
        return int(tokenizer_or_pad_id), None
    tokenizer = tokenizer_or_pad_id
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "config", None), "pad_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate, tokenizer
    raise SalfError(
        "no pad token id: the tokenizer has neither a pad nor an eos token", "pass the pad id as an int"
    )


def _training_arguments(config: TrainConfig, ckpt_dir: Path, task: str, has_eval: bool) -> TrainingArguments:
    names = {f.name for f in fields(TrainingArguments)}
    kwargs: dict[str, Any] = dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if (has_eval and config.eval_steps) else "no",
        eval_steps=config.eval_steps,
        seed=config.seed,
        bf16=config.bf16,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=task not in EVAL_METRICS,  # gather predictions only where metrics use them
        disable_tqdm=not config.show_progress,
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=config.ddp_find_unused_parameters,
    )
    # The warm-up is a share of the run: transformers 4.x reads it from ``warmup_ratio`` (its ``warmup_steps`` is an
    # int count, so a ratio there silently meant no warm-up); 5.x dropped ``warmup_ratio`` and reads a float below
    # 1 in ``warmup_steps`` as the share.
    kwargs["warmup_ratio" if "warmup_ratio" in names else "warmup_steps"] = config.warmup_ratio
    if config.bf16 and not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # the Trainer refuses bf16 without a GPU unless told to autocast on the CPU
    if rank_and_world()[1] > 1 and not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # accelerate sets up DDP on CPUs (gloo) only when told the run is on the CPU
    if config.gradient_checkpointing:
        if "activation_checkpointing" in names:  # transformers >= 5.x
            kwargs.update(
                activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            kwargs.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return TrainingArguments(**kwargs)


def _warn_if_fsdp_dropped(trainer: Trainer) -> None:
    """Warn when the launcher asked for FSDP (``ACCELERATE_USE_FSDP``, set by ``accelerate launch`` with an FSDP
    config) but accelerate set up something else: accelerate enables FSDP on accelerator devices only, so on
    CPU processes it trains with DDP (every rank holds the whole model) without a word."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not getattr(trainer, "is_fsdp_enabled", False):
        kind = getattr(getattr(trainer.accelerator, "distributed_type", None), "value", "unknown")
        logging.getLogger("salf.training").warning(
            "salf: FSDP was requested (ACCELERATE_USE_FSDP) but accelerate set up %s, not FSDP: the model is not "
            "sharded (accelerate runs FSDP on GPUs and other accelerators only; see docs/DISTRIBUTED.md)", kind)


def _sharded_state_dict(trainer: Trainer, config: TrainConfig) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the model's full weights gathered from every rank's shards (called on every rank: each
    takes part in the gathering; the main process gets the tensors); None otherwise (not sharded, LoRA, or no
    model to save), where the model's own ``state_dict`` is complete."""
    if not (config.save_model and not config.lora and getattr(trainer, "is_fsdp_enabled", False)):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # FSDP1 and FSDP2 alike. Offloading to the CPU (rank 0 only, as accelerate's get_state_dict does) saves
    # accelerator memory; on the CPU there is nothing to save and FSDP1's offload of CPU tensors crashes
    # (SIGSEGV, torch 2.13), so there every rank gets the full weights.
    on_cpu = trainer.accelerator.device.type == "cpu"
    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu))


def _save_model(
    model: nn.Module,
    tokenizer: Any,
    model_dir: Path,
    config: TrainConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    # safetensors; with LoRA, the adapters only; under FSDP the weights gathered by _sharded_state_dict
    model.save_pretrained(str(model_dir), **({"state_dict": state_dict} if state_dict is not None else {}))
    folders = [model_dir]
    if config.lora and config.lora_save_merged:
        model.merge_and_unload().save_pretrained(str(model_dir.parent / "model-merged"))
        folders.append(model_dir.parent / "model-merged")  # loadable on its own, tokenizer included
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        for folder in folders:
            tokenizer.save_pretrained(str(folder))


def resumed_step_of(checkpoint: str | None) -> int | None:
    """The step a Trainer checkpoint was saved at (None: not resuming)."""
    if checkpoint is None:
        return None
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def _chance_loss(train_data: Sequence[dict], task: str) -> float | None:
    """The training labels' entropy for a classification run (the 'learned nothing' verdict), else None."""
    if task != "classification":
        return None
    labels = [d["labels"] for d in train_data if isinstance(d.get("labels"), int)]
    return label_entropy(labels)


def fit(
    model: nn.Module,
    tokenizer_or_pad_id: Any,
    data: TrainingData | Sequence[dict],
    spec: FreezeSpec | None,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    extras: RunExtras = RunExtras(),
    strategy: TrainingStrategy | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` with ``spec`` (None: full fine-tuning); returns the metrics written to
    metrics.json. Plain rows as ``data`` are language-modelling data without evaluation (``TrainingData.of``).

    The model is trained in place (with LoRA, adapters are injected into it). Raises ``SalfError`` on
    a non-finite loss (naming the step and the last good checkpoint) and ``TrainingInterrupted`` after
    SIGINT/SIGTERM (a checkpoint is saved first). ``strategy`` (None: batch by batch through the whole
    model) may change the plan first and then supplies the training data's dataset, collator and batch
    sampler. Under torchrun/accelerate only the main process writes files (docs/DISTRIBUTED.md).
    """
    data = TrainingData.of(data)
    train_data, eval_data, task = data.train, data.eval, data.task
    plan_dict, callbacks = extras.plan_dict, extras.callbacks
    if not isinstance(config, TrainConfig):
        raise SalfError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.learning_rate == AUTO:
        raise SalfError("learning_rate 'auto' is searched before training, not by the training loop",
                        "call salf.train (or `salf train --lr auto`), which searches it first, or give a number")
    if not config.resolved:  # the batch, rates, warm-up and epochs left out: the recipe of the run's kind
        config, _ = resolve_recipe(config, task, getattr(getattr(model, "config", None), "hidden_size", None))
    _check_data(train_data, task, "training")
    if eval_data is not None:
        _check_data(eval_data, task, "evaluation")
    pad_id, tokenizer = _pad_id(tokenizer_or_pad_id, model)
    out = Path(out_dir)
    main = is_main_process()
    resume_from = prepare_out_dir(out, config, main)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"

    num_layers = find_parts(model).num_layers
    if strategy is not None:
        spec = strategy.plan_spec(spec, len(train_data), num_layers, config)
    spec = spec if spec is not None else FreezeSpec.full(num_layers)
    if config.lora:
        model = add_lora(model, spec, config, task)
    report = apply_plan(model, spec)
    callback: SalfCallback | None = None
    batching: Batching | None = None
    try:
        train_dataset: torch.utils.data.Dataset = ListDataset(train_data)
        collator: Any = Collator(pad_id)
        batch_sampler = None
        args = _training_arguments(config, ckpt_dir, task, eval_data is not None)
        if strategy is not None:
            batching = strategy.prepare(model, train_data, report, pad_id, tokenizer, config, args.device)
        if batching is not None:
            train_dataset, collator, batch_sampler = batching.dataset, batching.collator, batching.sampler
        inner = model.get_base_model() if config.lora else model
        parts = find_parts(inner)
        head_ids = frozenset(id(p) for n, p in inner.named_parameters() if parts.group_of(n) == "head")
        head_lr = config.head_learning_rate if config.head_learning_rate is not None else config.learning_rate

        callback = SalfCallback(
            spec,
            flop_sample_steps=config.flop_sample_steps,
            timing_warmup_steps=config.timing_warmup_steps,
            nan_check=config.nan_check,
            raise_on_nan=False,
        )
        resumed_step = resumed_step_of(resume_from)
        budget_stop = None
        if config.max_flops is not None:
            before = merge_history(out / "history.json", resumed_step, [])
            longest = max(len(d["input_ids"]) for d in train_data)
            budget_stop = FlopBudgetStop(config.max_flops, callback, config.batch_size * longest,
                                         sum(int(h.get("tokens", 0)) for h in before))
        trainer = SalfTrainer(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=ListDataset(eval_data) if eval_data is not None else None,
            processing_class=tokenizer,
            compute_metrics=EVAL_METRICS.get(task),
            preprocess_logits_for_metrics=top_token if task == "completion" else None,
            callbacks=[callback, *([budget_stop] if budget_stop else []), *callbacks],
            head_param_ids=head_ids,
            head_learning_rate=head_lr,
            train_batch_sampler=batch_sampler,
            project_labelled_only=config.project_labelled_only,
        )
        _warn_if_fsdp_dropped(trainer)

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            output = trainer.train(resume_from_checkpoint=resume_from)
        finally:
            train_seconds = time.perf_counter() - start
            history = merge_history(out / "history.json", resumed_step, callback.history)
            if main:
                write_json(out / "history.json", history)
        if callback.nan_step is not None:
            raise callback.nan_error(config.learning_rate)
        if callback.interrupted_step is not None and trainer.state.global_step < trainer.state.max_steps:
            last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
            raise TrainingInterrupted(callback.interrupted_step, last)

        metrics: dict[str, Any] = {
            "task": task,
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "train_loss": output.training_loss,
        }
        if eval_data is not None:
            evaluated = trainer.evaluate()
            metrics["eval_loss"] = evaluated.get("eval_loss")
            if task == "classification":
                metrics["eval_accuracy"] = evaluated.get("eval_accuracy")
                metrics["eval_macro_f1"] = evaluated.get("eval_macro_f1")
            if task == "completion":
                metrics["eval_token_accuracy"] = evaluated.get("eval_token_accuracy")
                metrics["eval_exact_match"] = evaluated.get("eval_exact_match")
            if task != "classification" and metrics["eval_loss"] is not None:
                metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        report.remove()  # the saved model and the caller's model carry no hooks

        model_dir = out / "model"
        full_weights = _sharded_state_dict(trainer, config)  # FSDP: gathered by every rank, before rank 0 saves
        if main and config.save_model:  # probe runs (the learning-rate search's candidates) keep no model
            _save_model(model, tokenizer, model_dir, config, full_weights)
        if main and plan_dict is not None:
            write_json(out / "plan.json", plan_dict)

        padded_tokens = sum(int(h.get("tokens", 0)) for h in history)
        per_token = callback.flops_per_padded_token
        eval_history = [h for h in trainer.state.log_history if "eval_loss" in h]
        metrics.update(
            {
                "train_seconds": train_seconds,
                "step_seconds_median": callback.step_seconds_median,
                "step_seconds_count": len(callback.step_seconds),
                "step_cpu_seconds_median": callback.step_cpu_seconds_median,
                "train_flops": per_token * padded_tokens if per_token is not None else None,
                "train_flops_method": TRAIN_FLOPS_METHOD.format(n=config.flop_sample_steps)
                if per_token is not None
                else None,
                "flops_per_padded_token": per_token,
                "padded_tokens": padded_tokens,
                "peak_rss_bytes": _peak_rss_bytes(),
                "trainable_params": report.trainable_params,
                "total_params": report.total_params,
                "trainable_fraction": report.trainable_fraction,
                "boundary": report.prefix_blocks,
                "spec": spec.to_dict(),
                "lora": config.lora,
                "resumed_from": resume_from,
                "model_dir": str(model_dir),
                "eval_history": eval_history,
                "diagnosis": diagnose(history, metrics.get("eval_loss"), _chance_loss(train_data, task), eval_history),
                "config": asdict(config),
            }
        )
        if config.max_flops is not None:
            spent = metrics["train_flops"]
            metrics["flops_budget"] = {"budget": config.max_flops, "spent": spent,
                                       "share_used": spent / config.max_flops if spent is not None else None,
                                       "stopped_by_budget": budget_stop.stopped_at is not None}
        if batching is not None:
            batching.add_metrics(metrics)
    finally:
        if callback is not None:
            callback.close()
        if batching is not None:
            batching.remove()
        report.remove()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    if main:
        write_json(out / "metrics.json", metrics)
    return metrics


__all__ = ["fit", "pad_id_of", "resumed_step_of"]
