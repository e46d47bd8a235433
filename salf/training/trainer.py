"""Fine-tune a model with a plan, on the real Hugging Face ``Trainer``, and measure what it cost.

``train`` is the whole run: it checks the output directory, optionally adds LoRA adapters to the
planned blocks only, applies the plan (``salf.method.freeze.apply_plan``), builds the optimizer over the
trainable parameters only (a fresh classification head gets its own learning rate), trains with
checkpoints and resume, evaluates, and writes

- ``out_dir/model``: the final model (safetensors) or, with LoRA, the adapter (``model-merged`` beside
  it when ``lora_save_merged``);
- ``out_dir/plan.json``: the plan the run used (when given);
- ``out_dir/metrics.json``: losses, accuracy, measured step time, FLOPs, memory, parameter counts;
- ``out_dir/history.json``: the loss of every step, ``[{"step", "loss", "seconds", "tokens"}, ...]``;
- ``out_dir/checkpoints/checkpoint-<step>``: the Trainer's checkpoints (every ``save_steps``).

``SalfCallback`` is the part usable from any ``Trainer`` script: ``Trainer(..., callbacks=[SalfCallback(spec)])``
applies the plan, times every step, samples FLOPs, stops on a non-finite loss and turns SIGINT/SIGTERM
into "save a checkpoint, then stop".
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SchedulerType, get_last_checkpoint

from salf.data.batch import Collator, ListDataset
from salf.errors import SalfError
from salf.fileio import write_json
from salf.method.freeze import FreezeReport, FreezeSpec, applied_report, apply_plan
from salf.models.arch import find_parts
from salf.training.distributed import is_distributed, is_main_process, rank_and_world, reduce_step

log = logging.getLogger("salf.training.trainer")

TASKS = ("lm", "completion", "classification")
FRESH_HEAD_LEARNING_RATE = 1e-3
"""Learning rate of a fresh classification head when ``head_learning_rate`` is not given."""
TRAIN_FLOPS_METHOD = (
    "torch.utils.flop_counter.FlopCounterMode (matmul/attention FLOPs of forward + backward) measured over the "
    "first {n} training step(s) of this run, divided by the padded tokens of those steps, times the padded "
    "tokens of every step trained"
)
PER_DATUM_FLOPS_NOTE = (
    "; with per-datum boundaries the sampled step trained from boundary {k} only, so this extrapolates that "
    "boundary's cost to every step: weigh each boundary's FLOPs per padded token by "
    "per_datum.padded_tokens_per_boundary for the run's cost"
)
_OUTPUTS = ("checkpoints", "model", "model-merged", "metrics.json", "history.json", "plan.json")


@dataclass
class TrainConfig:
    """How to fine-tune: steps, optimizer, schedule, checkpoints, adapters and measurements."""

    max_steps: int | None = None
    """Optimizer steps to run; overrides ``epochs`` when given."""
    epochs: float = 1.0
    """Passes over the training data (when ``max_steps`` is None)."""
    batch_size: int = 8
    """Data per optimizer step (per device)."""
    eval_batch_size: int | None = None
    """Data per evaluation batch (default: ``batch_size``)."""
    learning_rate: float = 5e-5
    """Peak learning rate of the trainable blocks (and of LoRA adapters)."""
    head_learning_rate: float | None = None
    """Learning rate of the head. None: ``FRESH_HEAD_LEARNING_RATE`` for a fresh classification head,
    ``learning_rate`` otherwise."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to biases and norms)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up, in [0, 1)."""
    lr_scheduler: str = "linear"
    """A ``transformers`` scheduler name: linear, cosine, constant, constant_with_warmup, ..."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    eval_steps: int | None = None
    """Evaluate every this many steps during training (None: only at the end)."""
    save_steps: int | None = 500
    """Checkpoint every this many steps, and at the end (None: no checkpoints, so no resume)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (None: all)."""
    logging_steps: int = 10
    """Log the running loss every this many steps."""
    seed: int = 0
    """Seed of the data order, the adapters' initialisation and dropout."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant checkpointing, so no input grads)."""
    lora: bool = False
    """Train LoRA adapters on the planned blocks only, instead of the blocks' weights."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | str | None = None
    """Module names to adapt (None: PEFT's default for the architecture; "all-linear": every linear)."""
    lora_save_merged: bool = False
    """Also save the model with the adapters merged in, to ``out_dir/model-merged``."""
    bf16: bool = False
    """Mixed precision in bfloat16."""
    resume: bool | str = False
    """True: resume from the latest checkpoint in ``out_dir/checkpoints``; a path: from that checkpoint."""
    overwrite: bool = False
    """Replace a previous run's outputs in ``out_dir``."""
    flop_sample_steps: int = 1
    """Steps measured with ``FlopCounterMode`` (excluded from the step-time median); 0 turns it off."""
    timing_warmup_steps: int = 1
    """First steps left out of the step-time median (allocator and kernel warm-up)."""
    show_progress: bool = False
    """Show the Trainer's progress bar."""
    nan_check: bool = True
    """Stop at the first non-finite loss and report the step and the last good checkpoint."""
    prefix_cache: str | None = None
    """Directory of a frozen-prefix activation cache (``salf.training.cache``): built there on first use (reused
    when its keys match, refused when stale), then training feeds it to the first trainable block."""
    prefix_cache_dtype: str = "float32"
    """Storage dtype of a new prefix cache: 'float32' or 'bfloat16' (half the disk, rounded states)."""
    prefix_cache_rebuild: bool = False
    """Rebuild the prefix cache even when one is there (stale or not)."""
    ddp_find_unused_parameters: bool | None = None
    """DDP's ``find_unused_parameters`` under torchrun/accelerate (None: the Trainer's default). Frozen
    parameters never need it (see docs/DISTRIBUTED.md); per-datum boundaries do."""

    def __post_init__(self) -> None:
        def positive(name: str, value: float | None, allow_none: bool = True) -> None:
            if value is None and allow_none:
                return
            if value is None or value <= 0:
                raise SalfError(f"{name} must be positive, got {value!r}")

        positive("max_steps", self.max_steps)
        positive("epochs", self.epochs, allow_none=False)
        positive("batch_size", self.batch_size, allow_none=False)
        positive("eval_batch_size", self.eval_batch_size)
        positive("learning_rate", self.learning_rate, allow_none=False)
        positive("head_learning_rate", self.head_learning_rate)
        positive("eval_steps", self.eval_steps)
        positive("save_steps", self.save_steps)
        positive("save_total_limit", self.save_total_limit)
        positive("logging_steps", self.logging_steps, allow_none=False)
        positive("lora_rank", self.lora_rank, allow_none=False)
        positive("lora_alpha", self.lora_alpha, allow_none=False)
        if self.weight_decay < 0:
            raise SalfError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise SalfError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not 0 <= self.warmup_ratio < 1:
            raise SalfError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}", "e.g. 0.06")
        if not 0 <= self.lora_dropout < 1:
            raise SalfError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.flop_sample_steps < 0:
            raise SalfError(f"flop_sample_steps must be >= 0, got {self.flop_sample_steps}")
        if self.timing_warmup_steps < 0:
            raise SalfError(f"timing_warmup_steps must be >= 0, got {self.timing_warmup_steps}")
        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise SalfError(
                f"unknown lr_scheduler {self.lr_scheduler!r}", f"use one of {', '.join(schedulers)}"
            )
        if self.resume and self.overwrite:
            raise SalfError(
                "resume and overwrite were both asked for",
                "resume continues the run in the output directory; overwrite starts it again: pick one",
            )
        if isinstance(self.lora_target_modules, list):
            self.lora_target_modules = tuple(self.lora_target_modules)
        if self.prefix_cache_dtype not in ("float32", "bfloat16"):
            raise SalfError(
                f"prefix_cache_dtype must be 'float32' or 'bfloat16', got {self.prefix_cache_dtype!r}"
            )
        if self.prefix_cache is not None:
            self.prefix_cache = str(self.prefix_cache)


class TrainingInterrupted(SalfError):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint; resume continues it."""

    def __init__(self, step: int, checkpoint: str | None):
        self.step = step
        self.checkpoint = checkpoint
        where = f"checkpoint saved at {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"training interrupted at step {step}; {where}", "run again with resume to continue")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _checkpoint_before(folder: str | None, step: int) -> str | None:
    """The newest checkpoint in ``folder`` saved before ``step`` (or None)."""
    if not folder or not os.path.isdir(folder):
        return None
    found = []
    for name in os.listdir(folder):
        if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and os.path.isdir(os.path.join(folder, name)):
            try:
                found.append((int(name.rsplit("-", 1)[1]), name))
            except ValueError:
                continue
    found = [item for item in found if item[0] < step]
    return os.path.join(folder, max(found)[1]) if found else None


class SalfCallback(TrainerCallback):
    """Plan, timing, FLOPs, NaN guard and graceful interrupts for a Hugging Face ``Trainer``.

    - applies ``spec`` when the Trainer is built (``on_init_end``) or, at the latest, when training
      begins, then drops frozen parameters from an optimizer that was already built;
    - records each step's wall time and loss (``history``) and the median step time over the steps
      after the first ``max(flop_sample_steps, timing_warmup_steps)`` (``step_seconds_median``);
    - measures the FLOPs of the first ``flop_sample_steps`` steps with ``FlopCounterMode`` and counts
      padded tokens of every step (``flops_per_padded_token``, ``padded_tokens``);
    - stops at the first non-finite loss without saving that step (earlier checkpoints are kept) and
      raises a ``SalfError`` naming the step at the end of training (``raise_on_nan``);
    - turns SIGINT/SIGTERM into "save a checkpoint at the end of this step, then stop"
      (``interrupted_step``); a second signal interrupts at once.
    """

    def __init__(
        self,
        spec: FreezeSpec | None = None,
        *,
        flop_sample_steps: int = 1,
        timing_warmup_steps: int = 1,
        nan_check: bool = True,
        raise_on_nan: bool = True,
        handle_signals: bool = True,
    ):
        if flop_sample_steps < 0 or timing_warmup_steps < 0:
            raise SalfError(
                f"flop_sample_steps and timing_warmup_steps must be >= 0, got {flop_sample_steps}, {timing_warmup_steps}"
            )
        self.spec = spec
        self.flop_sample_steps = flop_sample_steps
        self.timing_warmup_steps = timing_warmup_steps
        self.nan_check = nan_check
        self.raise_on_nan = raise_on_nan
        self.handle_signals = handle_signals
        self.report: FreezeReport | None = None
        self.history: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        self.sampled_flops = 0
        self.sampled_tokens = 0
        self.padded_tokens = 0
        self.nan_step: int | None = None
        self.nan_loss: float | None = None
        self.nan_checkpoint: str | None = None
        self.interrupted_step: int | None = None
        self.start_step = 0
        self._steps_run = 0
        self._step_start = 0.0
        self._step_cpu_start = 0.0
        self._step_losses: list[torch.Tensor] = []
        self._step_tokens = 0
        self._normalized = False
        self._flop_mode: FlopCounterMode | None = None
        self._hook = None
        self._signal_received: int | None = None
        self._old_handlers: dict[int, Any] = {}

    # -- the plan -------------------------------------------------------------------------------
    def _apply(self, model: nn.Module | None, optimizer: Any = None) -> None:
        if model is None:
            return
        current = applied_report(model)
        if current is not None:
            self.report = current
            return
        if self.spec is None:
            return
        self.report = apply_plan(model, self.spec)
        if optimizer is not None:  # built before the plan: drop the frozen parameters and their state
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if not p.requires_grad:
                        optimizer.state.pop(p, None)
                group["params"] = [p for p in group["params"] if p.requires_grad]

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._apply(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._apply(model, optimizer)
        self.start_step = state.global_step
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._forward_hook, with_kwargs=True)
        if self.report is not None:
            fraction = self.report.trainable_fraction
            log.info(
                "salf: training %d of %d parameters (%.2f%%); backward stops at block %d",
                self.report.trainable_params,
                self.report.total_params,
                100 * fraction,
                self.report.prefix_blocks,
            )
            state.log_history.append(
                {
                    "step": state.global_step,
                    "trainable_fraction": fraction,
                    "trainable_params": self.report.trainable_params,
                    "total_params": self.report.total_params,
                }
            )
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    # -- per step -------------------------------------------------------------------------------
    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            self._step_tokens += ids.numel()
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            # A copy: the Trainer may scale the returned loss in place (by the world size) after this hook.
            self._step_losses.append(loss.detach().float().clone())
            # A loss divided by the token count of *all* ranks is each rank's share (the Trainer scales it
            # back by the world size): see salf.training.distributed.reduce_step.
            self._normalized = kwargs.get("num_items_in_batch") is not None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_losses = []
        self._step_tokens = 0
        self._normalized = False
        if self._steps_run < self.flop_sample_steps:
            self._flop_mode = FlopCounterMode(display=False)
            self._flop_mode.__enter__()
        _sync()
        self._step_start = time.perf_counter()
        self._step_cpu_start = time.process_time()

    def _stop_flop_mode(self) -> int:
        mode, self._flop_mode = self._flop_mode, None
        if mode is None:
            return 0
        mode.__exit__(None, None, None)
        return mode.get_total_flops()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        seconds = time.perf_counter() - self._step_start
        cpu_seconds = time.process_time() - self._step_cpu_start
        sampled = self._flop_mode is not None
        flops = self._stop_flop_mode()
        self._steps_run += 1
        if sampled:
            self.sampled_flops += flops
            self.sampled_tokens += self._step_tokens
        elif self._steps_run > self.timing_warmup_steps:
            self.step_seconds.append(seconds)
            self.step_cpu_seconds.append(cpu_seconds)
        loss_tensor = (
            torch.stack(self._step_losses).mean() if self._step_losses else torch.tensor(float("nan"))
        )
        if is_distributed():  # one global loss and token count on every rank, so all stop together on NaN
            scale = (
                rank_and_world()[1]
                if self._normalized and getattr(args, "average_tokens_across_devices", False)
                else 1
            )
            loss, self._step_tokens = reduce_step(loss_tensor, self._step_tokens, scale)
        else:
            loss = loss_tensor.item()
        self.padded_tokens += self._step_tokens
        self.history.append(
            {
                "step": state.global_step,
                "loss": loss,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "tokens": self._step_tokens,
            }
        )
        if self.nan_check and self._step_losses and not math.isfinite(loss):
            self.nan_step, self.nan_loss = state.global_step, loss
            self.nan_checkpoint = _checkpoint_before(args.output_dir, state.global_step)
            control.should_training_stop = True
            control.should_save = False  # never checkpoint the diverged weights
            control.should_evaluate = False
            return control
        if self._signal_received is not None:
            self.interrupted_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.nan_step is not None:
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        if self.nan_step is not None and self.raise_on_nan:
            raise self.nan_error(args.learning_rate)

    def close(self) -> None:
        """Leave no trace: FLOP counting off, forward hook off, the previous signal handlers back.

        Called at the end of training; call it yourself if ``trainer.train()`` raised."""
        self._stop_flop_mode()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()

    # -- signals and errors ---------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal_received is not None:  # second signal: stop now
            for num, handler in self._old_handlers.items():
                signal.signal(num, handler)
            self._old_handlers.clear()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self._signal_received = signum
        log.warning("salf: %s received; saving a checkpoint after this step", signal.Signals(signum).name)

    def nan_error(self, learning_rate: float | None = None) -> SalfError:
        where = (
            f"the last good checkpoint is {self.nan_checkpoint}"
            if self.nan_checkpoint
            else "no checkpoint was saved before it"
        )
        lr = f" (now {learning_rate:g})" if learning_rate is not None else ""
        return SalfError(
            f"the training loss became {self.nan_loss} at step {self.nan_step}; training stopped, {where}",
            f"lower the learning rate{lr} or add warmup, then run again",
        )

    # -- results --------------------------------------------------------------------------------
    @property
    def step_seconds_median(self) -> float | None:
        """Median wall time of the steps after the FLOP-measured / warm-up steps."""
        timed = self.step_seconds or [h["seconds"] for h in self.history]
        return statistics.median(timed) if timed else None

    @property
    def step_cpu_seconds_median(self) -> float | None:
        """Median CPU time of this process (all its threads) over the same steps: on a shared machine it
        excludes the time spent waiting for a core, so it is the steadier measure of host-side work."""
        timed = self.step_cpu_seconds or [h["cpu_seconds"] for h in self.history]
        return statistics.median(timed) if timed else None

    @property
    def flops_per_padded_token(self) -> float | None:
        return self.sampled_flops / self.sampled_tokens if self.sampled_tokens else None


class _SalfTrainer(Trainer):
    """A ``Trainer`` whose AdamW gets the trainable parameters only, the head in its own group."""

    def __init__(
        self,
        *args,
        head_param_ids: frozenset[int] = frozenset(),
        head_learning_rate: float,
        train_batch_sampler: torch.utils.data.Sampler | None = None,
        **kwargs,
    ):
        self.head_param_ids = head_param_ids
        self.head_learning_rate = head_learning_rate
        self.train_batch_sampler = train_batch_sampler
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self):
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                buckets.setdefault((id(param) in self.head_param_ids, name in decay), []).append(param)
        groups = []
        for (is_head, decays), params in sorted(
            buckets.items()
        ):  # body groups first: their lr is the logged one
            groups.append(
                {
                    "params": params,
                    "weight_decay": self.args.weight_decay if decays else 0.0,
                    "lr": self.head_learning_rate if is_head else self.args.learning_rate,
                }
            )
        if not groups:
            raise SalfError("the plan leaves no trainable parameter", "train at least the head or one block")
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )
        return self.optimizer


def _classification_metrics(eval_pred) -> dict[str, float]:
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = np.asarray(eval_pred.label_ids).reshape(-1)
    preds = np.asarray(logits).reshape(len(labels), -1).argmax(-1)
    f1s = []
    for cls in np.union1d(labels, preds):
        tp = np.sum((preds == cls) & (labels == cls))
        fp = np.sum((preds == cls) & (labels != cls))
        fn = np.sum((preds != cls) & (labels == cls))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float(np.mean(preds == labels)), "macro_f1": float(np.mean(f1s))}


def _check_data(data: Sequence[dict], task: str, what: str) -> None:
    if not data:
        raise SalfError(f"the {what} data is empty", f"give at least one datum for {what}")
    for i, datum in enumerate(data):
        if not isinstance(datum, dict) or "input_ids" not in datum or "labels" not in datum:
            raise SalfError(
                f"{what} datum {i} is not a dict with input_ids and labels",
                "tokenize the data with salf.data.files",
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


def _prepare_out_dir(out: Path, config: TrainConfig, main: bool = True) -> str | None:
    """Refuse to clobber a previous run; returns the checkpoint to resume from (or None).

    Under torchrun only the main process (``main``) checks and cleans: the others would race with it."""
    ckpt_dir = out / "checkpoints"
    if config.resume:
        if isinstance(config.resume, (str, os.PathLike)) and not isinstance(config.resume, bool):
            path = Path(config.resume)
            if not (path / "trainer_state.json").is_file():
                raise SalfError(
                    f"{path} is not a Trainer checkpoint (no trainer_state.json)",
                    "pass a checkpoint-<step> folder",
                )
            return str(path)
        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        if last is None:
            raise SalfError(
                f"nothing to resume: no checkpoint in {ckpt_dir}", "run without resume to start training"
            )
        return last
    if not main:
        return None
    if out.exists() and not out.is_dir():
        raise SalfError(f"the output path {out} is a file", "give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise SalfError(
                f"the output directory {out} is not empty",
                "pass resume to continue the run there, overwrite to replace it, or pick another directory",
            )
        for name in _OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return None


def _add_lora(model: nn.Module, spec: FreezeSpec, config: TrainConfig, task: str) -> nn.Module:
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as exc:
        raise SalfError("LoRA needs the peft package", "pip install 'salf[lora]'") from exc
    if not spec.trainable_blocks:
        raise SalfError(
            "LoRA needs at least one trainable block in the plan", "use a smaller boundary or drop lora"
        )
    parts = find_parts(model)
    head_modules = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name in parts.head_names
            if any(True for _ in model.get_submodule(name).parameters())
        }
    )
    is_class = task == "classification"
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules)
        if isinstance(config.lora_target_modules, tuple)
        else config.lora_target_modules,
        layers_to_transform=list(spec.trainable_blocks),
        layers_pattern=parts.blocks_name.rsplit(".", 1)[-1],
        modules_to_save=head_modules if (is_class and spec.head) else None,
        task_type=TaskType.SEQ_CLS if is_class else TaskType.CAUSAL_LM,
    )
    torch.manual_seed(config.seed)
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as exc:
        raise SalfError(
            f"LoRA could not be placed on blocks {list(spec.trainable_blocks)}: {exc}",
            "set lora_target_modules to module names of this architecture (or 'all-linear')",
        ) from exc
    return peft_model


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
        warmup_steps=config.warmup_ratio,
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
        prediction_loss_only=task != "classification",
        disable_tqdm=not config.show_progress,
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=config.ddp_find_unused_parameters,
    )
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


def _merge_history(path: Path, resumed_step: int | None, new: list[dict]) -> list[dict]:
    old: list[dict] = []
    if resumed_step is not None and path.is_file():
        try:
            old = [h for h in json.loads(path.read_text()) if h.get("step", 0) <= resumed_step]
        except (ValueError, AttributeError, TypeError):
            old = []
    return old + new


def train(
    model: nn.Module,
    tokenizer_or_pad_id: Any,
    train_data: Sequence[dict],
    eval_data: Sequence[dict] | None,
    spec: FreezeSpec | None,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    plan_dict: dict | None = None,
    task: str = "lm",
    *,
    callbacks: Sequence[TrainerCallback] = (),
    boundaries: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` with ``spec`` (None: full fine-tuning); returns the metrics written to metrics.json.

    The model is trained in place (with LoRA, adapters are injected into it). Raises ``SalfError`` on
    a non-finite loss (naming the step and the last good checkpoint) and ``TrainingInterrupted`` after
    SIGINT/SIGTERM (a checkpoint is saved first).

    ``boundaries``: one boundary per training datum (``salf.training.perdatum``); batches then group data of one
    boundary and each step trains from its batch's boundary up (``spec`` must be None or the boundary
    of the smallest). ``config.prefix_cache`` trains from a frozen-prefix cache (``salf.training.cache``).
    Under torchrun/accelerate only the main process writes files (docs/DISTRIBUTED.md).
    """
    if task not in TASKS:
        raise SalfError(f"unknown task {task!r}", f"use one of {', '.join(TASKS)}")
    if not isinstance(config, TrainConfig):
        raise SalfError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_data(train_data, task, "training")
    if eval_data is not None:
        _check_data(eval_data, task, "evaluation")
    pad_id, tokenizer = _pad_id(tokenizer_or_pad_id, model)
    out = Path(out_dir)
    main = is_main_process()
    resume_from = _prepare_out_dir(out, config, main)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"

    num_layers = find_parts(model).num_layers
    if boundaries is not None:
        from salf.training.perdatum import base_spec

        spec = base_spec(boundaries, len(train_data), num_layers, spec, config.prefix_cache)
    spec = spec if spec is not None else FreezeSpec.full(num_layers)
    if config.lora:
        model = _add_lora(model, spec, config, task)
    report = apply_plan(model, spec)
    callback: SalfCallback | None = None
    batching: Any = None  # salf.training.cache.CachedTraining | salf.training.perdatum.PerDatumTraining
    try:
        train_dataset: torch.utils.data.Dataset = ListDataset(train_data)
        collator: Any = Collator(pad_id)
        batch_sampler = None
        args = _training_arguments(config, ckpt_dir, task, eval_data is not None)
        if config.prefix_cache is not None:
            from salf.training.cache import prepare_cached_training

            batching = prepare_cached_training(
                model,
                train_data,
                report.prefix_blocks,
                config.prefix_cache,
                pad_id,
                tokenizer=tokenizer,
                dtype=config.prefix_cache_dtype,
                rebuild=config.prefix_cache_rebuild,
                batch_size=config.eval_batch_size or config.batch_size,
                show_progress=config.show_progress,
                device=args.device,  # build on the training device, where the Trainer puts the model anyway
            )
        elif boundaries is not None:
            from salf.training.perdatum import prepare_per_datum_training

            batching = prepare_per_datum_training(
                model, train_data, boundaries, pad_id, batch_size=config.batch_size, seed=config.seed
            )
            batch_sampler = batching.sampler
        if batching is not None:
            train_dataset, collator = batching.dataset, batching.collator
        inner = model.get_base_model() if config.lora else model
        parts = find_parts(inner)
        head_ids = frozenset(id(p) for n, p in inner.named_parameters() if parts.group_of(n) == "head")
        head_lr = config.head_learning_rate
        if head_lr is None:
            head_lr = FRESH_HEAD_LEARNING_RATE if task == "classification" else config.learning_rate

        callback = SalfCallback(
            spec,
            flop_sample_steps=config.flop_sample_steps,
            timing_warmup_steps=config.timing_warmup_steps,
            nan_check=config.nan_check,
            raise_on_nan=False,
        )
        trainer = _SalfTrainer(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=ListDataset(eval_data) if eval_data is not None else None,
            processing_class=tokenizer,
            compute_metrics=_classification_metrics if task == "classification" else None,
            callbacks=[callback, *callbacks],
            head_param_ids=head_ids,
            head_learning_rate=head_lr,
            train_batch_sampler=batch_sampler,
        )
        resumed_step = None
        if resume_from is not None:
            resumed_step = int(
                json.loads((Path(resume_from) / "trainer_state.json").read_text())["global_step"]
            )

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            output = trainer.train(resume_from_checkpoint=resume_from)
        finally:
            train_seconds = time.perf_counter() - start
            history = _merge_history(out / "history.json", resumed_step, callback.history)
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
            elif metrics["eval_loss"] is not None:
                metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        report.remove()  # the saved model and the caller's model carry no hooks

        model_dir = out / "model"
        if main and config.lora:
            model.save_pretrained(str(model_dir), safe_serialization=True)
            if config.lora_save_merged:
                model.merge_and_unload().save_pretrained(str(out / "model-merged"))
        elif main:
            model.save_pretrained(str(model_dir))
        if main and tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(model_dir))
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
                "config": asdict(config),
            }
        )
        if batching is not None:
            metrics.update(batching.metrics())
        per_datum = metrics.get("per_datum")
        if per_datum and metrics["train_flops_method"] and len(per_datum["padded_tokens_per_boundary"]) > 1:
            metrics["train_flops_method"] += PER_DATUM_FLOPS_NOTE.format(k=per_datum["first_boundary"])
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


__all__ = ["SalfCallback", "TrainConfig", "TrainingInterrupted", "train"]
