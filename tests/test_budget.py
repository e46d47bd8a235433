"""Compute-matched training: the FLOPs budget of another run, the steps it buys, the stop rule."""

from __future__ import annotations

import json

import pytest

from salf.errors import SalfError
from salf.training.budget import expected_padded_tokens, flops_budget_stop, flops_of_run, steps_for_budget


def test_flops_of_run_reads_metrics_and_explains_what_is_missing(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"train_flops": 1.5e9}))
    assert flops_of_run(tmp_path) == 1.5e9
    with pytest.raises(SalfError, match="--max-flops"):
        flops_of_run(tmp_path / "nowhere")
    (tmp_path / "metrics.json").write_text(json.dumps({"train_flops": None}))
    with pytest.raises(SalfError, match="no measured training FLOPs"):
        flops_of_run(tmp_path)


def test_steps_for_budget_and_the_stop_rule():
    assert steps_for_budget(1000.0, per_token=2.0, padded_tokens_per_step=50) == 10
    with pytest.raises(SalfError, match="does not fit one step"):
        steps_for_budget(10.0, per_token=2.0, padded_tokens_per_step=50)
    with pytest.raises(SalfError, match="positive"):
        steps_for_budget(float("nan"), 1.0, 1.0)
    # 900 spent: a step of at most 100 still fits a budget of 1000, one of 101 might not.
    assert not flops_budget_stop(900.0, 100.0, 1000.0)
    assert flops_budget_stop(900.0, 101.0, 1000.0)


def test_expected_padded_tokens_is_batch_times_mean_longest():
    data = [{"input_ids": [1] * 10} for _ in range(8)]
    assert expected_padded_tokens(data, batch_size=4) == 40.0
    mixed = [{"input_ids": [1] * n} for n in (2, 2, 2, 20)]
    assert 4 * 2 < expected_padded_tokens(mixed, batch_size=4) <= 4 * 20


def test_match_compute_stops_within_one_step_of_the_budget(tmp_path):
    """A plan trained for full fine-tuning's measured FLOPs: never above them, less than a step below."""
    import torch

    from salf.method.freeze import FreezeSpec
    from salf.models.tiny import tiny_model
    from salf.training.budget import estimate_steps
    from salf.training.config import TrainConfig
    from salf.training.inputs import TrainingData
    from salf.training.run import train

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 100, (int(n),), generator=g).tolist(), "labels": i % 2}
            for i, n in enumerate(torch.randint(6, 16, (64,), generator=g))]
    base = dict(batch_size=8, learning_rate=1e-3, save_steps=None, logging_steps=50, seed=0)
    full = train(tiny_model("llama", "classification", num_labels=2), 0, TrainingData(data, None, "classification"), None, TrainConfig(max_steps=6, **base), tmp_path / "full")
    budget = full["train_flops"]
    spec = FreezeSpec.from_boundary(3, 4)
    model = tiny_model("llama", "classification", num_labels=2)
    steps, per_step = estimate_steps(model, data, spec, 0, 8, budget)
    assert steps > 6  # the plan is cheaper per step, so the same FLOPs buy more steps
    # A schedule longer than the budget allows: the stop rule, not the schedule, must end the run.
    run = train(model, 0, TrainingData(data, None, "classification"), spec, TrainConfig(max_steps=steps + 20, max_flops=budget, **base), tmp_path / "plan")
    spent = run["train_flops"]
    largest_step = run["flops_per_padded_token"] * 8 * max(len(d["input_ids"]) for d in data)
    assert spent <= budget and budget - spent < largest_step
    assert run["flops_budget"]["stopped_by_budget"] and run["flops_budget"]["share_used"] <= 1.0
