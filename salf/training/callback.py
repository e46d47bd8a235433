"""``SalfCallback``: a plan, step timing, FLOP sampling, a NaN guard and graceful interrupts for any ``Trainer``.

``Trainer(..., callbacks=[SalfCallback(spec)])`` applies the plan, times every step, samples FLOPs, stops
on a non-finite loss and turns SIGINT/SIGTERM into "save a checkpoint, then stop". ``salf.training.trainer``
uses it for every salf run; it is usable on its own from any Hugging Face training script.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import statistics
import threading
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from salf.errors import SalfError
from salf.method.freeze import FreezeReport, FreezeSpec, applied_report, apply_plan
from salf.models.heads import has_tied_head
from salf.training.distributed import is_distributed, rank_and_world, reduce_step

log = logging.getLogger("salf.training")


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
        if optimizer is not None and self.spec.untie_head and has_tied_head(model):
            raise SalfError(
                "the plan unties the output head, but the Trainer built its optimizer before the plan was applied",
                "pass SalfCallback to the Trainer's constructor (it applies the plan when the Trainer is built), "
                "or call salf.method.freeze.apply_plan before making the optimizer",
            )
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
        self.observe_loss(loss, kwargs.get("num_items_in_batch") is not None)

    def observe_loss(self, loss: Any, normalized: bool) -> None:
        """Record a training forward's loss: the model's own (seen by the forward hook), or one computed outside
        the model (the trainer's labelled-positions-only projection calls the model without labels)."""
        if isinstance(loss, torch.Tensor):
            # A copy: the Trainer may scale the returned loss in place (by the world size) after this hook.
            self._step_losses.append(loss.detach().float().clone())
            # A loss divided by the token count of *all* ranks is each rank's share (the Trainer scales it
            # back by the world size): see salf.training.distributed.reduce_step.
            self._normalized = normalized

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



__all__ = ["SalfCallback"]
