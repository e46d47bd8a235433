"""--lr auto: successive halving over a log-spaced grid, within its budget, picks the clearly best rate."""

from __future__ import annotations

import math

import pytest

from salf.errors import SalfError
from salf.training.lrsearch import LRSearchConfig, plan_search, rung_sizes, rung_steps, split_validation


def test_rungs_halve_and_split_the_budget():
    assert rung_sizes(4, 4) == [4]
    assert rung_sizes(4, 2) == [4, 2]
    assert rung_sizes(9, 3) == [9, 3]
    # 60 step equivalents over two rungs, one evaluation costing 1: (30 - 4) // 4 and (30 - 2) // 2.
    assert rung_steps([4, 2], 60.0, 1.0, 2) == [6, 14]
    with pytest.raises(SalfError, match="--lr-search-budget"):
        rung_steps([4], 8.0, 1.0, 2)


def test_validation_split_is_seeded_and_disjoint():
    data = [{"input_ids": [i], "labels": 0} for i in range(100)]
    rest, val = split_validation(data, 10, seed=1)
    assert len(val) == 10 and len(rest) == 90
    assert {d["input_ids"][0] for d in rest}.isdisjoint(d["input_ids"][0] for d in val)
    assert split_validation(data, 10, seed=1)[1] == val
    assert split_validation(data, 10, seed=2)[1] != val


def test_search_plan_keeps_validation_within_a_third_of_a_candidates_share():
    from salf.training.config import TrainConfig

    # 150 steps x 15% = 22.5 step equivalents for 3 candidates: 7.5 each, validation at most 2.5 of it.
    plan = plan_search(4000, TrainConfig(max_steps=150, batch_size=16), LRSearchConfig())
    assert plan.val_size == 80 and plan.eval_batches == 5 and plan.sizes == [3] and plan.steps == [5]
    assert plan.steps[0] * 3 + 0.5 * plan.eval_batches * 3 <= plan.budget_steps
    big = plan_search(4000, TrainConfig(max_steps=3000, batch_size=16), LRSearchConfig())
    assert big.val_size == 256 and big.steps == [math.floor((450 - 3 * 0.5 * 16) / 3)]
    with pytest.raises(SalfError, match="--lr-search-budget"):
        plan_search(4000, TrainConfig(max_steps=40, batch_size=16), LRSearchConfig())


@pytest.mark.parametrize("bad", [dict(budget=0), dict(budget=float("nan")), dict(factors=(1.0,)),
                                 dict(factors=(1.0, -1.0)), dict(eta=1), dict(val_fraction=1.0)])
def test_search_config_refuses_bad_settings(bad):
    with pytest.raises(SalfError):
        LRSearchConfig(**bad)


def class_data(n: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (torch.randint(3, 40, (8,), generator=g) + 40 * (i % 3)).tolist(), "labels": i % 3}
            for i in range(n)]


def test_search_picks_the_clearly_best_rate_within_budget(tmp_path):
    """1e-6 learns nothing in a few steps and 3.0 wrecks the model; 3e-3 is clearly best."""
    from salf.models.tiny import tiny_model
    from salf.training.config import TrainConfig
    from salf.training.lrsearch import TunedModel, search_learning_rate

    config = TrainConfig(max_steps=60, batch_size=8, learning_rate=3e-3, head_learning_rate=2e-3,
                         save_steps=None, logging_steps=50, seed=0)
    search = LRSearchConfig(factors=(1 / 3000, 1.0, 1000.0), budget=1.0)
    result = search_learning_rate(TunedModel(lambda: tiny_model("llama", "classification", num_labels=3), 0),
                                  class_data(96), None, config, tmp_path, task="classification", search=search)
    assert result.learning_rate == pytest.approx(3e-3)
    # The fresh head keeps its own rate in every candidate: only the body's is searched.
    assert [c.head_learning_rate for c in result.candidates] == [pytest.approx(2e-3)] * 3
    assert len(result.candidates) == 3 and {c.steps for c in result.candidates} == {18}  # (60 - 3 x 2) / 3
    assert result.step_share <= 1.0 and result.flops > 0 and result.val_size == 32
    assert not any((tmp_path / d / "model").exists() for d in ("rung0-x1",))  # candidates keep no model
    again = search_learning_rate(TunedModel(lambda: tiny_model("llama", "classification", num_labels=3), 0),
                                 class_data(96), None, config, tmp_path, task="classification", search=search)
    assert [c.val_loss for c in again.candidates] == [c.val_loss for c in result.candidates]  # reproducible


def test_a_head_only_plan_searches_the_head_rate(tmp_path):
    """With no block trainable the body's rate moves nothing, so the head's rate is the one searched."""
    from salf.method.freeze import FreezeSpec
    from salf.models.tiny import tiny_model
    from salf.training.config import TrainConfig
    from salf.training.lrsearch import TunedModel, search_learning_rate

    config = TrainConfig(max_steps=30, batch_size=8, learning_rate=1e-4, head_learning_rate=2e-3,
                         save_steps=None, logging_steps=50, seed=0)
    search = LRSearchConfig(factors=(1 / 3, 3.0), budget=1.0)
    head_only = FreezeSpec(trainable_blocks=(), embeddings=False)
    result = search_learning_rate(TunedModel(lambda: tiny_model("llama", "classification", num_labels=3), 0),
                                  class_data(64), head_only, config, tmp_path, task="classification", search=search)
    assert sorted(c.head_learning_rate for c in result.candidates) == [pytest.approx(2e-3 / 3), pytest.approx(6e-3)]


def test_rank_prefers_accuracy_then_the_configured_rate_then_loss():
    """A faster-falling loss at equal validation accuracy does not move the rate off the configured one."""
    import math

    from salf.training.lrsearch import Candidate, _rank

    def cand(factor, loss, acc):
        return Candidate(factor=factor, learning_rate=1e-4 * factor, head_learning_rate=None, rung=0, steps=5,
                         val_loss=loss, val_accuracy=acc, seconds=1.0, flops=1.0)

    tied = [cand(1 / 3, 0.905, 0.46), cand(1.0, 0.877, 0.46), cand(3.0, 0.791, 0.46)]  # e5 word order, 5 steps
    assert min(tied, key=_rank).factor == 1.0
    better = [cand(1 / 3, 0.771, 0.46), cand(1.0, 0.761, 0.46), cand(3.0, 0.700, 0.525)]  # MiniLM word order
    assert min(better, key=_rank).factor == 3.0
    assert min([cand(1.0, math.inf, 0.9), cand(3.0, 0.8, 0.4)], key=_rank).factor == 3.0  # diverged is last
    lm = [cand(1 / 3, 2.0, None), cand(1.0, 2.1, None), cand(3.0, 2.0, None)]
    assert min(lm, key=_rank).factor == 1 / 3  # no accuracy: the lower loss, ties to the smaller rate


def test_a_completion_is_ranked_by_its_exact_match_and_plain_text_by_its_loss():
    from salf.training.lrsearch import validation_accuracy

    assert validation_accuracy({"eval_accuracy": 0.7, "eval_loss": 1.0}) == 0.7
    assert validation_accuracy({"eval_exact_match": 0.4, "eval_token_accuracy": 0.8, "eval_loss": 1.0}) == 0.4
    assert validation_accuracy({"eval_loss": 1.0, "eval_perplexity": 2.7}) is None
