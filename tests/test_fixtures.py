"""The causal benchmark fixture's pretraining loop (salf.data.fixtures), on a few synthetic texts."""

import json

import pytest

import salf.data.fixtures as fixtures
from salf.errors import SalfError

TEXTS = [f"package number {i} provides the {w} tool for {v} users of the system" for i, (w, v) in
         enumerate([("alpha", "daily"), ("beta", "expert"), ("gamma", "casual"), ("delta", "remote")] * 10)]


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(fixtures, "debian_descriptions", lambda: TEXTS)
    return dict(model=fixtures.FixtureModel(layers=1, width=64, vocab=300), seq_len=16, batch=2, threads=1)


def test_a_step_budget_trains_exactly_that_many_steps_and_writes_a_loadable_model(tmp_path, small):
    from transformers import AutoModelForCausalLM

    path = fixtures.pretrain(tmp_path / "fx", fixtures.PretrainBudget(steps=3), **small)
    record = json.loads((path / "pretrain.json").read_text())
    assert record["steps"] == 3 and record["layers"] == 1
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.n_layer == 1
    assert fixtures.pretrain(tmp_path / "fx", fixtures.PretrainBudget(steps=50), **small) == path  # finished: reused, not retrained


def test_a_fixture_needs_a_budget(tmp_path, small):
    with pytest.raises(SalfError, match="needs a budget"):
        fixtures.pretrain(tmp_path / "fx", fixtures.PretrainBudget(), **small)
