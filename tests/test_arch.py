import pytest
from torch import nn

from salf.errors import SalfError
from salf.models.arch import ARCHITECTURES, find_parts, supported_types
from salf.models.tiny import CAUSAL_TYPES, TINY_CONFIGS, tiny_model

CASES = [(t, "causal-lm") for t in CAUSAL_TYPES] + [(t, "classification") for t in TINY_CONFIGS]


def test_every_table_entry_has_a_tiny_model():
    assert set(ARCHITECTURES) - {"qwen3"} <= set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type,task", CASES)
def test_parts_cover_every_parameter(model_type, task):
    model = tiny_model(model_type, task, num_labels=3) if task == "classification" else tiny_model(model_type)
    parts = find_parts(model)
    assert parts.model_type == model_type and not parts.from_fallback
    assert parts.num_layers == 4
    assert parts.embeddings, "embeddings not found"
    groups = {n: parts.group_of(n) for n, _ in model.named_parameters()}
    assert "other" not in groups.values(), [n for n, g in groups.items() if g == "other"]
    assert {f"block:{i}" for i in range(4)} <= set(groups.values())
    assert "head" in groups.values() or task == "causal-lm"  # tied LM heads share the embedding
    if not parts.encoder:
        assert parts.norm is not None
    if task == "causal-lm":
        assert isinstance(parts.output_head(), nn.Linear)


def test_fallback_finds_blocks_of_unknown_type(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(model.config, "model_type", "my-new-llama")
    parts = find_parts(model)
    assert parts.from_fallback
    assert parts.blocks is model.model.layers
    assert parts.norm is model.model.norm
    assert list(parts.embeddings) == ["model.embed_tokens"]


def test_unknown_architecture_without_blocks_names_supported_types():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)

    with pytest.raises(SalfError) as err:
        find_parts(Weird())
    assert "Weird" in str(err.value)
    for name in supported_types():
        assert name in str(err.value)
