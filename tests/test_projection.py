"""Projecting boundaries of models too big for this machine, from their configs alone.

``tests/data/configs/*.json`` are written from the published architecture sizes of Llama-3-8B,
Qwen2-7B and Gemma-2-9B (hidden size, layers, heads, KV heads, head dim, intermediate size,
vocabulary, tied or untied head), with bf16 weights.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pytest

from salf.errors import SalfError
from salf.fileio import to_json
from salf.method.cost import boundary_costs
from salf.method.cost_profile import CostShape, profile_cost
from salf.method.projection import (
    ACCELERATORS,
    Projection,
    StepTraining,
    Throughput,
    project,
    read_model_config,
    render_projection,
)
from salf.models.tiny import tiny_config

CONFIGS = Path(__file__).parent / "data" / "configs"
PUBLISHED_PARAMS = {"llama3_8b": 8.03e9, "qwen2_7b": 7.62e9, "gemma2_9b": 9.24e9}


@functools.cache
def _projected(name: str) -> Projection:
    return project(CONFIGS / f"{name}.json", CostShape(batch_size=1, seq_len=2048))


@pytest.fixture
def llama8b() -> Projection:
    return _projected("llama3_8b")


def test_llama3_8b_projection(llama8b):
    assert llama8b.num_layers == 32 and len(llama8b.rows) == 33
    again = project(CONFIGS / "llama3_8b.json", CostShape(batch_size=1, seq_len=2048))
    assert [r.to_dict() for r in again.rows] == [r.to_dict() for r in llama8b.rows]
    full, head_only = llama8b.rows[0], llama8b.rows[-1]
    # Full fine-tuning is ~6 x params x tokens (plus attention); freezing every block leaves the forward.
    assert 6 * 8.03e9 * 2048 < full.total_flops < 6.5 * 8.03e9 * 2048
    assert head_only.forward_flops == full.forward_flops < head_only.total_flops < 0.4 * full.total_flops
    assert full.ratio_to_full == 1.0 and full.saving == 0.0
    assert full.param_bytes == 2 * llama8b.total_params  # bf16
    assert full.optimizer_bytes == 8 * llama8b.total_params  # AdamW: two fp32 states per parameter


@pytest.mark.timing
def test_llama3_8b_projects_in_seconds(llama8b):
    # The first projection also imports the model code; once warm it takes about a second on an idle
    # core (the bound is generous for a loaded shared machine).
    again = project(CONFIGS / "llama3_8b.json", CostShape(batch_size=1, seq_len=2048))
    assert again.profile_seconds < 10


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_published_totals(name):
    p = _projected(name)
    config = read_model_config(CONFIGS / f"{name}.json")
    assert p.total_params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)
    assert p.num_layers == config.num_hidden_layers and p.model_type == config.model_type
    # The tied Gemma-2 head shares the 256000 x 3584 embedding: counted once, not trained at k > 0.
    head_grads = p.rows[-1].grad_bytes / 2
    assert (head_grads < 1e6) == (name == "gemma2_9b")


def _project_70b(tmp_path) -> Projection:
    data = json.loads((CONFIGS / "llama3_8b.json").read_text())
    data.update(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, intermediate_size=28672)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return project(path, CostShape(batch_size=1, seq_len=2048), boundaries=[0, 40, 79, 80], throughput=Throughput("h200"))


@pytest.mark.timing
def test_a_70b_config_projects_in_seconds(tmp_path):
    start = time.perf_counter()
    _project_70b(tmp_path)
    assert time.perf_counter() - start < 20


def test_a_70b_config_projection(tmp_path):
    p = _project_70b(tmp_path)
    assert p.total_params == pytest.approx(70.6e9, rel=0.01)
    assert [r.boundary for r in p.rows] == [0, 40, 79, 80]
    assert p.row(40).limit_saving == pytest.approx(1 / 3) and p.row(40).limit_saving_cached == pytest.approx(0.5)


def test_projection_is_the_cost_model(tmp_path):
    """Rows are exactly boundary_costs(profile_cost(config)) and time = FLOPs / (peak x utilisation)."""
    config = tiny_config("qwen2")
    config.save_pretrained(tmp_path)
    p = project(tmp_path, CostShape(batch_size=2, seq_len=16),
                throughput=Throughput(accelerator=None, peak_tflops=100, utilisation=0.5))
    costs = boundary_costs(profile_cost(config, CostShape(2, 16), attn_implementation="sdpa"))
    assert p.accelerator is None and p.peak_flops == 100e12 and p.attention == "sdpa"
    for row, cost in zip(p.rows, costs, strict=True):
        assert (row.forward_flops, row.backward_flops, row.total_flops) == (cost.forward, cost.backward, cost.total)
        assert (row.param_bytes, row.grad_bytes, row.optimizer_bytes, row.activation_bytes) == (
            cost.param_bytes, cost.grad_bytes, cost.optimizer_bytes, cost.activation_bytes)
        assert row.ratio_to_full == cost.ratio_to(costs[0])
        assert row.step_seconds == pytest.approx(cost.total / 50e12)
        assert row.limit_saving == pytest.approx(row.boundary / 4 * 2 / 3)
        # Freezing blocks never saves more than the bound allows for the whole step's block share.
        assert row.saving <= row.limit_saving_cached


def test_eager_attention_stores_the_probabilities(llama8b):
    eager = project(CONFIGS / "llama3_8b.json", CostShape(1, 2048), boundaries=[0], attention="eager")
    sdpa = llama8b.rows[0]
    probabilities = 32 * 32 * 2048 * 2048 * 2  # layers x heads x T x T, bf16
    assert eager.rows[0].activation_bytes - sdpa.activation_bytes > probabilities
    # Full fine-tuning with plain matrix products: backward is exactly twice the forward; the fused
    # kernel's backward also recomputes the attention scores.
    assert eager.rows[0].forward_flops == sdpa.forward_flops == eager.rows[0].backward_flops / 2
    assert sdpa.backward_flops - eager.rows[0].backward_flops == 32 * 2 * 32 * 2048 * 2048 * 128


def test_lora_projection_and_rendering(llama8b):
    lora = project(CONFIGS / "qwen2_7b.json", CostShape(2, 1024), StepTraining(lora_rank=16), boundaries=[0, 14, 28],
                   throughput=Throughput("A100"))
    assert lora.accelerator == "a100" and lora.peak_flops == ACCELERATORS["a100"]
    assert lora.rows[0].grad_bytes < 0.1 * llama8b.rows[0].grad_bytes  # adapters + head only
    text = render_projection(lora)
    assert "LoRA r=16" in text and "a100" in text and "limit+cache" in text
    assert len([line for line in text.splitlines() if line.strip().startswith(("0 ", "14 ", "28 "))]) == 3
    data = json.loads(to_json(lora.to_dict()))
    assert data["rows"][1]["boundary"] == 14 and data["rows"][1]["saving"] == pytest.approx(lora.rows[1].saving)


def test_costs_fall_with_the_boundary():
    for name in PUBLISHED_PARAMS:
        rows = _projected(name).rows
        for a, b in zip(rows, rows[1:]):
            assert b.total_flops < a.total_flops and b.activation_bytes < a.activation_bytes, name
            assert b.step_seconds < a.step_seconds, name
            if name != "gemma2_9b":
                assert b.saving <= b.limit_saving_cached, name


def test_freezing_a_tied_embedding_freezes_the_output_projection():
    """Gemma-2's head is its embedding: k = 1 also drops the 256000 x 3584 projection's weight
    gradient (2 x tokens x hidden x vocab FLOPs), more than block 0 saves, beyond the block-only limit."""
    rows = _projected("gemma2_9b").rows
    projection_grad = 2 * 2048 * 3584 * 256000
    assert rows[0].total_flops - rows[1].total_flops > projection_grad
    assert rows[1].saving > rows[1].limit_saving_cached
    assert rows[1].grad_bytes < rows[0].grad_bytes - 2 * 256000 * 3584


def test_mistakes_raise_salf_errors(tmp_path, monkeypatch):
    with pytest.raises(SalfError, match="unknown accelerator"):
        project(CONFIGS / "llama3_8b.json", CostShape(1, 16), throughput=Throughput("abacus"))
    with pytest.raises(SalfError, match="no config file"):
        project(tmp_path / "missing" / "config.json", CostShape(1, 16))
    with pytest.raises(SalfError, match="utilisation"):
        project(CONFIGS / "llama3_8b.json", CostShape(1, 16), throughput=Throughput(utilisation=1.5))
    with pytest.raises(SalfError, match="out of range"):
        project(CONFIGS / "llama3_8b.json", CostShape(1, 16), boundaries=[33])
    with pytest.raises(SalfError, match="dtype"):
        project(CONFIGS / "llama3_8b.json", CostShape(1, 16), dtype="int8")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SalfError, match="cannot read"):
        read_model_config(tmp_path / "bad.json")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SalfError, match="hub"):
        read_model_config("salf-tests/no-such-model")
