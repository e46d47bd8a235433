"""End-of-run verdicts: a run stopped while still learning, or over-fitting, says so in one line."""

from __future__ import annotations

from salf.training.diagnosis import diagnose


def history(losses):
    return [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]


def test_still_falling_loss_is_called_under_trained():
    notes = diagnose(history([3.0 - 0.02 * i for i in range(100)]), eval_loss=None)
    assert len(notes) == 1 and "still falling" in notes[0] and "--max-steps" in notes[0]


def test_flat_loss_and_close_eval_say_nothing():
    flat = [1.0 + 0.01 * ((-1) ** i) for i in range(100)]
    assert diagnose(history(flat), eval_loss=1.1) == []


def test_eval_far_above_train_is_called_over_fitting():
    flat = [0.2] * 100
    notes = diagnose(history(flat), eval_loss=0.9)
    assert len(notes) == 1 and "over-fits" in notes[0]
    assert diagnose(history([0.01] * 100), eval_loss=0.05) == []  # ratio large, gap tiny: fine


def test_too_short_or_non_finite_histories_are_not_judged():
    assert diagnose(history([3.0, 2.0, 1.0]), eval_loss=None) == []
    assert diagnose(history([float("nan")] * 50), eval_loss=float("nan")) == []
