"""How to fine-tune: ``TrainConfig`` (steps, optimizer, schedule, checkpoints, adapters, measurements).

Every value is checked when the config is made, so a bad flag fails before a model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers.trainer_utils import SchedulerType

from salf.errors import SalfError

TASKS = ("lm", "completion", "classification")
FRESH_HEAD_LEARNING_RATE = 1e-3
"""Learning rate of a fresh classification head when ``head_learning_rate`` is not given."""


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
    """Peak learning rate of the trainable blocks (and of LoRA adapters). This class's default is a plain
    starting value for library use; ``salf train`` fills it from the recipe of the run's kind instead
    (``salf.training.recipes``, measured per kind and scaled by the model's width)."""
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
    save_model: bool = True
    """Write the trained model (and tokenizer) to ``out_dir/model``; the learning-rate search's short
    candidate runs skip it."""
    max_flops: float | None = None
    """Compute-matched training: stop before the measured training FLOPs would pass this budget
    (``salf.training.budget``). ``max_steps`` still sets the schedule's length; needs FLOP sampling."""
    project_labelled_only: bool = True
    """In training, project only the labelled positions of a causal LM through its output head (TRL's
    SFTTrainer does the same). On prompt/completion data only the completion's positions carry a label, and
    the head (vocabulary x width, 49,152 x 576 on SmolLM2-135M) is a large share of a small model's step:
    projecting every position spends most of it on logits the loss never reads. The loss is the same; plain
    text (every position labelled), classifiers and evaluation keep the full projection."""
    ddp_find_unused_parameters: bool | None = None
    """DDP's ``find_unused_parameters`` under torchrun/accelerate (None: the Trainer's default). Frozen
    parameters never need it (see docs/DISTRIBUTED.md); per-datum boundaries do."""

    def __post_init__(self) -> None:
        def positive(name: str, value: float | None, allow_none: bool = True) -> None:
            if value is None and allow_none:
                return
            if value is None or not math.isfinite(value) or value <= 0:
                raise SalfError(f"{name} must be a positive number, got {value!r}")

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
        positive("max_flops", self.max_flops)
        if self.max_flops is not None and self.flop_sample_steps < 1:
            raise SalfError("max_flops needs the FLOPs measured (flop_sample_steps >= 1)",
                            "leave flop_sample_steps at its default of 1")
        if self.weight_decay < 0:
            raise SalfError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise SalfError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not 0 <= self.warmup_ratio < 1:
            raise SalfError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}", "e.g. 0.06")
        if not 0 <= self.lora_dropout < 1:
            raise SalfError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_save_merged and not self.lora:
            raise SalfError("a merged LoRA model was asked for, but the run trains no adapters",
                            "add --lora, or leave out --lora-merged")
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
                "--resume continues the run in the output directory, --overwrite starts it again: pick one",
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



__all__ = ["FRESH_HEAD_LEARNING_RATE", "TASKS", "TrainConfig", "TrainingInterrupted"]
