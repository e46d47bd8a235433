import json

import numpy as np
import pytest

from salf.errors import SalfError
from salf.fileio import to_json
from salf.method.gain import ESTIMATORS, DepthFit, Gains, estimate_gains, fit_depth_law

LAYERS = np.arange(13)
LAW = 0.5 + 2.0 * (LAYERS + 1.0) ** -0.7

TRACES = {
    "law": LAW,
    "noisy": LAW + np.random.default_rng(0).normal(0, 0.2, LAW.size),
    "flat": np.full(9, 3.0),
    "rising": np.linspace(1.0, 2.0, 9),
    "v-shape": np.array([4.0, 3.0, 2.0, 1.0, 1.5, 2.5, 3.0]),
    "one-block": np.array([2.0, 1.0]),
}


def test_fit_recovers_a_power_law():
    fit = fit_depth_law(LAW)
    assert fit.r2 > 0.99
    assert (fit.e_inf, fit.a, fit.alpha) == pytest.approx((0.5, 2.0, 0.7), rel=1e-3)
    np.testing.assert_allclose(fit.predict(LAYERS), LAW, atol=1e-6)
    assert fit.predict(3) == pytest.approx(0.5 + 2.0 * 4**-0.7, rel=1e-4)


def test_fit_recovers_a_sharp_early_drop():
    trace = 1.0 + 5.0 * (LAYERS + 1.0) ** -3.0
    fit = fit_depth_law(trace)
    assert fit.r2 > 0.99 and fit.alpha == pytest.approx(3.0, rel=1e-2)


@pytest.mark.parametrize("name", ["noisy", "rising", "v-shape", "flat"])
def test_fit_survives_noisy_and_non_monotone_traces(name):
    fit = fit_depth_law(TRACES[name])
    assert fit.e_inf >= 0 and fit.a >= 0 and fit.alpha > 0
    assert np.isfinite([fit.e_inf, fit.a, fit.alpha, fit.r2]).all()
    assert fit.r2 <= 1.0 + 1e-12
    if name == "rising":  # no decreasing law explains a rising trace better than its mean
        assert fit.r2 == pytest.approx(0.0, abs=1e-6)


def test_fit_scales_with_the_trace():
    small = fit_depth_law(LAW * 1e-3)
    assert (small.e_inf, small.a, small.alpha) == pytest.approx((0.5e-3, 2.0e-3, 0.7), rel=1e-3)


@pytest.mark.parametrize("bad", [np.array([1.0]), np.array([1.0, np.nan, 0.5])])
def test_fit_rejects_unusable_traces(bad):
    with pytest.raises(SalfError):
        fit_depth_law(bad)


@pytest.mark.parametrize("trace_name", list(TRACES))
@pytest.mark.parametrize("estimator", ESTIMATORS.names())
def test_every_estimator_returns_one_non_negative_gain_per_block(estimator, trace_name):
    trace = TRACES[trace_name]
    gains = estimate_gains(trace, estimator)
    assert gains.estimator == estimator
    assert gains.values.shape == (trace.size - 1,)
    assert np.all(np.isfinite(gains.values)) and np.all(gains.values >= 0)
    assert gains.values.sum() > 0


@pytest.mark.parametrize("estimator", [n for n in ESTIMATORS.names() if n != "sufficiency-uniform"])  # uniform by design
def test_flat_trace_gets_uniform_gains_with_a_note(estimator):
    gains = estimate_gains(TRACES["flat"], estimator)
    np.testing.assert_allclose(gains.values, np.full(8, 1 / 8))
    assert "uniform" in gains.note


def test_informative_trace_has_no_note():
    assert estimate_gains(LAW, "transition").note == ""


def test_transition_blends_law_and_observed_drops_by_r2():
    trace = np.array([3.0, 2.0, 2.5, 1.0])
    fit = DepthFit(e_inf=1.0, a=2.0, alpha=1.0, r2=0.25)
    law = fit.predict(np.arange(4))
    expected = 0.25 * (law[:-1] - law[1:]) + 0.75 * np.array([1.0, 0.0, 1.5])
    np.testing.assert_allclose(ESTIMATORS.get("transition")(trace, fit), expected)
    # r2 outside [0, 1] is clipped: a bad fit means the observed drops alone.
    fit.r2 = -3.0
    np.testing.assert_allclose(ESTIMATORS.get("transition")(trace, fit), [1.0, 0.0, 1.5])


def test_transition_on_an_exact_law_is_the_law_drop():
    gains = estimate_gains(LAW, "transition")
    np.testing.assert_allclose(gains.values, LAW[:-1] - LAW[1:], atol=1e-6)


def test_headroom_is_the_growth_of_the_shortfall_below_the_law():
    trace = np.array([3.0, 2.0, 2.5, 1.0])
    fit = DepthFit(e_inf=1.0, a=2.0, alpha=1.0, r2=0.9)
    shortfall = trace - fit.predict(np.arange(4))
    expected = np.maximum(0, np.diff(shortfall))
    assert expected[1] > 0 and expected[2] == 0
    np.testing.assert_allclose(ESTIMATORS.get("headroom")(trace, fit), expected)


def test_observed_is_the_positive_drop():
    trace = np.array([3.0, 2.0, 2.5, 1.0])
    np.testing.assert_allclose(ESTIMATORS.get("observed")(trace, fit_depth_law(trace)), [1.0, 0.0, 1.5])


def test_best_layer_puts_the_gain_before_the_best_latent_space_plus_a_margin():
    trace = TRACES["v-shape"]  # best latent space: 3 (output of block 2)
    gains = estimate_gains(trace, "best-layer").values
    np.testing.assert_allclose(gains[:3], [1.0, 1.0, 1.0])
    assert gains[3] == pytest.approx(1.0)  # the margin block gets the mean gain before it
    np.testing.assert_array_equal(gains[4:], 0.0)


def test_best_layer_when_the_last_latent_space_is_best():
    gains = estimate_gains(LAW, "best-layer").values
    np.testing.assert_allclose(gains, LAW[:-1] - LAW[1:])


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(SalfError) as err:
        estimate_gains(LAW, "oracle-please")
    for name in ("transition", "headroom", "observed", "best-layer"):
        assert name in str(err.value)


def test_round_trip_through_json():
    gains = estimate_gains(TRACES["noisy"], "headroom")
    again = Gains.from_dict(json.loads(to_json(gains.to_dict())))
    np.testing.assert_allclose(again.values, gains.values)
    assert again.fit == gains.fit and again.estimator == "headroom" and again.note == gains.note
    assert DepthFit.from_dict(gains.fit.to_dict()) == gains.fit


def test_sufficiency_is_headroom_plus_the_share_the_frozen_top_layer_solves():
    from salf.method.gain import frozen_share

    trace = np.array([2.0, 1.4, 1.2, 1.3, 1.0])
    fit = fit_depth_law(trace)
    gains = estimate_gains(trace, "sufficiency", fit, chance=2.5)
    assert np.allclose(gains.values, estimate_gains(trace, "headroom", fit).values)
    assert gains.frozen_share == pytest.approx(1 - 1.0 / 2.5)
    assert estimate_gains(trace, "headroom", fit, chance=2.5).frozen_share == 0.0, "only sufficiency counts it"
    # without a chance level, latent 0 stands in (a first-token probe reads one constant vector there)
    assert frozen_share(trace, None) == pytest.approx(0.5)
    assert frozen_share(np.array([1.0, 0.9, 1.3]), 1.0) == 0.0, "worse than chance solves nothing"
    assert frozen_share(np.array([1.0, 0.5, 0.0]), None) == 1.0
    assert Gains.from_dict(json.loads(to_json(gains.to_dict()))).frozen_share == gains.frozen_share


def test_sufficiency_plans_shallower_where_the_frozen_features_already_serve():
    from salf.method.plan import choose_boundary

    trace = np.array([2.0, 1.5, 1.3, 1.25, 1.2, 1.15, 1.1])
    cost = np.linspace(1.0, 0.33, 7)
    fit = fit_depth_law(trace)
    boundaries = []
    for chance in (1.2, 2.0, 5.0):  # the same shape, the frozen top layer solving 8%, 45%, 78% of the task
        g = estimate_gains(trace, "sufficiency", fit, chance=chance)
        boundaries.append(choose_boundary(g.values, cost, "knee", frozen_share=g.frozen_share))
    assert boundaries == sorted(boundaries) and boundaries[0] < boundaries[-1] == 6


def test_sufficiency_uniform_spreads_the_gain_evenly_and_counts_the_frozen_share():
    trace = np.array([2.0, 1.4, 1.2, 1.3, 1.0])
    gains = estimate_gains(trace, "sufficiency-uniform", chance=2.5)
    np.testing.assert_allclose(gains.values, np.full(4, 0.25))
    assert gains.frozen_share == pytest.approx(0.6) and gains.note == ""
