"""The Hugging Face ``Trainer`` that ``salf.training.trainer.fit`` runs (``SalfTrainer``): AdamW over the
trainable parameters only, a fresh head in its own parameter group with its own learning rate, the data
strategy's batch sampler, and training steps that project only the labelled positions through a causal LM's
head (``TrainConfig.project_labelled_only``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from salf.errors import SalfError
from salf.method.cost_counting import labelled_positions, projected_forward
from salf.models.arch import unwrap_peft
from salf.training.callback import SalfCallback


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the Hugging Face model inside ``model`` (a PEFT wrapper passes keywords on) can project chosen
    positions only (transformers' causal LMs take ``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters


def _projecting(model: nn.Module, keep: torch.Tensor, observers: Sequence[SalfCallback] = ()):
    """``model`` as the Trainer calls it, projecting only positions ``keep``: the Trainer passes the batch and,
    when the model takes loss keywords, ``num_items_in_batch``. The loss is computed outside the model, so its
    forward hooks never see it: ``observers`` get it instead (each step's loss in history.json, the NaN stop)."""

    def forward(num_items_in_batch: torch.Tensor | int | None = None, **batch: Any) -> Any:
        out = projected_forward(model, batch, keep, num_items_in_batch)
        for observer in observers:
            observer.observe_loss(out.loss, num_items_in_batch is not None)
        return out

    return forward


class SalfTrainer(Trainer):
    """A ``Trainer`` whose AdamW gets the trainable parameters only, the head in its own group, and whose
    training steps project only the labelled positions through a causal LM's head (``project_labelled_only``)."""

    def __init__(
        self,
        *args,
        head_param_ids: frozenset[int] = frozenset(),
        head_learning_rate: float,
        train_batch_sampler: torch.utils.data.Sampler | None = None,
        project_labelled_only: bool = False,
        **kwargs,
    ):
        self.head_param_ids = head_param_ids
        self.head_learning_rate = head_learning_rate
        self.train_batch_sampler = train_batch_sampler
        self.project_labelled_only = project_labelled_only
        super().__init__(*args, **kwargs)

    def _projected_positions(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The positions this step projects through the head, or None for the full projection: in evaluation
        (its metrics read the top token at every position), for class-index labels, for a model that cannot
        choose positions, under a custom loss, and where every position is labelled (nothing to save)."""
        labels = inputs.get("labels")
        if not (self.project_labelled_only and model.training and isinstance(labels, torch.Tensor)
                and labels.dim() == 2 and self.label_smoother is None and self.compute_loss_func is None
                and _takes_logits_to_keep(self.accelerator.unwrap_model(model))):
            return None
        keep = labelled_positions(labels)
        return keep if 0 < keep.numel() < labels.shape[1] - 1 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keep = self._projected_positions(model, inputs)
        if keep is not None:
            # The Trainer's own compute_loss still calls the model and scales the loss (gradient accumulation,
            # devices) exactly as for the model's own loss; only the call projects fewer positions.
            observers = [c for c in self.callback_handler.callbacks if isinstance(c, SalfCallback)]
            model = _projecting(model, keep, observers)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def get_train_dataloader(self):
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                buckets.setdefault((id(param) in self.head_param_ids, name in decay), []).append(param)
        groups = []
        for (is_head, decays), params in sorted(
            buckets.items()
        ):  # body groups first: their lr is the logged one
            groups.append(
                {
                    "params": params,
                    "weight_decay": self.args.weight_decay if decays else 0.0,
                    "lr": self.head_learning_rate if is_head else self.args.learning_rate,
                }
            )
        if not groups:
            raise SalfError("the plan leaves no trainable parameter", "train at least the head or one block")
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )
        return self.optimizer
