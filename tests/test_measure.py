"""``salf cost --measure``: real steps per boundary agree with the cost model on this machine."""

from __future__ import annotations

import pytest

from salf.commands.cost import run as cost
from salf.config.commands import CostOptions
from salf.errors import SalfError
from salf.method.projection import tiny_spec_config


@pytest.mark.parametrize(("spec", "task"), [("tiny:llama", "causal-lm"), ("tiny:gpt2", "causal-lm"),
                                            ("tiny:bert", "classification")])
def test_measured_flops_and_bytes_equal_the_prediction(spec, task):
    result = cost(CostOptions(spec, seq=16, batch=2, task=task, measure=True, measure_steps=1, measure_repeats=1))
    rows = result.to_json()["measured"]["rows"]
    assert [r["boundary"] for r in rows] == list(range(len(rows)))
    for r in rows:
        assert r["measured_flops_ratio"] == pytest.approx(r["predicted_flops_ratio"], rel=1e-9)
        assert r["measured_activation_bytes"] == r["predicted_activation_bytes"]
        assert r["measured_state_bytes"] == r["predicted_state_bytes"]  # gradients + AdamW state, fp32
        assert r["step_seconds_median"] > 0 and r["timed_steps"] == 1
    # the last boundary trains only the head: fewer bytes of state than full fine-tuning
    assert rows[-1]["measured_state_bytes"] < rows[0]["measured_state_bytes"]
    assert "Measured on CPU" in result.render()


def test_tiny_spec_overrides_and_errors():
    config = tiny_spec_config("tiny:llama:hidden_size=64,num_hidden_layers=3")
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 64, 3)
    with pytest.raises(SalfError, match="no tiny config for 'nope'"):
        tiny_spec_config("tiny:nope")
    with pytest.raises(SalfError, match="not key=value"):
        tiny_spec_config("tiny:llama:hidden_size")


def test_measure_refuses_lora():
    with pytest.raises(SalfError, match="--measure trains full weights"):
        cost(CostOptions("tiny:llama", seq=8, measure=True, lora=True))
