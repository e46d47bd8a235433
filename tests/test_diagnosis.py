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


def test_eval_far_above_train_is_a_gap_and_a_rising_eval_loss_is_over_fitting():
    flat = [0.2] * 100
    notes = diagnose(history(flat), eval_loss=0.9)
    assert len(notes) == 1 and "generalisation gap" in notes[0] and "--eval-steps" in notes[0]
    assert "over-fits" not in notes[0]  # one evaluation cannot tell that shorter training is better
    assert diagnose(history([0.01] * 100), eval_loss=0.05) == []  # ratio large, gap tiny: fine
    rising = [{"step": 20, "eval_loss": 0.6}, {"step": 40, "eval_loss": 0.5}, {"step": 100, "eval_loss": 0.9}]
    notes = diagnose(history(flat), eval_loss=0.9, eval_history=rising)
    assert len(notes) == 1 and "over-fits after step 40" in notes[0] and "--max-steps to about 40" in notes[0]
    falling = [{"step": 20, "eval_loss": 1.2}, {"step": 100, "eval_loss": 0.9}]
    assert diagnose(history(flat), eval_loss=0.9, eval_history=falling) == []  # evaluated: best at the end


def test_too_short_or_non_finite_histories_are_not_judged():
    assert diagnose(history([3.0, 2.0, 1.0]), eval_loss=None) == []
    assert diagnose(history([float("nan")] * 50), eval_loss=float("nan")) == []


def test_a_loss_stuck_at_the_chance_level_is_called_learned_nothing():
    import math

    from salf.training.diagnosis import label_entropy

    chance = label_entropy([0, 1] * 50)
    assert math.isclose(chance, math.log(2))
    stuck = [0.70 + 0.01 * ((-1) ** i) for i in range(150)]  # a binary task whose loss never left ln 2
    notes = diagnose(history(stuck), eval_loss=0.69, chance_loss=chance)
    assert len(notes) == 1 and "chance level" in notes[0] and "--max-steps" in notes[0]
    learning = [0.45 + 0.01 * ((-1) ** i) for i in range(150)]
    assert diagnose(history(learning), eval_loss=0.5, chance_loss=chance) == []
    assert diagnose(history(stuck), eval_loss=0.69) == []  # no chance level (not a classifier): no verdict
    assert label_entropy([]) is None and label_entropy([3, 3, 3]) == 0.0


def test_a_classifier_run_that_learned_nothing_says_so_in_its_metrics(tmp_path):
    """End to end through fit(): a rate of ~0 leaves the loss at the chance level of balanced labels."""
    from salf.models.tiny import tiny_model
    from salf.training.config import TrainConfig
    from salf.training.inputs import TrainingData
    from salf.training.run import train

    data = [{"input_ids": [5 + (i % 7), 9, 11 + (i % 3)], "labels": i % 2} for i in range(64)]
    model = tiny_model("bert", "classification", num_labels=2)
    config = TrainConfig(max_steps=40, batch_size=8, learning_rate=1e-12, head_learning_rate=1e-12,
                         save_steps=None, logging_steps=100, seed=0)
    metrics = train(model, 0, TrainingData(data, None, "classification"), None, config, tmp_path / "run")
    assert any("chance level" in note for note in metrics["diagnosis"]), metrics["diagnosis"]
