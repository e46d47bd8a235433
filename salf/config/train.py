"""How to fine-tune (``TrainConfig``): steps, optimizer, schedule, checkpoints, adapters, measurements.

The batch, the rates, the warm-up and the epochs default to None, which means "the recipe of the run's
kind" (``salf.training.recipes``: measured per kind of run and scaled by the model's width), filled in
when training starts, for the command line and for Python alike. Every value is checked when the config
is made, so a bad flag fails before a model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from salf.config.fields import option
from salf.config.plan import LORA_RANK
from salf.errors import SalfError

AUTO = "auto"
"""``learning_rate`` that searches the rate for the plan first (``salf.training.lrsearch``)."""


def parse_learning_rate(text: str | float | None) -> float | str | None:
    """A learning rate: 'auto', or a positive finite number (None: the recipe's)."""
    if text is None or text == AUTO:
        return text
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SalfError(f"--lr must be a positive number or 'auto', got {text!r}", "e.g. --lr 1e-4, or --lr auto") from None
    if not math.isfinite(value) or value <= 0:
        raise SalfError(f"--lr must be a positive finite number, got {text!r}", "e.g. --lr 1e-4, or --lr auto")
    return value


def number_or_text(text: str) -> float | str:
    """A flag's value as a number where it reads as one ('auto' stays text); the config checks it."""
    try:
        return float(text)
    except ValueError:
        return text


RECIPE = "(default: the recipe of the run's kind, see README)"


@dataclass
class TrainConfig:
    """How to fine-tune: steps, optimizer, schedule, checkpoints, adapters and measurements."""

    max_steps: int | None = option(None, help="stop after this many optimizer steps (overrides --epochs)")
    epochs: float | None = option(None, help=f"passes over the training data when --max-steps is absent {RECIPE}: "
                                             "3 for a classifier, else 1")
    batch_size: int | None = option(None, help=f"data per optimizer step, per device {RECIPE}: 16 for a classifier, "
                                               "else 8")
    learning_rate: float | str | None = option(None, flag="--lr", metavar="LR|auto", parse=number_or_text,
                                               help="peak learning rate of the trained pretrained weights (and of "
                                                    f"LoRA adapters) {RECIPE}; 'auto' searches it for this plan on a "
                                                    "held-out split first, within --lr-search-budget")
    head_learning_rate: float | None = option(None, flag="--output-head-lr", old=("--head-lr",),
                                              help="learning rate of the output head, the classification head or the "
                                                   f"LM head {RECIPE}: 2e-3 for a fresh classification head, else "
                                                   "--lr")
    warmup_ratio: float | None = option(None, help=f"share of the steps spent warming the rate up, in [0, 1) {RECIPE}"
                                                   ": 0.1 for a classifier")
    lr_search_budget: float = option(0.15, help="with --lr auto: the search's cost as a share of this run's steps")
    weight_decay: float = option(0.0, help="AdamW weight decay (never applied to biases and norms)")
    lr_scheduler: str = option("linear", help="a transformers scheduler name: linear, cosine, constant, "
                                              "constant_with_warmup, ...")
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0 turns clipping off)")
    eval_batch_size: int | None = option(None, help="data per evaluation batch (default: --batch-size)")
    eval_steps: int | None = option(None, help="evaluate every N steps (default: at the end only)")
    save_steps: int | None = option(200, help="checkpoint every N steps, and at the end (Python: None for no "
                                              "checkpoints, so no resume)")
    save_total_limit: int | None = option(None, help="keep at most this many checkpoints (default: all)")
    logging_steps: int = option(10, help="log the running loss every N steps")
    seed: int = option(0, cli=False, help="seed of the data order, the adapters' initialisation and dropout "
                                          "(salf's commands: --seed)")
    gradient_checkpointing: bool = option(False, help="recompute activations in the backward pass (non-reentrant "
                                                      "checkpointing)")
    lora: bool = option(False, help="train LoRA adapters on the planned blocks instead of their weights")
    lora_rank: int = option(LORA_RANK, help="rank of the LoRA adapters trained")
    lora_alpha: float = option(16.0, help="LoRA alpha (the adapters' scale is alpha / rank)")
    lora_dropout: float = option(0.0, help="dropout on the LoRA adapters' input, in [0, 1)")
    lora_target_modules: tuple[str, ...] | str | None = option(
        None, cli=False, help="module names to adapt (None: PEFT's default for the architecture; 'all-linear': "
                              "every linear)")
    lora_save_merged: bool = option(False, flag="--lora-merged",
                                    help="with --lora: also save the model with the adapters merged in "
                                         "(--out/model-merged, tokenizer included)")
    bf16: bool = option(False, help="train in bf16 mixed precision")
    resume: bool | str = option(False, help="continue from the last checkpoint in --out (Python: or a checkpoint's "
                                            "path)")
    overwrite: bool = option(False, help="allow replacing a previous run's outputs in --out")
    prefix_cache: str | None = option(None, metavar="DIR",
                                      help="compute the frozen prefix's output once into DIR and train the suffix "
                                           "from it (reused when its keys match, refused if stale)")
    prefix_cache_dtype: str = option("float32", cli=False, help="storage dtype of a new prefix cache: 'float32' or "
                                                                "'bfloat16' (half the disk, rounded states)")
    prefix_cache_rebuild: bool = option(False, cli=False, help="rebuild the prefix cache even when one is there")
    flop_sample_steps: int = option(1, cli=False, help="steps measured with FlopCounterMode (excluded from the "
                                                       "step-time median); 0 turns it off")
    timing_warmup_steps: int = option(1, cli=False, help="first steps left out of the step-time median (allocator "
                                                         "and kernel warm-up)")
    show_progress: bool = option(False, cli=False, help="show the Trainer's progress bar (salf's commands: unless "
                                                        "--no-progress)")
    nan_check: bool = option(True, cli=False, help="stop at the first non-finite loss and report the step and the "
                                                   "last good checkpoint")
    save_model: bool = option(True, cli=False, help="write the trained model (and tokenizer) to out_dir/model; the "
                                                    "learning-rate search's short candidate runs skip it")
    max_flops: float | None = option(None, cli=False,
                                     help="stop before the measured training FLOPs would pass this budget "
                                          "(salf.training.budget; max_steps still sets the schedule's length; "
                                          "salf train's --max-flops also sizes max_steps to it)")
    project_labelled_only: bool = option(
        True, cli=False,
        help="in training, project only the labelled positions of a causal LM through its output head, as TRL's "
             "SFTTrainer does: on prompt/completion data only the completion carries a label, and the head "
             "(49,152 x 576 on SmolLM2-135M) is a large share of a small model's step. The loss is the same; plain "
             "text, classifiers and evaluation keep the full projection")
    ddp_find_unused_parameters: bool | None = option(
        None, cli=False, help="DDP's find_unused_parameters under torchrun/accelerate (None: the Trainer's default); "
                              "frozen parameters never need it, per-datum boundaries do (docs/DISTRIBUTED.md)")

    def __post_init__(self) -> None:
        def positive(name: str, value: float | None) -> None:
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise SalfError(f"{name} must be a positive number, got {value!r}")

        self.learning_rate = parse_learning_rate(self.learning_rate)
        for name in ("max_steps", "epochs", "batch_size", "eval_batch_size", "head_learning_rate", "eval_steps",
                     "save_steps", "save_total_limit", "logging_steps", "lora_rank", "lora_alpha", "max_flops"):
            positive(name, getattr(self, name))
        for name in ("weight_decay", "max_grad_norm", "flop_sample_steps", "timing_warmup_steps"):
            if getattr(self, name) < 0:
                raise SalfError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr_search_budget) and 0 < self.lr_search_budget <= 1):
            raise SalfError(f"the learning-rate search budget must be in (0, 1], got {self.lr_search_budget}",
                            "pass --lr-search-budget as a share of the run's steps, e.g. 0.15")
        if self.max_flops is not None and self.flop_sample_steps < 1:
            raise SalfError("max_flops needs the FLOPs measured (flop_sample_steps >= 1)",
                            "leave flop_sample_steps at its default of 1")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise SalfError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}", "e.g. 0.06")
        if not 0 <= self.lora_dropout < 1:
            raise SalfError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_save_merged and not self.lora:
            raise SalfError("a merged LoRA model was asked for, but the run trains no adapters",
                            "add --lora, or leave out --lora-merged")
        # imported here, not at the top: `salf --help` loads no transformers
        from transformers.trainer_utils import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise SalfError(f"unknown lr_scheduler {self.lr_scheduler!r}", f"use one of {', '.join(schedulers)}")
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

    @property
    def resolved(self) -> bool:
        """Whether every recipe value is set (``salf.training.recipes.resolve_recipe`` fills the others)."""
        return None not in (self.epochs, self.batch_size, self.learning_rate, self.warmup_ratio) \
            and self.learning_rate != AUTO
