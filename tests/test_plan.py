import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salf.errors import SalfError
from salf.method.plan import (
    POLICIES,
    Plan,
    Prediction,
    benefit_curve,
    check_policy,
    choose_boundary,
    parse_policy,
)

L = 8
LINEAR_COST = np.linspace(1.0, 0.35, L + 1)  # full fine-tuning .. head only


def test_benefit_curve_is_tail_share():
    b = benefit_curve(np.array([1.0, 1.0, 2.0]))
    assert np.allclose(b, [1.0, 0.75, 0.5, 0.0])


def test_flat_gains_mean_uniform_benefit():
    assert np.allclose(benefit_curve(np.zeros(4)), [1, 0.75, 0.5, 0.25, 0])


def test_knee_trains_where_the_gain_is():
    gains = np.array([0, 0, 0, 0, 0, 1, 1, 1], dtype=float)
    assert choose_boundary(gains, LINEAR_COST, "knee") == 5
    gains = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=float)
    assert choose_boundary(gains, LINEAR_COST, "knee") == 0


def test_knee_flat_trace_is_full_finetuning():
    assert choose_boundary(np.ones(L), LINEAR_COST, "knee") == 0


def test_budget_respects_cost_and_picks_most_benefit():
    gains = np.arange(1, L + 1, dtype=float)
    for c in (0.4, 0.6, 0.8, 1.0):
        k = choose_boundary(gains, LINEAR_COST, f"budget={c}")
        assert LINEAR_COST[k] <= c + 1e-12
        assert k == min(j for j in range(L + 1) if LINEAR_COST[j] <= c + 1e-12)


def test_budget_ties_spend_the_budget_instead_of_dropping_to_the_floor():
    # the top blocks' estimated gain is zero, so every affordable boundary from the cheapest up ties
    gains = np.array([5.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    k = choose_boundary(gains, LINEAR_COST, "budget=0.7")
    assert k == min(j for j in range(L + 1) if LINEAR_COST[j] <= 0.7 + 1e-12)


def test_coverage_is_cheapest_with_enough_gain():
    gains = np.ones(L)
    assert choose_boundary(gains, LINEAR_COST, "coverage=0.5") == 4
    assert choose_boundary(gains, LINEAR_COST, "coverage=1") == 0


@pytest.mark.parametrize("bad", ["budget=0", "budget=1.5", "coverage=-0.1", "budget", "coverage=nan", "budget=abc"])
def test_out_of_range_values_are_clear_errors(bad):
    with pytest.raises(SalfError) as err:
        choose_boundary(np.ones(L), LINEAR_COST, bad)
    assert "budget" in str(err.value) or "coverage" in str(err.value)


def test_budget_below_forward_cost_says_the_minimum():
    with pytest.raises(SalfError, match="cheapest plan"):
        choose_boundary(np.ones(L), LINEAR_COST, "budget=0.1")


def test_unknown_policy_lists_known_ones():
    with pytest.raises(SalfError) as err:
        parse_policy("elbow")
    for name in POLICIES.names():
        assert name in str(err.value)


def test_baselines():
    assert choose_boundary(np.ones(L), LINEAR_COST, "full") == 0
    assert choose_boundary(np.ones(L), LINEAR_COST, "freeze-first-half") == 4
    assert choose_boundary(np.ones(L), LINEAR_COST, "train-last-quarter") == 6
    ks = {choose_boundary(np.ones(L), LINEAR_COST, "random", seed=s) for s in range(20)}
    assert ks <= set(range(1, L)) and len(ks) > 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=2, max_size=12), st.sampled_from(["knee", "budget=0.7", "coverage=0.8"]))
def test_every_policy_returns_a_valid_boundary(gains, policy):
    n = len(gains)
    cost = np.linspace(1.0, 0.3, n + 1)
    k = choose_boundary(np.array(gains), cost, policy)
    assert 0 <= k <= n


# the keys make_plan has written under "predicted" since plans first carried it, in its order
PREDICTED = {"step_flops_ratio": 0.6, "step_flops_saving": 0.4, "backward_flops_ratio": 0.45, "activation_memory_ratio": 0.5,
             "training_memory_ratio": 0.55, "trainable_params_ratio": 0.5, "step_flops": 6e9, "full_step_flops": 1e10}
# a plan file as salf 0.1.0 wrote it (the demo in BENCHMARKS.md), committed with the benchmark results
OLD_PLAN_FILE = Path(__file__).resolve().parents[1] / "bench" / "results" / "demo" / "plan.json"


def _plan(**over):
    d = dict(boundary=2, num_layers=4, trainable={"blocks": [2, 3], "embeddings": False, "norm": True, "head": True},
             trace=[3, 2, 1.5, 1.2, 1.1], trace_std=[0.1] * 5, gains=[1, 0.5, 0.3, 0.1],
             fit={"e_inf": 1.0, "a": 2.0, "alpha": 1.0, "r2": 0.9}, lens="logit-lens", estimator="transition",
             policy="knee", benefit=[1, 0.6, 0.3, 0.1, 0], cost=[1, 0.8, 0.6, 0.45, 0.35],
             predicted=dict(PREDICTED), model={"model_type": "llama", "num_layers": 4, "fingerprint": "abc"},
             data={"fingerprint": "d"})
    d.update(over)
    return d


def test_plan_round_trips_through_file(tmp_path):
    plan = Plan.from_dict(_plan())
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()
    spec = again.freeze_spec()
    assert spec.trainable_blocks == (2, 3) and not spec.embeddings
    assert again == plan and isinstance(again.predicted, Prediction)
    assert again.predicted.step_flops_ratio == 0.6 and again.predicted.full_step_flops == 1e10
    # the file stores the prediction as the plain object it always was, keys in make_plan's order
    assert list(json.loads(path.read_text())["predicted"].items()) == list(PREDICTED.items())


def test_plan_file_of_an_earlier_version_loads_and_saves_unchanged(tmp_path):
    stored = json.loads(OLD_PLAN_FILE.read_text())
    assert stored["salf_version"] == "0.1.0" and isinstance(stored["predicted"], dict)
    plan = Plan.load(OLD_PLAN_FILE)
    assert isinstance(plan.predicted, Prediction)
    assert plan.predicted.step_flops_ratio == stored["predicted"]["step_flops_ratio"]
    assert plan.predicted.step_flops_saving == pytest.approx(1 - plan.predicted.step_flops_ratio)
    assert json.dumps(plan.to_dict()) == json.dumps(stored)  # same keys, same order, same values
    assert plan.save(tmp_path / "plan.json").read_text() == OLD_PLAN_FILE.read_text()


def test_prediction_ignores_unknown_keys_and_refuses_missing_ones():
    plan = Plan.from_dict(_plan(predicted={**PREDICTED, "from_a_newer_salf": 1.0}))
    assert plan.predicted == Prediction(**PREDICTED) and "from_a_newer_salf" not in plan.to_dict()["predicted"]
    with pytest.raises(SalfError, match="lacks step_flops_saving"):
        Plan.from_dict(_plan(predicted={k: v for k, v in PREDICTED.items() if k != "step_flops_saving"}))
    with pytest.raises(SalfError, match="not a number"):
        Plan.from_dict(_plan(predicted={**PREDICTED, "step_flops": "many"}))
    with pytest.raises(TypeError, match="must be a Prediction"):
        Plan(**{**_plan(), "predicted": dict(PREDICTED)})


def test_plan_for_another_model_is_refused():
    plan = Plan.from_dict(_plan())
    with pytest.raises(SalfError, match="another model"):
        plan.check_model({"model_type": "llama", "num_layers": 6, "fingerprint": "abc"})
    plan.check_model({"model_type": "llama", "num_layers": 4, "fingerprint": "abc"})


@pytest.mark.parametrize("broken", ["[]", "{}", "{\"boundary\": 9, \"num_layers\": 4, \"trainable\": {}, \"trace\": [], \"gains\": []}", "not json"])
def test_damaged_plan_files_are_clear_errors(tmp_path, broken):
    path = tmp_path / "plan.json"
    path.write_text(broken)
    with pytest.raises(SalfError):
        Plan.load(path)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from(list(_plan()) + ["junk"]), st.one_of(st.integers(-3, 10), st.text(max_size=3), st.lists(st.floats(allow_nan=False), max_size=6))))
def test_plan_parser_never_crashes_unexpectedly(partial):
    d = {**_plan(), **partial}
    try:
        Plan.from_dict(json.loads(json.dumps(d)))
    except SalfError:
        pass


def test_benefit_curve_counts_the_frozen_share_from_the_head_only_boundary():
    b = benefit_curve(np.array([1.0, 1.0, 2.0]), frozen_share=0.4)
    assert np.allclose(b, [1.0, 0.4 + 0.6 * 0.75, 0.4 + 0.6 * 0.5, 0.4])
    cost = np.array([1.0, 0.8, 0.6, 0.3])
    assert choose_boundary(np.array([1.0, 1.0, 2.0]), cost, "coverage=0.5", frozen_share=0.6) == 3
    assert choose_boundary(np.array([1.0, 1.0, 2.0]), cost, "coverage=0.5") == 2


@pytest.mark.parametrize("frozen, trained", [(0.0, 12), (0.27, 9), (0.51, 6), (0.73, 3), (0.97, 0), (1.0, 0)])
def test_unsolved_trains_the_unsolved_share_of_equal_blocks(frozen, trained):
    cost = np.linspace(1.0, 0.33, 13)
    k = choose_boundary(np.full(12, 1 / 12), cost, "unsolved", frozen_share=frozen)
    assert 12 - k == trained


def test_unsolved_follows_the_gains_where_they_are_uneven():
    gains = np.array([0.0, 0.0, 0.1, 0.9])  # the top block holds 90% of the gain
    cost = np.array([1.0, 0.8, 0.6, 0.4, 0.3])
    assert choose_boundary(gains, cost, "unsolved", frozen_share=0.2) == 3  # 0.8 unsolved: the top block's 0.9
    assert choose_boundary(gains, cost, "unsolved", frozen_share=0.0) == 2  # all unsolved: blocks holding 100%


@pytest.mark.parametrize("scale, trained", [(0.5, 3), (0.75, 5), (1.0, 6), (1.5, 9), (3.0, 12)])
def test_unsolved_scale_moves_the_target_share(scale, trained):
    """Frozen share 0.5: round(S x 6) of 12 equal blocks (4.5 rounds up), at most all 12."""
    cost = np.linspace(1.0, 0.33, 13)
    assert 12 - choose_boundary(np.full(12, 1 / 12), cost, f"unsolved={scale}", frozen_share=0.5) == trained


@pytest.mark.parametrize("bad", ["unsolved=0", "unsolved=-1", "unsolved=11", "unsolved=nan"])
def test_unsolved_scale_out_of_range_is_refused(bad):
    with pytest.raises(SalfError, match="outside"):
        check_policy(bad)


def test_unknown_plan_keys_are_warned_about_not_dropped_silently(tmp_path):
    import warnings

    plan = Plan.from_dict(_plan())
    d = {**plan.to_dict(), "from_the_future": 1}
    d["predicted"] = {**d["predicted"], "new_ratio": 0.5}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = Plan.load(path)
    said = " ".join(str(w.message) for w in caught)
    assert "from_the_future" in said and "new_ratio" in said
    assert loaded.boundary == plan.boundary
