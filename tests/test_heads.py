"""Tied output heads (issue #12): keep tied or untie, with exact costs, frozen embeddings and clean checkpoints.

Every tied architecture of the table: GPT-2, Gemma, Gemma 2 and OPT tie by default; Llama and Qwen2
tie when their config says so (Llama 3.2 1B/3B, Qwen2 0.5B/1.5B).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import save_tiny, text_data
from transformers import AutoModelForCausalLM

from salf.cli import main
from salf.errors import SalfError
from salf.method.cost import boundary_costs
from salf.method.cost_counting import measure_step_flops
from salf.method.cost_profile import CostShape, profile_cost
from salf.method.freeze import FreezeSpec, apply_plan
from salf.models.arch import find_parts
from salf.models.heads import has_tied_head, head_mode_for, untie_head
from salf.models.tiny import tiny_model
from salf.training.config import TrainConfig
from salf.training.inputs import TrainingData
from salf.training.run import train

TIED = [("gpt2", {}), ("gemma", {}), ("gemma2", {}), ("opt", {}),
        ("llama", {"tie_word_embeddings": True}), ("qwen2", {"tie_word_embeddings": True})]
B, T = 2, 8


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (B, T), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("model_type,overrides", TIED, ids=[t for t, _ in TIED])
def test_untying_keeps_the_function_and_separates_the_matrices(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    assert has_tied_head(model)
    batch = _batch()
    with torch.no_grad():
        before = model(**batch).logits
    assert untie_head(model) and not has_tied_head(model)
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
        model.get_output_embeddings().weight.add_(1.0)
    assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    assert not untie_head(model)  # a second call is a no-op


@pytest.mark.parametrize("model_type,overrides", TIED, ids=[t for t, _ in TIED])
def test_untied_head_costs_match_a_real_step(model_type, overrides):
    """Predicted FLOPs, activation bytes, trainable parameters and optimizer bytes of every k > 0 with an
    untied head agree with a real step of the untied model under the plan."""
    model = tiny_model(model_type, **overrides).train()
    costs = boundary_costs(profile_cost(model, CostShape(B, T)), untie_head=True)
    untied = copy.deepcopy(model)
    untie_head(untied)
    parts = find_parts(untied)
    total = sum(p.numel() for p in untied.parameters())
    for k in range(1, parts.num_layers + 1):
        spec = FreezeSpec(trainable_blocks=tuple(range(k, parts.num_layers)), embeddings=False, untie_head=True)
        report = apply_plan(untied, spec)
        try:
            measured = measure_step_flops(untied, _batch())
            trainable = sum(p.numel() for p in untied.parameters() if p.requires_grad)
        finally:
            report.remove()
        predicted = costs[k]
        what = f"{model_type} untied k={k}"
        assert (predicted.forward, predicted.backward) == (measured.forward, measured.backward), what
        assert predicted.activation_bytes == measured.activation_bytes, what
        assert predicted.trainable_params == trainable, what
        assert predicted.optimizer_bytes == 8 * trainable, what  # AdamW: two fp32 states
        assert predicted.total_params == total, what
    tied = boundary_costs(profile_cost(model, CostShape(B, T)))
    assert costs[0].total == tied[0].total  # k = 0 trains the tied head with the embeddings anyway


@pytest.mark.parametrize("model_type,overrides", TIED, ids=[t for t, _ in TIED])
def test_untied_head_trains_while_embeddings_stay_bit_identical(tmp_path, model_type, overrides):
    model = tiny_model(model_type, **overrides)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(3, 100, (10,), generator=g).tolist()), "labels": ids}
            for _ in range(16)]
    spec = FreezeSpec(trainable_blocks=(2, 3), embeddings=False, untie_head=True)
    config = TrainConfig(max_steps=3, batch_size=4, learning_rate=1e-2, save_steps=None, logging_steps=50)
    train(model, 0, TrainingData(data, None, "lm"), spec, config, tmp_path / "run")
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    head = model.get_output_embeddings().weight
    assert not torch.equal(head, embeddings)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not has_tied_head(reloaded) and reloaded.config.tie_word_embeddings is False
    assert torch.equal(reloaded.get_output_embeddings().weight, head.detach())
    assert torch.equal(reloaded.get_input_embeddings().weight, embeddings)
    out = reloaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_tied_plan_keeps_the_head_frozen_with_the_embeddings():
    model = tiny_model("gpt2")
    report = apply_plan(model, FreezeSpec.from_boundary(2, 4))
    assert has_tied_head(model) and not model.get_output_embeddings().weight.requires_grad
    report.remove()


def test_head_mode_is_for_tied_models_only():
    assert head_mode_for(tiny_model("gpt2"), None) == "untie"  # the default, chosen by the causal benchmark
    assert head_mode_for(tiny_model("gpt2"), "tied") == "tied"
    assert head_mode_for(tiny_model("gpt2"), "untie") == "untie"
    assert head_mode_for(tiny_model("llama"), None) is None
    with pytest.raises(SalfError, match="not tied"):
        head_mode_for(tiny_model("llama"), "untie")
    with pytest.raises(SalfError, match="--output-head"):
        head_mode_for(tiny_model("gpt2"), "loose")


def test_plan_cli_records_the_head_choice_and_train_follows_it(tmp_path, capsys):
    gpt2 = save_tiny(tmp_path, "gpt2")
    data = text_data(tmp_path / "text.jsonl", n=24)
    fast = ["--no-progress", "--sample-size", "16", "--trace-batch-size", "8"]
    plan_path = tmp_path / "plan.json"
    assert main([str(a) for a in ["plan", "--model", gpt2, "--data", data, "--out", plan_path, "--output-head", "untie",
                                  "--policy", "freeze-first-half", *fast]]) == 0
    printed = capsys.readouterr().out
    assert "untied" in printed
    plan = json.loads(plan_path.read_text())
    assert plan["head"] == "untie" and plan["trainable"]["untie_head"] is True
    out = tmp_path / "run"
    assert main([str(a) for a in ["train", "--model", gpt2, "--data", data, "--plan", plan_path, "--out", out,
                                  "--no-progress", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3"]]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["spec"]["untie_head"] is True
    assert json.loads((out / "model" / "config.json").read_text())["tie_word_embeddings"] is False
    assert main([str(a) for a in ["report", out, "--out", tmp_path / "report.html"]]) == 0
    assert "untied: its own trainable copy" in (tmp_path / "report.html").read_text()
