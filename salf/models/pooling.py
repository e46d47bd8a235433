"""Which vector an encoder's classification head reads: the first token, or the mean of the tokens.

``BertForSequenceClassification`` pools the first token (``[CLS]``/``<s>``) through a dense + tanh
pooler. Sentence encoders such as all-MiniLM-L6-v2 and multilingual-e5-small were trained on the
*mean* of their token states instead, and e5's checkpoint carries no pooler at all, so the first token
of a frozen e5 is a vector nobody trained to summarise the text. ``use_mean_pooling`` swaps the pooler
for one that reads the masked mean of the last hidden states, keeping the pooler's own parameters
(``pooler.dense``), so the head's size, its learning rate, the freezing plan and the cost model stay as
they are. The choice is stored in the config (``salf_head_pooling``): a model saved by salf and loaded
back through ``salf.models.loading.load_model`` pools the same way, and the probe lens reads what the head reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from salf.errors import SalfError

POOLING_KEY = "salf_head_pooling"
"""Config attribute that records a non-default head pooling ('mean')."""
HEAD_POOLINGS = ("first", "mean")


class MaskedMeanPooler(nn.Module):
    """dense + activation of the masked mean of the token states (the padding left out)."""

    def __init__(self, pooler: nn.Module):
        super().__init__()
        self.dense = pooler.dense
        self.activation = pooler.activation
        self.mask: torch.Tensor | None = None
        """The attention mask of the forward in progress (set by a pre-hook on the base model)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            weights = hidden_states.new_ones(hidden_states.shape[:2]).unsqueeze(-1)
        else:
            weights = self.mask.to(hidden_states.device, hidden_states.dtype).unsqueeze(-1)
        pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.activation(self.dense(pooled))


def _keep_mask(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Pre-hook on the base model: hand the forward's attention mask to its mean pooler.

    The pooler is looked up on the module the hook runs on, not captured when the hook was made, so a
    ``copy.deepcopy`` of the model (``--lr auto``'s candidates) feeds its own pooler, not the original's."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]  # BertModel.forward(input_ids, attention_mask, ...)
    pooler = getattr(module, "pooler", None)
    if isinstance(pooler, MaskedMeanPooler):
        pooler.mask = mask


def head_pooling(model: nn.Module) -> str:
    """'mean' when ``model``'s classification head reads the token mean, else 'first'."""
    return getattr(model.config, POOLING_KEY, None) or "first"


def has_pooler(model: nn.Module) -> bool:
    """Whether ``model``'s head reads through a BERT-style pooler (dense + activation): the one place a
    head pooling can be chosen. Causal-LM classifiers and language models have none."""
    pooler = getattr(getattr(model, "base_model", None), "pooler", None)
    return isinstance(pooler, MaskedMeanPooler) or isinstance(getattr(pooler, "dense", None), nn.Linear)


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Make ``model``'s head read the masked token mean (in place; returns ``model``). Idempotent."""
    base = model.base_model
    pooler = getattr(base, "pooler", None)
    if isinstance(pooler, MaskedMeanPooler):
        return model
    if not has_pooler(model):
        raise SalfError(
            f"{type(model).__name__} has no BERT-style pooler (dense + activation) to read the token mean",
            "use --classifier-pooling first with this model (mean pooling is for BERT-family encoder classifiers)",
        )
    mean_pooler = MaskedMeanPooler(pooler)
    base.pooler = mean_pooler

    base.register_forward_pre_hook(_keep_mask, with_kwargs=True)
    setattr(model.config, POOLING_KEY, "mean")
    return model


def apply_head_pooling(model: nn.Module, pooling: str | None) -> nn.Module:
    """Apply ``pooling`` ('first', 'mean', or None: what the config records) to a classifier."""
    chosen = pooling or head_pooling(model)
    if chosen not in HEAD_POOLINGS:
        raise SalfError(f"unknown head pooling {chosen!r}", f"choose one of: {', '.join(HEAD_POOLINGS)}")
    if chosen == "mean":
        return use_mean_pooling(model)
    if head_pooling(model) == "mean":
        raise SalfError("this model was fine-tuned with a mean-pooling head; it cannot be switched back to 'first'",
                        "drop --classifier-pooling first (or load the original pretrained model)")
    return model
