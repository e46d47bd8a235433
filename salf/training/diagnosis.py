"""One-line verdicts at the end of a run: did it stop while still learning, or does it over-fit?

An under-trained run makes every comparison with it look good or bad by accident, so ``salf train``
says so, with the flag to change, instead of leaving the user to read loss curves:

- **still learning**: the mean training loss of the last window of steps (a tenth of the run, at
  least ``MIN_WINDOW`` steps) is ``FALLING_DROP`` or more below that of the window before it;
- **over-fitting**: the evaluation loss is ``OVERFIT_RATIO`` times the end-of-run training loss or
  more, and at least ``OVERFIT_GAP`` above it (a small absolute gap on a tiny loss is not a problem);
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


def diagnose(history: Sequence[dict], eval_loss: float | None, chance_loss: float | None = None) -> list[str]:
    """Verdicts on a run from its per-step ``history`` (``loss`` per step) and final ``eval_loss``;
    ``chance_loss``: the training labels' entropy for a classification run (``label_entropy``), else None."""
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
    if eval_loss is not None and math.isfinite(eval_loss) and losses:
        w = max(MIN_WINDOW, len(losses) // 10)
        train_end = sum(losses[-w:]) / len(losses[-w:])
        if eval_loss >= OVERFIT_RATIO * train_end and eval_loss - train_end >= OVERFIT_GAP:
            notes.append(
                f"the eval loss ({eval_loss:.3g}) is far above the training loss at the end ({train_end:.3g}): "
                "it over-fits; lower --max-steps (or --epochs) or --lr, or give more training data"
            )
    return notes


__all__ = ["diagnose", "label_entropy"]
