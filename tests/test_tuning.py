"""`salf train` without rate flags takes its kind's recipe; `--lr auto` searches; `--match-compute` sizes the run."""

from __future__ import annotations

import json

import pytest
from helpers import label_data, save_tiny

from salf.cli import main
from salf.config.train import TrainConfig, parse_learning_rate
from salf.errors import SalfError
from salf.training.recipes import RECIPES, default_recipe, resolve_recipe


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("tuning")
    return work, save_tiny(work, "bert", "classification"), label_data(work / "labels.jsonl", n=96)


def test_learning_rate_flag_takes_auto_or_a_positive_number():
    assert parse_learning_rate("auto") == "auto" and parse_learning_rate("3e-4") == 3e-4
    for bad in ("nan", "inf", "-1", "0", "fast"):
        with pytest.raises(SalfError, match="--lr"):
            parse_learning_rate(bad)


def test_nan_learning_rate_is_a_clear_error_not_a_traceback(setup, tmp_path, capsys):
    work, bert, labels = setup
    assert cli("train", "--model", bert, "--data", labels, "--out", tmp_path / "r", "--lr", "nan") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--lr" in err


def test_recipe_fills_what_the_user_left_out(setup, tmp_path):
    work, bert, labels = setup
    assert cli("train", "--model", bert, "--data", labels, "--out", tmp_path / "r", "--no-progress",
               "--max-steps", "2") == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    recipe = RECIPES["classifier"]
    assert metrics["recipe"]["kind"] == "classifier" and metrics["recipe"]["flags_given"] == {}
    cfg = metrics["config"]
    assert metrics["recipe"]["model_width"] == 32  # the tiny BERT's hidden size scales the body's rate
    assert (cfg["learning_rate"], cfg["head_learning_rate"], cfg["batch_size"], cfg["warmup_ratio"]) == (
        recipe.learning_rate_for(32), recipe.head_learning_rate, recipe.batch_size, recipe.warmup_ratio)
    assert default_recipe("lm", lora=True) is RECIPES["lora"] and default_recipe("lm", False) is RECIPES["lm"]


def test_recipe_rate_scales_as_one_over_width_and_a_flag_wins():
    lm, classifier = RECIPES["lm"], RECIPES["classifier"]
    assert lm.learning_rate_for(lm.reference_width) == lm.learning_rate == lm.learning_rate_for(None)
    assert lm.learning_rate_for(4096) == pytest.approx(lm.learning_rate * lm.reference_width / 4096)
    assert classifier.learning_rate_for(768) == pytest.approx(5e-5)  # BERT-base, from MiniLM's 384
    assert resolve_recipe(TrainConfig(), "lm", width=512)[0].learning_rate == pytest.approx(lm.learning_rate / 2)
    assert resolve_recipe(TrainConfig(learning_rate=1e-3), "lm", width=512)[0].learning_rate == 1e-3
    assert resolve_recipe(TrainConfig(), "classification", width=768)[0].head_learning_rate == classifier.head_learning_rate


def test_run_length_defaults_to_the_recipes_epochs_and_a_flag_wins():
    cfg, _ = resolve_recipe(TrainConfig(), "classification")
    assert cfg.epochs == RECIPES["classifier"].epochs == 3.0 and cfg.max_steps is None
    assert resolve_recipe(TrainConfig(), "lm")[0].epochs == RECIPES["lm"].epochs
    assert resolve_recipe(TrainConfig(epochs=0.5), "classification")[0].epochs == 0.5
    with pytest.raises(SalfError, match="epochs"):
        resolve_recipe(TrainConfig(epochs=0), "classification")


def test_lr_auto_searches_and_records_its_cost(setup, tmp_path, capsys):
    work, bert, labels = setup
    capsys.readouterr()
    assert cli("train", "--model", bert, "--data", labels, "--out", tmp_path / "r", "--no-progress",
               "--max-steps", "60", "--batch-size", "4", "--lr", "auto", "--lr-search-budget", "1.0") == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    search = metrics["lr_search"]
    assert metrics["config"]["learning_rate"] == search["learning_rate"]
    assert search["learning_rate"] in {c["learning_rate"] for c in search["candidates"]}
    assert 0 < search["step_share"] <= 1.0 and search["seconds_share_of_run"] > 0
    assert "lr (searched)" in capsys.readouterr().out


def test_match_compute_trains_a_plan_for_the_full_runs_flops(setup, tmp_path):
    work, bert, labels = setup
    common = ["--data", labels, "--no-progress", "--batch-size", "4", "--lr", "1e-3"]
    assert cli("train", "--model", bert, "--out", tmp_path / "full", "--max-steps", "4", *common) == 0
    plan = tmp_path / "plan.json"
    assert cli("plan", "--model", bert, "--data", labels, "--out", plan, "--policy", "train-last-quarter",
               "--no-progress", "--sample-size", "16", "--trace-batch-size", "8") == 0
    assert cli("train", "--model", bert, "--plan", plan, "--out", tmp_path / "matched",
               "--match-compute", tmp_path / "full", *common) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    matched = json.loads((tmp_path / "matched" / "metrics.json").read_text())
    assert matched["steps"] > full["steps"]
    assert matched["train_flops"] <= full["train_flops"]
    assert matched["compute_budget"]["budget_flops"] == full["train_flops"]
    assert cli("train", "--model", bert, "--out", tmp_path / "x", "--max-steps", "3", "--max-flops", "1e9",
               *common) == 2  # two lengths for one run
