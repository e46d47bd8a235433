"""Tied output heads: keep the vocabulary projection tied to the input embeddings, or untie it.

Many causal LMs share one matrix between the input embeddings and the output projection (GPT-2,
Gemma, Qwen2 0.5B/1.5B, Llama 3.2 1B/3B). A plan with boundary k > 0 freezes the embeddings, and with
them a tied head: the model then adapts to the task without touching the projection that scores its
output tokens. Untying gives the head its own trainable copy of the matrix (initialised from the
embeddings, so nothing changes before the first step) while the input embeddings stay frozen. The
config then says ``tie_word_embeddings = False``, so the saved checkpoint carries both matrices and
reloads untied with ``from_pretrained``.

``HEAD_MODES`` are the plan's choices: 'tied' keeps the head tied (frozen with the embeddings when
k > 0), 'untie' unties it before training.
"""

from __future__ import annotations

from torch import nn

from salf.config.plan import OUTPUT_HEAD_MODES
from salf.errors import SalfError

HEAD_MODES = OUTPUT_HEAD_MODES
DEFAULT_HEAD_MODE = "untie"
"""What a plan does with a tied head unless told (``salf plan --head``), decided by the causal benchmark
(BENCHMARKS.md, "Causal LMs with a tied head"): on the fixture's two label-word tasks (3 seeds) an untied
head scored higher than the tied one at every boundary k > 0, by 0.9-38 points of accuracy, for 6% more of
full fine-tuning's FLOPs, and beat the tied plan one block deeper at lower cost. 'tied' keeps the old behaviour."""


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def has_tied_head(model: nn.Module) -> bool:
    """True when the model's output projection is the same parameter as its input embedding matrix."""
    inner = _inner(model)
    get_out = getattr(inner, "get_output_embeddings", None)
    get_in = getattr(inner, "get_input_embeddings", None)
    out = get_out() if get_out is not None else None
    inp = get_in() if get_in is not None else None
    weight_out, weight_in = getattr(out, "weight", None), getattr(inp, "weight", None)
    return weight_out is not None and weight_out is weight_in


def tied_head_params(model: nn.Module) -> int:
    """Parameters an untied head adds (the vocabulary x width matrix), or 0 for an untied model."""
    return _inner(model).get_input_embeddings().weight.numel() if has_tied_head(model) else 0


def untie_head(model: nn.Module) -> bool:
    """Give a tied output projection its own copy of the embedding matrix; returns False if it was not tied.

    The copy starts equal to the embeddings (the model computes the same function) and is a separate
    parameter: training it leaves the input embeddings untouched. The config records the untying so
    ``save_pretrained`` writes both matrices and ``from_pretrained`` does not tie them again.
    """
    inner = _inner(model)
    if not has_tied_head(inner):
        return False
    out, inp = inner.get_output_embeddings(), inner.get_input_embeddings()
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    configs = [inner.config]
    text = getattr(inner.config, "get_text_config", None)
    if text is not None and text() is not inner.config:
        configs.append(text())
    for config in configs:
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return True


def check_head_mode(mode: str | None) -> str | None:
    """Validate a head mode ('tied', 'untie' or None: the model's own)."""
    if mode is not None and mode not in HEAD_MODES:
        raise SalfError(f"unknown head mode {mode!r}", f"use --output-head {' or --output-head '.join(HEAD_MODES)}")
    return mode


def head_mode_for(model: nn.Module, requested: str | None) -> str | None:
    """The head mode a plan records: ``requested`` (or the default) for a tied model, None otherwise."""
    check_head_mode(requested)
    if not has_tied_head(model):
        if requested == "untie":
            raise SalfError("--output-head untie asks to untie the output head, but this model's head is not tied to "
                            "its input embeddings", "leave --output-head out: the head already trains on its own")
        return None
    return requested or DEFAULT_HEAD_MODE


def head_note(mode: str | None, boundary: int) -> str:
    """What a plan does with the output head, in words (for the plan table and the report)."""
    if mode is None:
        return "its own weights (not tied to the embeddings), trained with the head"
    if boundary == 0:
        return "tied to the input embeddings, trained with them (full fine-tuning)"
    if mode == "untie":
        return "untied: its own trainable copy of the embedding matrix; the input embeddings stay frozen"
    return "tied to the input embeddings, so frozen with them (`salf plan --output-head untie` trains a copy)"


def apply_head_mode(model: nn.Module, mode: str | None) -> bool:
    """Untie the head when ``mode`` is 'untie' (a no-op on an untied model); True if it untied one."""
    return untie_head(model) if check_head_mode(mode) == "untie" else False


__all__ = ["DEFAULT_HEAD_MODE", "HEAD_MODES", "apply_head_mode", "check_head_mode", "has_tied_head", "head_mode_for",
           "head_note", "tied_head_params", "untie_head"]
