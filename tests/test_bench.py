import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

import salf.training.run
from salf.bench.analysis import ALL_MODELS, analyze, combined_regret, default_plan, regret_by_model
from salf.bench.baselines import BASELINES, BaselineContext
from salf.bench.baselines_gradient import gradient_norm_boundary
from salf.bench.baselines_representation import (
    cka_change,
    cka_change_boundary,
    cosine_change,
    cosine_change_boundary,
    linear_cka,
    variability_boundary,
    variability_ratio,
)
from salf.bench.baselines_variants import LisaCallback
from salf.bench.measured import exact_match, per_datum_flops
from salf.bench.records import MetaRecord, PlanRecord, Record, TrainedRun, record_from_dict
from salf.bench.report import bench_table
from salf.bench.runner import run_bench
from salf.bench.scoring import pareto_frontier, quality_points, regret, share_kept, tradeoff_regret
from salf.bench.store import RunStore
from salf.bench.suite import BenchSuite, BenchTask, parse_seeds
from salf.errors import SalfError
from salf.method.freeze import FreezeSpec
from salf.models.loading import tiny_tokenizer
from salf.models.tiny import tiny_model
from salf.training.config import TrainConfig
from salf.training.inputs import RunExtras, TrainingData
from salf.training.run import train

# ---------------------------------------------------------------------------------------------- analysis


def test_frontier_on_synthetic_points():
    costs = [1.0, 0.8, 0.6, 0.4, 0.7, 0.9]
    quality = [0.90, 0.92, 0.85, 0.60, 0.80, 0.92]
    # 0.4 (0.60) -> 0.6 (0.85) -> 0.8 (0.92); 0.7 is beaten by 0.6, 0.9 and 1.0 by 0.8
    assert pareto_frontier(costs, quality) == [3, 2, 1]
    loss = [1.0, 0.9, 1.1, 1.5, 1.2, 0.9]
    assert pareto_frontier(costs, loss, higher_is_better=False) == [3, 2, 1]
    assert pareto_frontier([0.5, 0.5, 0.2], [0.7, 0.7, float("nan")]) == [0]


def test_regret_is_zero_on_the_frontier_and_positive_off_it():
    costs = [1.0, 0.8, 0.6, 0.4]
    quality = [0.90, 0.92, 0.85, 0.60]
    for k in (1, 2, 3):  # on the frontier
        assert regret(costs[k], quality[k], costs, quality) == 0.0
    assert regret(costs[0], quality[0], costs, quality) == pytest.approx(0.02)  # k=1 is cheaper and better
    loss = [1.0, 0.9, 1.1, 1.5]
    assert regret(costs[1], loss[1], costs, loss, higher_is_better=False) == 0.0
    assert regret(costs[0], loss[0], costs, loss, higher_is_better=False) == pytest.approx(0.1)  # sign: worse > 0
    assert regret(0.3, 0.5, costs, quality) is None  # cheaper than every boundary: nothing to compare
    assert regret(0.85, 0.95, costs, quality) == pytest.approx(-0.03)  # an own run can beat the frontier


def test_tradeoff_regret_charges_the_cheap_boundary_for_the_quality_it_gives_up():
    costs = [1.0, 0.6, 0.3]  # fractions of full fine-tuning's FLOPs; k = 2 is the head only
    accuracy = [0.80, 0.79, 0.60]
    assert regret(costs[2], accuracy[2], costs, accuracy) == 0.0  # the old measure: nothing is cheaper
    points = [quality_points(a, True) for a in accuracy]
    assert points == pytest.approx([80.0, 79.0, 60.0])
    # lambda = 2: utilities 78, 77.8, 59.4; lambda = 10: 70, 73, 57
    assert tradeoff_regret(costs[2], points[2], costs, points, 2.0) == pytest.approx(18.6)
    assert tradeoff_regret(costs[2], points[2], costs, points, 10.0) == pytest.approx(16.0)
    assert tradeoff_regret(costs[0], points[0], costs, points, 2.0) == pytest.approx(0.0)
    assert tradeoff_regret(costs[1], points[1], costs, points, 10.0) == pytest.approx(0.0)
    assert tradeoff_regret(costs[0], points[0], costs, points, 10.0) == pytest.approx(3.0)
    assert tradeoff_regret(0.5, 85.0, costs, points, 10.0) == pytest.approx(-7.0)  # an own run beating every k
    assert tradeoff_regret(None, 80.0, costs, points, 2.0) is None
    assert tradeoff_regret(0.5, 80.0, [None, 1.0], [80.0, None], 2.0) is None
    assert share_kept(accuracy[2], accuracy) == pytest.approx(0.75)
    assert share_kept(0.0, [0.0, None]) is None  # no positive best: nothing to keep a share of
    assert quality_points(0.25, higher_is_better=False) == pytest.approx(-25.0)  # a loss: lower is better
    # on a loss, the lower loss wins: k=1 (loss 0.2 at cost 0.6) beats k=0 (loss 0.21 at cost 1) at lambda 2
    loss_points = [quality_points(v, False) for v in (0.21, 0.20, 0.50)]
    assert tradeoff_regret(costs[0], loss_points[0], costs, loss_points, 2.0) == pytest.approx(1.0 + 0.8)


def _record(task, seed, variant, kind, boundary=None, metrics=None, **extra):
    return record_from_dict({"key": RunStore.key(task, seed, variant), "task": task, "seed": seed, "variant": variant,
                             "kind": kind, "boundary": boundary, "status": "done", "metrics": metrics, **extra})


def test_analysis_scores_plans_with_the_oracle_run_at_their_boundary():
    accuracy = {0: [0.8, 0.7], 1: [0.9, 0.8], 2: [0.5, 0.6]}
    records = [_record("t", None, "meta", "meta", num_layers=2, data_task="classification",
                       predicted_step_flops_ratio=[1.0, 0.7, 0.4], predicted_memory_ratio=[1.0, 0.6, 0.2])]
    for seed in (0, 1):
        for k in range(3):
            records.append(_record("t", seed, f"oracle/k={k}", "oracle", k, {
                "eval_accuracy": accuracy[k][seed], "eval_loss": 1.0 - accuracy[k][seed],
                "train_flops": 100.0 * (1 - 0.3 * k), "step_seconds_median": 1.0 - 0.2 * k, "train_seconds": 10.0}))
        records.append(_record("t", seed, "salf/probe/observed/knee", "plan", boundary=0, profiling_seconds=1.0))
        records.append(_record("t", seed, "baseline/lora", "baseline", metrics={
            "eval_accuracy": 0.95, "eval_loss": 0.1, "train_flops": 80.0, "step_seconds_median": 0.9}))
    task = analyze(records)["t"]
    plan = task["variants"]["salf/probe/observed/knee"]
    assert plan["reuses_oracle"] and plan["boundaries"] == [0, 0]
    assert plan["quality"]["mean"] == pytest.approx(0.75)  # the k=0 oracle runs
    assert plan["regret"]["mean"] == pytest.approx(0.1)  # k=1 is cheaper and 0.1 better in both seeds
    assert plan["regret_loss"]["mean"] == pytest.approx(0.1)
    assert plan["quality"]["std"] == pytest.approx(np.std([0.8, 0.7], ddof=1))
    assert plan["profiling_fraction"]["mean"] == pytest.approx(0.1)
    lora = task["variants"]["baseline/lora"]
    assert not lora["reuses_oracle"] and lora["flops_ratio"]["mean"] == pytest.approx(0.8)
    # affordable at 80 FLOPs: k=1 (70) and k=2 (40); the best of them is k=1 in both seeds
    assert lora["regret"]["mean"] == pytest.approx(np.mean([0.9 - 0.95, 0.8 - 0.95]))
    assert [row["on_frontier"] for row in task["oracle"]] == [False, True, True]
    assert task["plan_regret"]["probe/observed"]["knee"]["regret"]["mean"] == pytest.approx(0.1)


def _sweep(task, model="m", accuracy=None, seeds=(0, 1), data_task="classification", **meta):
    """A finished synthetic sweep of a 2-block model: meta and oracle records (FLOPs 100, 70, 40)."""
    accuracy = accuracy or {0: [0.8, 0.7], 1: [0.9, 0.8], 2: [0.5, 0.6]}
    records = [_record(task, None, "meta", "meta", num_layers=2, data_task=data_task, model=model,
                       predicted_step_flops_ratio=[1.0, 0.7, 0.4], predicted_memory_ratio=[1.0, 0.6, 0.2], **meta)]
    q_name = "eval_accuracy" if data_task == "classification" else "exact_match"
    for i, seed in enumerate(seeds):
        for k in range(3):
            records.append(_record(task, seed, f"oracle/k={k}", "oracle", k, {
                q_name: accuracy[k][i], "eval_loss": 1.0 - accuracy[k][i], "train_flops": 100.0 * (1 - 0.3 * k),
                "step_seconds_median": 1.0, "train_seconds": 10.0}))
    return records


def test_analysis_reports_tradeoff_regret_and_share_kept_per_seed():
    records = _sweep("t")
    for seed in (0, 1):
        records.append(_record("t", seed, "salf/probe/headroom/budget=0.4", "plan", boundary=2))
    v = analyze(records)["t"]["variants"]["salf/probe/headroom/budget=0.4"]
    assert v["regret"]["mean"] == 0.0  # the head-only boundary: cheapest, so the old regret is 0
    # lambda = 2, utilities (points - 2 x cost): seed 0: 78, 88.6, 49.2; seed 1: 68, 78.6, 59.2
    assert [s["regret_2"] for s in v["per_seed"]] == pytest.approx([39.4, 19.4])
    assert v["regret_2"]["mean"] == pytest.approx(29.4)
    assert v["regret_2"]["std"] == pytest.approx(np.std([39.4, 19.4], ddof=1))
    # lambda = 10: seed 0: 70, 83, 46; seed 1: 60, 73, 56
    assert v["regret_10"]["mean"] == pytest.approx(np.mean([37.0, 17.0]))
    assert v["share_kept"]["mean"] == pytest.approx(np.mean([0.5 / 0.9, 0.6 / 0.8]))
    assert [s["boundary"] for s in v["per_seed"]] == [2, 2]
    task = analyze(records)["t"]
    assert [row["regret_2"]["mean"] for row in task["oracle"]] == pytest.approx([10.6, 0.0, 29.4])
    assert task["plan_regret"]["probe/headroom"]["budget=0.4"]["regret_10"]["mean"] == pytest.approx(27.0)


def test_regret_by_model_pools_tasks_and_seeds_and_marks_the_default_plan():
    default = default_plan("classification")
    assert default == "salf/probe/sufficiency-uniform/unsolved=0.75"
    assert default_plan("completion") == "salf/logit-lens/sufficiency-uniform/unsolved"
    assert default_plan("completion-closed") == "salf/basis-cosine/observed/coverage=0.9"
    assert default_plan("lm") == "salf/logit-lens/sufficiency-uniform/unsolved"
    first = _sweep("a")
    second = _sweep("b", accuracy={0: [0.8], 1: [0.8], 2: [0.79]}, seeds=(0,))
    other = _sweep("c", model="other")
    for records, task, seeds in ((first, "a", (0, 1)), (second, "b", (0,)), (other, "c", (0, 1))):
        for seed in seeds:
            records.append(_record(task, seed, default, "plan", boundary=1))
            records.append(_record(task, seed, "baseline/train-last-quarter", "baseline", boundary=2))
            records.append(_record(task, seed, "ceiling/full", "ceiling", metrics={
                "eval_accuracy": 0.9, "train_flops": 300.0}))
    table = regret_by_model([analyze(first + other), analyze(second)])
    assert set(table) == {"m", "other", ALL_MODELS}
    m = table["m"]
    assert m["tasks"] == ["a", "b"] and m["sort_by"] == "regret_10"
    rows = {r["variant"]: r for r in m["rows"]}
    assert set(rows) == {default, "baseline/train-last-quarter"}  # the ceiling is no way of choosing
    plan, head = rows[default], rows["baseline/train-last-quarter"]
    assert plan["default"] and not head["default"]
    assert plan["n"] == head["n"] == 3 and plan["tasks"] == ["a", "b"]
    # head only, lambda = 10: 37 and 17 on task a (above); on task b: utilities 70, 73, 75 -> 0
    assert head["regret_10"]["mean"] == pytest.approx(np.mean([37.0, 17.0, 0.0]))
    assert head["regret_points"]["mean"] == pytest.approx(0.0)
    # k = 1 on task a is the best trade-off (0), on task b 75 - 73 = 2 while on the frontier (plain regret 0)
    assert plan["regret_10"]["mean"] == pytest.approx(2.0 / 3)
    assert plan["regret_points"]["mean"] == pytest.approx(0.0)
    assert plan["flops_ratio"]["mean"] == pytest.approx(0.7)
    assert [r["variant"] for r in m["rows"]] == [default, "baseline/train-last-quarter"]  # sorted by regret_10


def test_a_completion_task_is_scored_by_its_meta_records_default_cell():
    from salf.bench.analysis import DEFAULT_ROW

    closed = _sweep("closed", data_task="completion", default_cell="completion-closed")
    older = _sweep("older", data_task="completion")  # a record from before the split: its task's row
    for records, name in ((closed, "closed"), (older, "older")):
        for seed in (0, 1):
            records.append(_record(name, seed, default_plan("completion-closed"), "plan", boundary=1))
            records.append(_record(name, seed, default_plan("completion"), "plan", boundary=0))
    analysis = analyze(closed + older)
    assert analysis["closed"]["default_cell"] == "completion-closed" and analysis["older"]["default_cell"] == "completion"
    pooled = {r["variant"]: r for r in regret_by_model([analysis])["m"]["rows"]}[DEFAULT_ROW]
    assert pooled["tasks"] == ["closed", "older"]
    assert pooled["flops_ratio"]["mean"] == pytest.approx(np.mean([0.7, 0.7, 1.0, 1.0]))  # k = 1 and k = 0


def test_tasks_with_different_default_cells_pool_each_tasks_own_default_in_one_row():
    from salf.bench.analysis import DEFAULT_ROW

    # a causal LM with a classifier head on one task and plain text on another: two default cells
    completion, text = _sweep("c", data_task="classification"), _sweep("t", data_task="lm")
    for seed in (0, 1):
        completion.append(_record("c", seed, default_plan("classification"), "plan", boundary=1))
        completion.append(_record("c", seed, default_plan("lm"), "plan", boundary=2))
        text.append(_record("t", seed, default_plan("lm"), "plan", boundary=0))
    rows = {r["variant"]: r for r in regret_by_model([analyze(completion + text)])["m"]["rows"]}
    pooled = rows[DEFAULT_ROW]
    assert pooled["default"] and not any(r["default"] for v, r in rows.items() if v != DEFAULT_ROW)
    assert pooled["tasks"] == ["c", "t"] and pooled["n"] == 4  # each task's own default cell, every seed
    assert pooled["flops_ratio"]["mean"] == pytest.approx(np.mean([0.7, 0.7, 1.0, 1.0]))
    assert rows[default_plan("lm")]["n"] == 4  # the lm cell planned on both tasks: its row keeps both


def test_combined_regret_and_bench_table_read_several_result_dirs(tmp_path, capsys):
    from salf.cli import main

    for name, records in (("one", _sweep("a")), ("two", _sweep("b", model="other"))):
        for seed in (0, 1):
            records.append(_record(records[0].task, seed, "baseline/full", "baseline", boundary=0))
            records.append(_record(records[0].task, seed, default_plan("classification"), "plan", boundary=seed))
        (tmp_path / name).mkdir()
        (tmp_path / name / "runs.json").write_text(json.dumps({"format": 1, "suite": "x",
                                                                         "runs": [r.to_dict() for r in records]}))
    dirs = [str(tmp_path / "one"), str(tmp_path / "two")]
    table = combined_regret(dirs)
    assert set(table) == {"m", "other", ALL_MODELS}
    result = bench_table(dirs, out=str(tmp_path / "table.md"))
    text = (tmp_path / "table.md").read_text()
    assert "Regret by model" in text and "baseline/full" in text and "`other`" in text
    # the oracle sweeps, one table per model: accuracy mean ± std in %, the best boundary bold, the default's k
    assert "| FLOPs x full |  | 1.00 | 0.70 | 0.40 |  |" in text
    assert "| a | 0,1 | 75.0 ± 7.1 | **85.0 ± 7.1** | 55.0 ± 7.1 | 0,1 |" in text
    assert "baseline/full" in result.render() and result.to_json()["regret_by_model"] == table
    with pytest.raises(SalfError, match="runs.json"):
        combined_regret([str(tmp_path / "missing")])
    capsys.readouterr()
    assert main(["bench-table", *dirs, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["regret_by_model"] == json.loads(json.dumps(table))
    # one kind of data only: both tasks are classification, so the filter keeps them or leaves nothing
    kept = bench_table(dirs, data_kind="classification")
    assert kept.table == table and "2 task(s) of classification data" in kept.render()
    with pytest.raises(SalfError, match="on lm data"):
        bench_table(dirs, data_kind="lm")
    assert main(["bench-table", *dirs, "--data-kind", "completion-closed"]) == 2
    assert "no finished plan or baseline" in capsys.readouterr().err


def test_per_datum_flops_weigh_each_boundary_by_its_own_cost():
    oracle = {k: record_from_dict({"key": f"t|seed=0|oracle/k={k}", "kind": "oracle", "status": "done",
                                   "metrics": {"flops_per_padded_token": 10.0 - 3 * k}}) for k in range(3)}
    oracle[2] = record_from_dict({"key": "t|seed=0|oracle/k=2", "kind": "oracle", "status": "failed", "metrics": {}})  # no measurement at k=2: the cost model's ratio of k=0's
    metrics = {"train_flops": 7.0 * 60, "train_flops_method": "first step", "flops_per_padded_token": 7.0,
               "padded_tokens": 60, "per_datum": {"padded_tokens_per_boundary": {"1": 20, "2": 40}, "first_boundary": 1}}
    out = per_datum_flops(metrics, oracle, [1.0, 0.7, 0.25])
    assert out["train_flops"] == pytest.approx(7.0 * 20 + 2.5 * 40)
    assert out["flops_by_boundary"]["1"]["source"] == "oracle/k=1"
    assert out["flops_by_boundary"]["2"]["source"].startswith("predicted ratio")
    assert out["train_flops_first_step"] == 7.0 * 60 and out["padded_tokens_agree"]
    assert out["first_step_check"] == {"boundary": 1, "this_run": 7.0, "oracle": 7.0}
    assert "sum over boundaries" in out["train_flops_method"]


def test_per_datum_run_is_compared_with_its_single_boundary_plan():
    records = [_record("t", None, "meta", "meta", num_layers=2, data_task="classification",
                       predicted_step_flops_ratio=[1.0, 0.7, 0.4], predicted_memory_ratio=[1.0, 0.6, 0.2])]
    for k, acc in enumerate([0.8, 0.9, 0.5]):
        records.append(_record("t", 0, f"oracle/k={k}", "oracle", k, {
            "eval_accuracy": acc, "eval_loss": 1 - acc, "train_flops": 100.0 * (1 - 0.3 * k),
            "step_seconds_median": 1.0 - 0.2 * k}))
    records.append(_record("t", 0, "salf-per-datum/probe/headroom/knee", "per-datum", None, {
        "eval_accuracy": 0.85, "eval_loss": 0.15, "train_flops": 55.0, "step_seconds_median": 0.7},
        global_boundary=2, mean_boundary=1.5, boundary_histogram={"1": 5, "2": 5}, lens="probe",
        estimator="headroom", policy="knee"))
    task = analyze(records)["t"]
    v = task["variants"]["salf-per-datum/probe/headroom/knee"]
    assert not v["reuses_oracle"] and v["boundaries"] == [1.5] and v["flops_ratio"]["mean"] == pytest.approx(0.55)
    e = task["per_datum"]["salf-per-datum/probe/headroom/knee"]
    assert e["single_variant"] == "salf/probe/headroom/knee"
    assert e["single"]["quality"]["mean"] == pytest.approx(0.5)  # the oracle run at the global boundary 2
    assert e["per_datum"]["quality"]["mean"] == pytest.approx(0.85)
    assert e["quality_gain"]["mean"] == pytest.approx(0.35)
    assert e["per_datum"]["step_time_ratio"]["mean"] == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------- baselines


def test_depth_policy_baselines():
    ctx = BaselineContext(load=lambda: None, data=None, num_layers=8, cost=np.linspace(1, 0.3, 9), seed=3,
                          batch_size=4, learning_rate=1e-4)
    assert BASELINES.get("full").decide(ctx).boundary == 0
    assert BASELINES.get("freeze-first-half").decide(ctx).boundary == 4
    assert BASELINES.get("train-last-quarter").decide(ctx).boundary == 6
    assert BASELINES.get("train-last-2").decide(ctx).boundary == 6  # LLaMA-Factory's freeze default
    assert 1 <= BASELINES.get("random").decide(ctx).boundary <= 7
    assert BASELINES.get("lora").trains and BASELINES.get("lisa").trains
    assert not BASELINES.get("gradient-norm").trains and not BASELINES.get("variability").trains
    assert "cosine-change" in BASELINES.names() and not BASELINES.get("cosine-change").trains


def test_gradient_norm_boundary_freezes_the_low_gradient_prefix():
    assert gradient_norm_boundary([0.01, 0.02, 0.5, 0.47], 0.1) == 2
    assert gradient_norm_boundary([1, 1, 1, 1], 0.1) == 0
    assert gradient_norm_boundary([0, 0, 0], 0.1) == 0


def test_variability_ratio_and_boundary():
    rng = np.random.default_rng(0)
    classes = np.repeat([0, 1, 2], 20)
    centers = np.eye(3)[classes] * 10.0
    noise = rng.normal(size=(60, 3))
    # latent 0: pure noise (no class structure); latent 1: clear clusters
    features = np.stack([noise, centers + 0.1 * noise], axis=1)
    ratio = variability_ratio(features, classes)
    assert ratio[0] > 10 and ratio[1] < 0.01
    assert variability_boundary([10, 5, 1, 0.9, 0.95], 0.1) == 2
    assert variability_boundary([1, 1, 1], 0.1) == 0
    with pytest.raises(SalfError):
        variability_ratio(features[:5], [0] * 5)


def test_cosine_change_and_its_boundary():
    # one datum, three latent spaces: block 0 keeps the direction, block 1 turns it by 90 degrees
    features = np.array([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])
    assert cosine_change(features) == pytest.approx([0.0, 1.0])
    # L = 8: the top ceil(8/4) = 2 blocks are 4 (0.6) and 1 (0.5); the lowest of them is the boundary
    assert cosine_change_boundary([0.1, 0.5, 0.2, 0.05, 0.6, 0.1, 0.3, 0.2]) == 1
    assert cosine_change_boundary([0.2, 0.9, 0.1]) == 1  # L = 3: n = 1
    assert cosine_change_boundary([0.9, 0.1, 0.1, 0.1, 0.8]) == 0  # L = 5: n = 2
    assert cosine_change_boundary([0.5, 0.5, 0.1, 0.1]) == 1  # a tie goes to the deeper (cheaper) block
    assert cosine_change_boundary([0.3]) == 0


def test_cosine_change_baseline_reads_the_pooled_token_of_a_tiny_model():
    from types import SimpleNamespace

    model = tiny_model("bert", "classification", num_labels=2)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 120, (10,), generator=g).tolist(), "labels": i % 2} for i in range(12)]
    ctx = BaselineContext(load=lambda: SimpleNamespace(model=model, pad_token_id=0), data=SimpleNamespace(data=data),
                          num_layers=4, cost=np.linspace(1, 0.3, 5), seed=0, batch_size=4, learning_rate=1e-4)
    baseline = BASELINES.get("cosine-change")
    assert not baseline.trains
    choice = baseline.decide(ctx)
    importance = choice.details["block_cosine_change"]
    assert choice.details["n_data"] == 12 and choice.details["top_n"] == 1
    assert choice.boundary == cosine_change_boundary(importance) == int(np.argmax(importance))
    with torch.no_grad():  # the same from the model's own hidden states at the [CLS] token (all data unpadded)
        hidden = model.bert(input_ids=torch.tensor([d["input_ids"] for d in data]), output_hidden_states=True)
    pooled = torch.stack([h[:, 0] for h in hidden.hidden_states], dim=1).numpy()
    assert importance == pytest.approx(cosine_change(pooled).tolist(), abs=1e-5)


def test_linear_cka_is_rotation_and_scale_invariant_and_its_change_point():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0)
    assert linear_cka(x, rng.normal(size=(40, 6))) < 0.5
    assert math.isnan(linear_cka(x, np.ones((40, 6))))  # the same vector for every datum: no geometry
    # latent 0 -> 1 keeps the geometry (change 0), 1 -> 2 replaces it
    features = np.stack([x, 2 * x, rng.normal(size=(40, 6))], axis=1)
    change = cka_change(features)
    assert change[0] == pytest.approx(0.0, abs=1e-9) and change[1] > 0.5
    # the deepest block whose change is at least half the largest
    assert cka_change_boundary([0.1, 0.8, 0.2, 0.45, 0.1]) == 3
    assert cka_change_boundary([0.8, 0.1, 0.1]) == 0
    assert cka_change_boundary([0.0, 0.0]) == 0
    assert cka_change_boundary([float("nan"), 0.3, 0.6, 0.2]) == 2  # NaN: never a change point, not the largest
    assert "cka-change" in BASELINES.names() and not BASELINES.get("cka-change").trains


def _tiny_causal(tmp_path):
    texts = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot", "a cat is on a mat"] * 4
    tok = tiny_tokenizer(texts)
    data = []
    for t in texts:
        ids = tok(t)["input_ids"]
        data.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return tiny_model("gpt2"), tok, data


def test_lisa_trains_only_the_drawn_blocks(tmp_path):
    model, tok, data = _tiny_causal(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lisa = LisaCallback(n_active=1, interval=100, seed=0)
    config = TrainConfig(max_steps=3, batch_size=4, learning_rate=1e-2, save_steps=None, flop_sample_steps=0)
    train(model, tok, TrainingData(data, None, "completion"), FreezeSpec.full(4), config, tmp_path / "run", RunExtras(callbacks=[lisa]))
    (drawn,) = lisa.draws[0]["blocks"]
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if ".h." in n:
            assert changed == (int(n.split(".h.")[1].split(".")[0]) == drawn), n
    assert not torch.equal(before["transformer.wte.weight"], model.transformer.wte.weight)


def test_exact_match_batched_agrees_with_greedy_generation():
    model, tok, data = _tiny_causal(None)
    prompts = [d["input_ids"][:3] if i % 2 else d["input_ids"][:4] for i, d in enumerate(data[:6])]
    rows = []
    for p in prompts:  # the model's own greedy continuation, one prompt at a time (no padding)
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
        made = out[0, len(p):].tolist()
        rows.append({"input_ids": p + made, "labels": [-100] * len(p) + made})
    assert exact_match(model, tok, rows, batch_size=4)["exact_match"] == 1.0
    wrong = [{"input_ids": r["input_ids"][:-1] + [(r["input_ids"][-1] + 1) % 128], "labels": r["labels"]} for r in rows]
    wrong = [{**w, "labels": [-100] * (len(w["input_ids"]) - 3) + w["input_ids"][-3:]} for w in wrong]
    assert exact_match(model, tok, wrong, batch_size=4)["exact_match"] < 1.0


# ---------------------------------------------------------------------------------------------- suites


def test_suites_load_and_validate(tmp_path):
    smoke = BenchSuite.load("smoke")
    assert {t.model.split(":")[0] for t in smoke.tasks} == {"tiny"}
    full = BenchSuite.load("full")
    names = {t.name for t in full.tasks}
    assert names == {t.name for t in BenchSuite.load("minilm").tasks} | {t.name for t in BenchSuite.load("causal").tasks}
    assert BenchSuite.load("minilm").tasks[0].model == "minilm"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": [{"name": "x", "model": "tiny:gpt2", "corpus": "docstring-function",
                                          "stepz": 3}]}))
    with pytest.raises(SalfError, match="stepz"):
        BenchSuite.load(bad)
    with pytest.raises(SalfError):
        BenchSuite.load("no-such-suite")
    with pytest.raises(SalfError):
        BenchTask(name="x", model="m")  # no data
    assert parse_seeds("0-2") == [0, 1, 2] and parse_seeds("3,5") == [3, 5]
    assert BenchSuite.load("smollm2").target_flops == 0.70 and smoke.target_flops == 0.60
    with pytest.raises(SalfError, match="target_flops"):
        BenchSuite(name="x", tasks=list(smoke.tasks), target_flops=1.5)


def test_fresh_models_share_their_fresh_head_within_a_seed(tmp_path):
    from types import SimpleNamespace

    from salf.bench.taskbench import TaskBench
    from salf.bench.tasks import PreparedTask
    from salf.models.loading import minilm_path

    task = BenchTask(name="t", model="minilm", corpus="docstring-module")
    prepared = PreparedTask(task, tmp_path, tmp_path / "a", tmp_path / "b", "classification", minilm_path(), 6)
    bench = TaskBench(prepared, BenchSuite.load("smoke"), None, None)
    bench.__dict__["loaded"] = SimpleNamespace(data=SimpleNamespace(task="classification", label_names=["a", "b", "c"]))

    def head(seed):
        return bench.fresh_model(seed).model.classifier.weight.detach()

    first = head(0)
    assert torch.equal(first, head(0))  # every boundary of one seed starts from the same head
    assert not torch.equal(first, head(1))


def test_head_pooling_task_option_keeps_the_old_recipes(tmp_path):
    from types import SimpleNamespace

    from helpers import save_tiny

    from salf.bench.taskbench import TaskBench
    from salf.bench.tasks import PreparedTask
    from salf.fileio import fingerprint

    task = BenchTask(name="e5-x", model="builtin:e5-small", corpus="debian-section", steps=150, lr=1e-4,
                     head_lr=2e-3, seeds=[0, 1, 2])
    # the fingerprint this task had before head_pooling existed: finished runs are found by it
    assert task.recipe_fingerprint() == "3d5584261945b1ae"
    old = {k: v for k, v in dataclasses.asdict(task).items()
           if k not in ("head_pooling", "seeds", "ceiling_steps", "equal_compute", "lr_search", "head_modes",
                          "oracle_stride")}
    old["label_mode"] = "head"  # the classifier mode's spelling when these records were made
    assert task.recipe_fingerprint() == fingerprint(old)
    for suite in ("smoke", "minilm-quick"):
        for t in BenchSuite.load(suite).tasks:
            assert t.head_pooling is None
    mean = dataclasses.replace(task, head_pooling="mean")
    assert mean.recipe_fingerprint() != task.recipe_fingerprint()
    with pytest.raises(SalfError, match="head_pooling"):
        dataclasses.replace(task, head_pooling="max")

    folder = save_tiny(tmp_path, "bert", "classification")
    mean = BenchTask(name="t", model=str(folder), corpus="docstring-module", head_pooling="mean")
    prepared = PreparedTask(mean, tmp_path, tmp_path / "a", tmp_path / "b", "classification", str(folder), 4)
    bench = TaskBench(prepared, BenchSuite.load("smoke"), None, None)
    bench.__dict__["loaded"] = SimpleNamespace(data=SimpleNamespace(task="classification", label_names=["a", "b"]))
    fresh = bench.fresh_model(0)
    assert fresh.head_pooling == "mean" and fresh.model.config.salf_head_pooling == "mean"


def test_run_store_reuses_only_the_same_recipe(tmp_path):
    suite = BenchSuite.load("smoke")
    store = RunStore(tmp_path / "runs.json", suite, resume=True)
    store.add(Record(key="a|seed=0|oracle/k=0", recipe="r1"))
    again = RunStore(tmp_path / "runs.json", suite, resume=True)
    assert again.get("a|seed=0|oracle/k=0", "r1") is not None
    assert again.get("a|seed=0|oracle/k=0", "r2") is None
    assert RunStore(tmp_path / "runs.json", suite, resume=False).records == {}


def test_run_stores_sharing_a_file_keep_each_others_runs(tmp_path):
    suite = BenchSuite.load("smoke")
    path = tmp_path / "runs.json"
    first, second = RunStore(path, suite, resume=True), RunStore(path, suite, resume=True)
    first.add(Record(key="a|seed=0|oracle/k=0", recipe="r"))
    second.add(Record(key="b|seed=0|oracle/k=0", recipe="r"))
    first.add(Record(key="a|seed=0|oracle/k=1", recipe="r"))
    stored = {r["key"] for r in json.loads(path.read_text())["runs"]}
    assert stored == {"a|seed=0|oracle/k=0", "b|seed=0|oracle/k=0", "a|seed=0|oracle/k=1"}
    # a record removed from the file (e.g. a stale plan) is not brought back by a process that had read it
    data = json.loads(path.read_text())
    data["runs"] = [r for r in data["runs"] if r["key"] != "b|seed=0|oracle/k=0"]
    path.write_text(json.dumps(data))
    first.add(Record(key="a|seed=0|oracle/k=2", recipe="r"))
    assert "b|seed=0|oracle/k=0" not in {r["key"] for r in json.loads(path.read_text())["runs"]}
    # --no-resume starts over: what was on disk is dropped, not merged back at its first save
    fresh = RunStore(path, suite, resume=False)
    fresh.add(Record(key="c|seed=0|oracle/k=0", recipe="r"))
    assert [r["key"] for r in json.loads(path.read_text())["runs"]] == ["c|seed=0|oracle/k=0"]


def test_only_tasks_selects_by_name_and_names_the_choices():
    suite = BenchSuite.load("minilm-quick")
    names = [t.name for t in suite.tasks]
    assert [t.name for t in suite.only_tasks([names[1]]).tasks] == [names[1]]
    with pytest.raises(SalfError, match="no task nope") as err:
        suite.only_tasks(["nope"])
    assert names[0] in err.value.fix


def test_target_check_names_the_boundaries_and_rows_that_meet_it():
    from salf.bench.analysis import _target_check

    def row(q, c, **extra):
        return {"quality_ratio": {"mean": q}, "flops_ratio": {"mean": c}, **extra}

    per_k = [row(1.0, 1.0, k=0), row(0.995, 0.65, k=1), row(0.991, 0.55, k=2), row(0.9, 0.4, k=3)]
    variants = {"salf/a": row(0.991, 0.55), "baseline/b": row(0.98, 0.5), "lora": row(0.999, 0.61)}
    t = _target_check(per_k, variants)
    assert t["cheapest_oracle_keeping_quality"]["k"] == 2
    assert t["oracle_meeting"] == [2]
    assert t["variants_meeting"] == ["salf/a"]
    wider = _target_check(per_k, variants, target_flops=0.70)  # a suite's own target (smollm2: the 70%)
    assert wider["flops"] == 0.70 and wider["oracle_meeting"] == [1, 2]
    assert wider["variants_meeting"] == ["lora", "salf/a"]


def test_equal_compute_on_chosen_seeds_only():
    task = BenchSuite.load("minilm-quick").tasks[0]
    some = dataclasses.replace(task, seeds=[0, 1, 2], equal_compute=[0, 2])
    assert [some.equal_compute_for(s) for s in (0, 1, 2)] == [True, False, True]
    assert dataclasses.replace(task, equal_compute=True).equal_compute_for(5)
    assert some.recipe_fingerprint() == task.recipe_fingerprint()  # extras never invalidate finished runs
    narrowed = BenchSuite.load("minilm-quick")
    narrowed = dataclasses.replace(narrowed, tasks=[some]).with_seeds([1, 2])
    assert narrowed.tasks[0].equal_compute == [2]
    with pytest.raises(SalfError, match="equal_compute seeds"):
        dataclasses.replace(task, seeds=[0], equal_compute=[3])


def test_smoke_suite_end_to_end_and_resume(tmp_path, monkeypatch):
    suite = BenchSuite.load("smoke")
    out = tmp_path / "bench"
    first = run_bench(suite, out, show_progress=False)
    for name in ("runs.json", "results.md", "frontier.png", "progress.log", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((out / "runs.json").read_text())["runs"]
    keys = {r["key"] for r in runs}
    # each task's row of the defaults, read from its data: a classifier, and function names (open answers)
    assert [r["default_cell"] for r in runs if r["kind"] == "meta"] == ["classification", "completion"]
    n_oracle = 0
    for task in suite.tasks:
        for k in range(5):  # the tiny models have 4 blocks
            assert f"{task.name}|seed=0|oracle/k={k}" in keys
            n_oracle += 1
        for name in BASELINES.names():  # every baseline with a run of its own trained it, or said why not
            record = next(r for r in runs if r["key"] == f"{task.name}|seed=0|baseline/{name}")
            assert not BASELINES.get(name).trains or record.get("metrics") or record["status"] == "unavailable"
    own_runs = sum(1 for r in runs if r.get("kind") == "baseline" and r.get("metrics"))
    assert own_runs >= 5 * len(suite.tasks)  # LoRA, LISA, freeze-deep-half, Spectrum x 2 (LoRA on the plan too)
    assert first.trained == n_oracle + own_runs + len(suite.tasks)  # oracle sweep + baselines + per datum per task
    by_key = {r["key"]: r for r in runs}
    for task, lens in zip(suite.tasks, ("probe", "logit-lens")):  # the default lens of each task
        record = by_key[f"{task.name}|seed=0|salf-per-datum/{lens}/headroom/knee"]
        plan = by_key[f"{task.name}|seed=0|salf-per-datum-plan/{lens}/headroom/knee"]
        single = by_key[f"{task.name}|seed=0|salf/{lens}/headroom/knee"]
        assert record["kind"] == "per-datum" and record["status"] == "done", record.get("error")
        assert record["global_boundary"] == plan["boundary"] == single["boundary"]
        histogram = record["boundary_histogram"]
        assert sum(histogram.values()) == plan["n_train"] and all(0 <= int(k) <= 4 for k in histogram)
        assert record["mean_boundary"] == pytest.approx(sum(int(k) * n for k, n in histogram.items()) / plan["n_train"])
        metrics = record["metrics"]
        assert metrics["steps"] == task.steps and metrics["eval_loss"] is not None
        assert metrics["eval_accuracy" if lens == "probe" else "exact_match"] is not None
        trained = metrics["per_datum"]["padded_tokens_per_boundary"]
        assert sum(trained.values()) == metrics["padded_tokens"] and metrics["padded_tokens_agree"]
        assert metrics["train_flops"] == pytest.approx(sum(b["flops"] for b in metrics["flops_by_boundary"].values()))
        assert set(metrics["flops_by_boundary"]) == set(trained)
        assert "sum over boundaries" in metrics["train_flops_method"]
        assert record["profiling_seconds"] == plan["profiling_seconds"] > 0

    done = [r for r in runs if r.get("kind") == "oracle"]
    assert all(r["status"] == "done" for r in done)
    flops = {r["boundary"]: r["metrics"]["train_flops"] for r in done if r["task"] == suite.tasks[0].name}
    assert all(flops[k] > flops[k + 1] for k in range(4))  # freezing more is measured cheaper
    gpt = first.analysis[suite.tasks[1].name]
    assert gpt["quality_metric"] == "exact_match"
    assert {v.split("/")[1] for v in gpt["variants"] if v.startswith("salf/")} == {"logit-lens", "basis-cosine"}
    bert = first.analysis[suite.tasks[0].name]
    assert {v.split("/")[1] for v in bert["variants"] if v.startswith("salf/")} == {"probe"}
    oracle_quality = {row["k"]: row["quality"]["mean"] for row in bert["oracle"]}
    for variant, v in bert["variants"].items():
        if v["reuses_oracle"]:
            assert v["quality"]["mean"] == oracle_quality[v["boundaries"][0]], variant
            assert v["regret"]["mean"] >= 0
    lines = (out / "progress.log").read_text().splitlines()
    assert lines and "ETA" in lines[-1]
    done, total = re.search(r"\[(\d+)/(\d+)\]", lines[-1]).groups()
    assert done == total  # the plans' own boundaries counted in the total once they are known
    results = (out / "results.md").read_text()
    assert "identical by construction" in results and "Oracle sweep" in results
    assert results.index("Regret by model") < results.index(f"## {suite.tasks[0].name}")  # the per-model table first
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"regret_by_model", "tasks"} and set(summary["tasks"]) == {t.name for t in suite.tasks}
    for task in suite.tasks:
        cosine = by_key[f"{task.name}|seed=0|baseline/cosine-change"]
        assert cosine["status"] == "done" and len(cosine["details"]["block_cosine_change"]) == 4
    assert "Per-datum vs single boundary" in results and "salf-per-datum/probe/headroom/knee" in results
    assert first.analysis[suite.tasks[0].name]["per_datum"]["salf-per-datum/probe/headroom/knee"]["per_datum"][
        "quality"]["mean"] is not None

    # Resume: everything is in runs.json, so nothing trains again.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(salf.training.run, "train", no_training)
    again = run_bench(suite, out, show_progress=False)
    assert again.trained == 0 and again.skipped >= len(keys) - len(suite.tasks)
    assert json.loads((out / "runs.json").read_text())["runs"] == runs
    assert again.render()
    assert math.isclose(again.analysis[suite.tasks[0].name]["oracle"][0]["quality"]["mean"],
                        first.analysis[suite.tasks[0].name]["oracle"][0]["quality"]["mean"])

    # A runs.json from before the per-datum variant: its oracle runs and plans are reused (same recipe
    # fingerprint); only the default lens is traced again and only the per-datum run trains.
    monkeypatch.undo()
    old = [r for r in runs if not r["variant"].startswith("salf-per-datum")]
    (out / "runs.json").write_text(json.dumps({"format": 1, "suite": suite.name, "runs": old}))
    later = run_bench(suite, out, show_progress=False)
    assert later.trained == len(suite.tasks)
    now = {r["key"]: r for r in json.loads((out / "runs.json").read_text())["runs"]}
    assert all(now[r["key"]] == r for r in old)
    assert all(now[k]["status"] == "done" for k in set(now) - {r["key"] for r in old})
    assert later.analysis[suite.tasks[1].name]["per_datum"]["salf-per-datum/logit-lens/headroom/knee"]

    # --replan: a plan record and a boundary baseline lost (as when an estimator is new) come back from a
    # fresh trace, scored on the finished sweep; nothing trains.
    monkeypatch.setattr(salf.training.run, "train", no_training)
    plan_key = f"{suite.tasks[0].name}|seed=0|salf/probe/sufficiency/knee"
    baseline_key = f"{suite.tasks[0].name}|seed=0|baseline/cosine-change"
    kept = [r for r in json.loads((out / "runs.json").read_text())["runs"] if r["key"] not in (plan_key, baseline_key)]
    (out / "runs.json").write_text(json.dumps({"format": 1, "suite": suite.name, "runs": kept}))
    replanned = run_bench(suite, out, show_progress=False, replan=True)
    back = {r["key"]: r for r in json.loads((out / "runs.json").read_text())["runs"]}
    assert replanned.trained == 0 and plan_key in back and baseline_key in back
    assert back[plan_key]["details"]["chance"] > 0
    assert replanned.analysis[suite.tasks[0].name]["variants"]["salf/probe/sufficiency/knee"]["regret"]["mean"] >= 0

    # Data that changed since the stored runs (a corpus read from the machine, e.g. after apt-get update):
    # resuming would mix two samples in one sweep, so it is refused with the way out; a runs.json from
    # before salf recorded fingerprints is not checked.
    metas = [r for r in kept if r["variant"] == "meta"]
    assert metas and all(len(r["train_fingerprint"]) == len(r["eval_fingerprint"]) == 16 for r in metas)
    for record in metas:
        record["train_fingerprint"] = "0" * 16
    (out / "runs.json").write_text(json.dumps({"format": 1, "suite": suite.name, "runs": kept}))
    with pytest.raises(SalfError, match="data built now differ") as refused:
        run_bench(suite, out, show_progress=False)
    assert "--no-resume" in refused.value.fix
    for record in metas:
        del record["train_fingerprint"], record["eval_fingerprint"]
    (out / "runs.json").write_text(json.dumps({"format": 1, "suite": suite.name, "runs": kept}))
    assert run_bench(suite, out, show_progress=False).trained == 0


def test_regret_by_model_pools_every_model_when_there_are_several():
    first, other = _sweep("a"), _sweep("c", model="other")
    for records, task in ((first, "a"), (other, "c")):
        for seed in (0, 1):
            records.append(_record(task, seed, "baseline/train-last-quarter", "baseline", boundary=2))
    table = regret_by_model([analyze(first + other)])
    assert set(table) == {"m", "other", ALL_MODELS}
    assert table[ALL_MODELS]["tasks"] == ["a", "c"]
    rows = {r["variant"]: r for r in table[ALL_MODELS]["rows"]}
    assert all(r["n"] == 4 for r in rows.values())  # two seeds of each task
    assert ALL_MODELS not in regret_by_model([analyze(first)])


def test_a_fixture_is_found_in_the_cache_or_the_repository_and_otherwise_named_with_its_build_command(
        tmp_path, monkeypatch):
    import salf.bench.tasks as tasks

    cache, committed = tmp_path / "cache", tmp_path / "bench-fixtures"
    monkeypatch.setattr(tasks, "cache_dirs", lambda: [cache])
    monkeypatch.setattr(tasks, "COMMITTED_FIXTURES", committed)
    with pytest.raises(SalfError, match="not built") as err:
        tasks.MODEL_SOURCES.get("fixture")("gpt-debian", None)
    assert str(committed) in err.value.args[0] and "--steps" in str(err.value)
    for where in (committed, cache):  # the committed copy, then a cached one that takes precedence
        (where / "gpt-debian" / "model").mkdir(parents=True)
        (where / "gpt-debian" / "model" / "config.json").write_text("{}")
        assert tasks.MODEL_SOURCES.get("fixture")("gpt-debian", None) == str((where / "gpt-debian" / "model").resolve())


def test_oracle_stride_sweeps_the_grid_and_every_picked_boundary():
    from types import SimpleNamespace

    from salf.bench.taskbench import TaskBench

    bench = SimpleNamespace(prepared=SimpleNamespace(num_layers=30), task=SimpleNamespace(oracle_stride=3),
                            default_cell="completion", lenses=lambda: ["logit-lens"])
    bench.oracle_grid = lambda: TaskBench.oracle_grid(bench)
    picked = [PlanRecord(key=str(i), boundary=k, variant=v) for i, (k, v) in enumerate(
        [(28, ""), (0, ""), (None, ""), (28, ""), (7, ""), (13, default_plan("completion"))])]
    ks = TaskBench.oracle_boundaries(bench, picked)
    assert ks[:3] == [13, 28, 7] and ks[3:] == [k for k in range(3, 31, 3) if k != 28]  # default, picked, grid
    bench.task.oracle_stride, bench.prepared.num_layers = 4, 10
    assert TaskBench.oracle_boundaries(bench, []) == [4, 8, 10]  # the last boundary always


def test_a_strided_sweep_is_complete_once_its_grid_is_trained():
    from salf.bench.store import complete_records, sweep_boundaries

    meta = MetaRecord(key="t|meta", kind="meta", task="t", seed=None, num_layers=7, task_config={"oracle_stride": 3})
    assert sweep_boundaries(meta) == {0, 3, 6, 7}
    oracle = [TrainedRun(key=f"t|{k}", task="t", seed=0, variant=f"oracle/k={k}", status="done") for k in (0, 3, 5, 6)]
    plan = PlanRecord(key="t|p", task="t", seed=0, variant="salf/x", kind="plan")
    assert complete_records([meta, *oracle, plan]) == [meta]  # k = 7 missing: the seed is not finished
    last = TrainedRun(key="t|7", task="t", seed=0, variant="oracle/k=7", status="diverged")
    assert len(complete_records([meta, *oracle, plan, last])) == 7
    assert sweep_boundaries(MetaRecord(key="m", num_layers=4)) == {0, 1, 2, 3, 4}  # suites from before the stride: every boundary


def test_bench_table_of_a_strided_sweep_averages_the_flops_it_has(tmp_path):
    """A sweep with an oracle stride (bench/results/smollm2) has no run at some boundaries: the FLOPs row of
    the oracle table averages the tasks that have one, and says '-' where none does (it used to crash)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "bench" / "results"
    bench_table([str(root / "e5-quick"), str(root / "smollm2")], out=str(tmp_path / "table.md"))
    text = (tmp_path / "table.md").read_text()
    assert "### Model `builtin:smollm2-135m`" in text and "| FLOPs x full |" in text
