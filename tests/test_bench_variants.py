"""The benchmark's extra sweeps (salf.bench.sweeps): per-boundary searched learning rates and the untied
output head, run through the real suite machinery on tiny models."""

import dataclasses
import json

import pytest
import torch

import salf.training.run
from salf.bench.analysis import default_plan
from salf.bench.runner import run_bench
from salf.bench.suite import BenchSuite, BenchTask
from salf.config.plan import DEFAULT_ESTIMATOR, DEFAULT_POLICY
from salf.errors import SalfError
from salf.fileio import fingerprint
from salf.training.lrsearch import LRSearchConfig


def _suite(task: dict, name: str = "variants") -> BenchSuite:
    """One tiny task with one lens, estimator and policy (the defaults) and no baselines: only the sweeps."""
    base = {"corpus_limit": 120, "batch_size": 8, "lr": 0.001, "max_length": 32, "eval_limit": 16, "em_limit": 8,
            "trace_sample": 32, "seeds": [0]}
    return BenchSuite.from_dict({"name": name, "tasks": [{**base, **task}], "baselines": [], "per_datum": False,
                                 "estimators": sorted(set(DEFAULT_ESTIMATOR.values())),
                                 "policies": sorted(set(DEFAULT_POLICY.values())), "threads": 1})


def _runs(out) -> dict[str, dict]:
    return {r["key"]: r for r in json.loads((out / "runs.json").read_text())["runs"]}


def test_task_options_validate_and_keep_the_recipe():
    task = BenchTask(name="t", model="tiny:gpt2", corpus="docstring-function")
    assert task.lr_search is None and task.head_modes == ["tied"]
    searched = dataclasses.replace(task, lr_search={"budget": 0.2, "factors": [1, 3]}, head_modes=["tied", "untie"])
    assert searched.lr_search == LRSearchConfig(budget=0.2, factors=(1.0, 3.0))
    assert searched.recipe_fingerprint() == task.recipe_fingerprint()  # extras never invalidate finished runs
    assert dataclasses.replace(task, lr_search=True).lr_search == LRSearchConfig()
    with pytest.raises(SalfError, match="budgett"):
        dataclasses.replace(task, lr_search={"budgett": 0.2})
    with pytest.raises(SalfError, match="budget"):
        dataclasses.replace(task, lr_search={"budget": 2.0})
    for bad in (["untie"], ["tied", "tied"], ["tied", "loose"], []):
        with pytest.raises(SalfError, match="head_modes"):
            dataclasses.replace(task, head_modes=bad)
    for suite in ("causal-quick", "minilm-lr"):
        BenchSuite.load(suite)


def test_searched_rate_sweep_records_a_rate_per_boundary_and_reports_it(tmp_path, monkeypatch):
    # 8 steps, the whole run's steps as budget: two candidates of 3 steps each (validation counted)
    suite = _suite({"name": "tiny-bert-lr", "model": "tiny:bert", "corpus": "docstring-module", "steps": 8,
                    "head_lr": 0.005, "lr_search": {"budget": 1.0, "factors": [1, 10], "val_min": 8}})
    out = tmp_path / "bench"
    result = run_bench(suite, out, show_progress=False)
    runs = _runs(out)
    for k in range(5):  # the tiny models have 4 blocks
        r = runs[f"tiny-bert-lr|seed=0|oracle-searched/k={k}"]
        assert r["status"] == "done", r.get("error")
        assert r["kind"] == "oracle-searched" and r["boundary"] == k and "+lr-search=" in r["recipe"]
        assert r["learning_rate"] in (pytest.approx(0.001), pytest.approx(0.01))
        assert r["learning_rate"] == pytest.approx(0.001 * r["lr_factor"])
        # the fresh head keeps its rate; only the head-only boundary (k = 4) searches the head's
        assert r["head_learning_rate"] == pytest.approx(0.005 * (r["lr_factor"] if k == 4 else 1))
        assert len(r["lr_search"]["candidates"]) == 2 and r["search_steps"] == 6
        assert r["search_flops"] > 0 and r["search_seconds"] > 0 and r["search_step_share"] <= 1.0
        assert r["metrics"]["steps"] == 8
        assert r["spec"] == runs[f"tiny-bert-lr|seed=0|oracle/k={k}"]["spec"]
    task = result.analysis["tiny-bert-lr"]
    # the regret tables stay on the shared-rate sweep: no searched run among the scored variants
    assert not any(v.startswith("oracle-searched") for v in task["variants"])
    rows = task["sweeps"]["lr-search"]["per_k"]
    assert [row["k"] for row in rows] == list(range(5)) and all(len(row["learning_rate"]) == 1 for row in rows)
    assert rows[0]["shared"]["quality"]["mean"] == task["oracle"][0]["quality"]["mean"]
    results = (out / "results.md").read_text()
    assert "shared rate vs at each boundary's searched rate" in results and "chosen lr per seed" in results

    # resumed: nothing trains again; the searched runs carry the search settings in their recipe, so another
    # setting reruns only them (the shared-rate sweep keeps the task's recipe)
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(salf.training.run, "train", no_training)
    assert run_bench(suite, out, show_progress=False).trained == 0
    recipe = f"{suite.tasks[0].recipe_fingerprint()}+lr-search={fingerprint(dataclasses.asdict(suite.tasks[0].lr_search))}"
    assert runs["tiny-bert-lr|seed=0|oracle-searched/k=0"]["recipe"] == recipe
    assert runs["tiny-bert-lr|seed=0|oracle/k=0"]["recipe"] == suite.tasks[0].recipe_fingerprint()


def test_untied_head_sweep_keeps_the_embeddings_frozen_and_records_its_predicted_cost(tmp_path):
    suite = _suite({"name": "tiny-gpt2-untie", "model": "tiny:gpt2", "corpus": "docstring-function", "steps": 4,
                    "max_length": 48, "head_modes": ["tied", "untie"]})
    suite = dataclasses.replace(suite, keep_models=True)
    out = tmp_path / "bench"
    result = run_bench(suite, out, show_progress=False)
    runs = _runs(out)
    assert "tiny-gpt2-untie|seed=0|oracle-untied/k=0" not in runs  # k = 0 is the tied run
    meta = runs["tiny-gpt2-untie|meta"]
    for k in range(1, 5):
        r = runs[f"tiny-gpt2-untie|seed=0|oracle-untied/k={k}"]
        assert r["status"] == "done", r.get("error")
        assert r["spec"]["untie_head"] is True and r["spec"]["embeddings"] is False
        predicted = r["details"]["predicted_step_flops_ratio"]
        assert predicted > meta["predicted_step_flops_ratio"][k]  # the untied head trains: dearer than tied
        assert r["details"]["tied_predicted_step_flops_ratio"] == pytest.approx(meta["predicted_step_flops_ratio"][k])
        assert r["metrics"]["train_flops"] > runs[f"tiny-gpt2-untie|seed=0|oracle/k={k}"]["metrics"]["train_flops"]

    # the saved run: the head trained, the input embeddings are the pretrained ones, bit for bit
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(meta["model_path"])
    tuned = AutoModelForCausalLM.from_pretrained(out / "runs" / "tiny-gpt2-untie" / "seed0" / "oracle-untied_k2" / "model")
    assert not tuned.config.tie_word_embeddings
    assert torch.equal(tuned.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(tuned.get_output_embeddings().weight, base.get_output_embeddings().weight)

    default = default_plan("completion")  # the untied sweep re-plans the default cell
    plan = runs[f"tiny-gpt2-untie|seed=0|salf-untied/{default.split('/', 1)[1]}"]
    assert plan["tied_variant"] == default and plan["head"] == "untie"
    assert plan["details"]["predicted_step_flops_ratio"] > 0
    sweep = result.analysis["tiny-gpt2-untie"]["sweeps"]["untied-head"]
    assert [row["k"] for row in sweep["per_k"]] == list(range(5))
    assert sweep["per_k"][0]["untied"]["quality"] == sweep["per_k"][0]["tied"]["quality"]
    assert f"salf-untied/{default.split('/', 1)[1]}" in sweep["plans"]
    results = (out / "results.md").read_text()
    assert "Tied vs untied output head" in results and "predicted FLOPs untied" in results
    assert not any(v.startswith("salf-untied") for v in result.analysis["tiny-gpt2-untie"]["variants"])


def test_untie_on_a_model_without_a_tied_head_is_refused(tmp_path):
    suite = _suite({"name": "tiny-llama-untie", "model": "tiny:llama", "corpus": "docstring-function", "steps": 2,
                    "head_modes": ["tied", "untie"]})
    with pytest.raises(SalfError, match="not tied to its input embeddings") as err:
        run_bench(suite, tmp_path / "bench", show_progress=False)
    assert "head_modes" in err.value.fix
    runs = tmp_path / "bench" / "runs.json"
    assert not runs.is_file() or not any(r.get("kind") == "oracle" for r in json.loads(runs.read_text())["runs"])


def test_a_search_budget_too_small_for_its_grid_is_refused_before_training(tmp_path):
    suite = _suite({"name": "tiny-bert-lr", "model": "tiny:bert", "corpus": "docstring-module", "steps": 8,
                    "lr_search": {"budget": 0.15}})
    with pytest.raises(SalfError, match="lr_search: the learning-rate search budget") as err:
        run_bench(suite, tmp_path / "bench", show_progress=False)
    assert "budget" in err.value.fix
