"""Tiny random models of every supported architecture, built from configs (no downloads).

Used by the tests (every table entry is exercised) and by the cost benchmark. ``tiny_model``
returns a freshly initialised model in eval mode with a fixed seed.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

VOCAB = 128

_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128,
)

TINY_CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, sliding_window=None),
    "gemma": dict(_LLAMA_LIKE, head_dim=8),
    "gemma2": dict(_LLAMA_LIKE, head_dim=8, sliding_window=64, query_pre_attn_scalar=8),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=128, original_max_position_embeddings=128),
    "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=128),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=128),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=128, dropout=0.0),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}

CAUSAL_TYPES = [t for t in TINY_CONFIGS if t != "bert"]


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, task: str = "causal-lm", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model: ``task`` is 'causal-lm' or 'classification' (pass num_labels)."""
    config = tiny_config(model_type, **overrides)
    # Eager attention: its matmuls are what FlopCounterMode counts on every backend.
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager")
    return model.eval()
