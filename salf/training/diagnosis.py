"""One-line verdicts at the end of a run: did it stop while still learning, or does it over-fit?

An under-trained run makes every comparison with it look good or bad by accident, so ``salf train``
says so, with the flag to change, instead of leaving the user to read loss curves:

- **still learning**: the mean training loss of the last window of steps (a tenth of the run, at
  least ``MIN_WINDOW`` steps) is ``FALLING_DROP`` or more below that of the window before it;
- **over-fitting**: evaluated during training (``--eval-steps``), the final evaluation loss is ``EVAL_RISE``
  or more above its best: the run went on past the step where it generalised best, and that step is the
  length to train. Evaluated once, at the end, a **generalisation gap** (the evaluation loss ``OVERFIT_RATIO``
  times the end-of-run training loss or more, and at least ``OVERFIT_GAP`` above it; a small absolute gap on
  a tiny loss is not a problem) is reported as such, not as over-fitting: a gap alone does not say that
  shorter training is better. Measured here: full fine-tuning of MiniLM on the word-order task for 600
  steps ended with eval loss 0.54-0.68 against training loss 0.16-0.20 on three seeds, and its accuracy
  (82.0 +- 0.9%) was far above that of 150 steps (60.7 +- 8.6%; BENCHMARKS.md, training recipe);
- **learned nothing** (classification): the training loss of the last window is still ``CHANCE_SHARE`` or
  more of the chance level, the entropy of the training labels (what predicting the class frequencies
  scores). Seen here: MiniLM on the word-order task at 150 steps stayed at ln 2 on two seeds of three at
  body rate 2e-4 and reached 75.8% on the third (BENCHMARKS.md, training recipe).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from salf.method.lenses import frequency_entropy

MIN_WINDOW = 5
"""Fewest steps per window: per-step losses are noisy, a mean over fewer says little."""
FALLING_DROP = 0.10
"""Relative drop of the windowed training loss that counts as still falling steeply."""
OVERFIT_RATIO = 1.5
OVERFIT_GAP = 0.2
EVAL_RISE = 0.10
"""Relative rise of the final evaluation loss over its best during training that counts as over-fitting."""
CHANCE_SHARE = 0.95
"""A final training loss this close to the chance level means the model has not started on the task."""


def label_entropy(labels: Sequence[int]) -> float | None:
    """Entropy (nats) of the label frequencies: the loss of predicting them and nothing else; None when empty."""
    return frequency_entropy(list(Counter(labels).values()))


def _window_means(losses: Sequence[float]) -> tuple[float, float] | None:
    n = len(losses)
    w = max(MIN_WINDOW, n // 10)
    if n < 2 * w:
        return None
    return sum(losses[-2 * w:-w]) / w, sum(losses[-w:]) / w


def _finite_evals(eval_history: Sequence[dict]) -> list[tuple[float, int]]:
    """(eval loss, step) of every evaluation with a finite loss."""
    return [(float(h["eval_loss"]), int(h.get("step", 0))) for h in eval_history
            if isinstance(h.get("eval_loss"), (int, float)) and math.isfinite(h["eval_loss"])]


def _eval_rise(evals: Sequence[tuple[float, int]], eval_loss: float) -> tuple[float, int] | None:
    """(best eval loss, its step) when the final ``eval_loss`` is ``EVAL_RISE`` or more above the best of
    ``evals``; None otherwise."""
    best, step = min(evals)
    return (best, step) if best > 0 and eval_loss >= (1 + EVAL_RISE) * best else None


def diagnose(history: Sequence[dict], eval_loss: float | None, chance_loss: float | None = None,
             eval_history: Sequence[dict] = ()) -> list[str]:
    """Verdicts on a run from its per-step ``history`` (``loss`` per step), final ``eval_loss`` and the
    evaluations made during training (``eval_history``: ``eval_loss`` and ``step`` each); ``chance_loss``:
    the training labels' entropy for a classification run (``label_entropy``), else None."""
    losses = [float(h["loss"]) for h in history if isinstance(h.get("loss"), (int, float)) and math.isfinite(h["loss"])]
    notes: list[str] = []
    means = _window_means(losses)
    if means is not None:
        before, last = means
        if before > 0 and (before - last) / before >= FALLING_DROP:
            w = max(MIN_WINDOW, len(losses) // 10)
            notes.append(
                f"the training loss was still falling when the run ended ({before:.3g} -> {last:.3g} over the "
                f"last {w} steps): it is likely under-trained; raise --max-steps (or --epochs), or --lr"
            )
    if chance_loss is not None and chance_loss > 0 and means is not None and means[1] >= CHANCE_SHARE * chance_loss:
        notes.append(
            f"the training loss ended at the chance level ({means[1]:.3g} against {chance_loss:.3g} for predicting "
            "the class frequencies): the model has not started on the task; raise --max-steps, try another --lr "
            "(or --lr auto), or another seed"
        )
    if eval_loss is None or not math.isfinite(eval_loss) or not losses:
        return notes
    evals = _finite_evals(eval_history)
    evaluated_during_training = len(evals) >= 2
    rise = _eval_rise(evals, eval_loss) if evaluated_during_training else None
    if rise is not None:
        notes.append(
            f"the eval loss rose from {rise[0]:.3g} at step {rise[1]} to {eval_loss:.3g} at the end: it over-fits "
            f"after step {rise[1]}; lower --max-steps to about {rise[1]} (or --lr), or give more training data"
        )
        return notes
    if evaluated_during_training:  # and the eval loss did not rise: the gap alone says nothing more
        return notes
    w = max(MIN_WINDOW, len(losses) // 10)
    train_end = sum(losses[-w:]) / len(losses[-w:])
    if eval_loss >= OVERFIT_RATIO * train_end and eval_loss - train_end >= OVERFIT_GAP:
        notes.append(
            f"the eval loss ({eval_loss:.3g}) is far above the training loss at the end ({train_end:.3g}): a "
            "generalisation gap, not by itself over-fitting; pass --eval-steps N to see whether the eval loss "
            "rises during training (then lower --max-steps), or give more training data"
        )
    return notes


__all__ = ["diagnose", "label_entropy"]
