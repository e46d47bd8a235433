"""LoRA adapters on the planned blocks only (PEFT): the frozen prefix gets none, the head is trained in full."""

from __future__ import annotations

import torch
from torch import nn

from salf.errors import SalfError
from salf.method.freeze import FreezeSpec
from salf.models.arch import find_parts
from salf.training.config import TrainConfig


def add_lora(model: nn.Module, spec: FreezeSpec, config: TrainConfig, task: str) -> nn.Module:
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as exc:
        raise SalfError("LoRA needs the peft package", "pip install 'salf[lora]'") from exc
    if not spec.trainable_blocks:
        raise SalfError(
            "LoRA needs at least one trainable block in the plan", "plan a smaller boundary, or train without --lora"
        )
    parts = find_parts(model)
    head_modules = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name in parts.head_names
            if any(True for _ in model.get_submodule(name).parameters())
        }
    )
    is_class = task == "classification"
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules)
        if isinstance(config.lora_target_modules, tuple)
        else config.lora_target_modules,
        layers_to_transform=list(spec.trainable_blocks),
        layers_pattern=parts.blocks_name.rsplit(".", 1)[-1],
        modules_to_save=head_modules if (is_class and spec.head) else None,
        task_type=TaskType.SEQ_CLS if is_class else TaskType.CAUSAL_LM,
    )
    torch.manual_seed(config.seed)
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as exc:
        raise SalfError(
            f"LoRA could not be placed on blocks {list(spec.trainable_blocks)}: {exc}",
            "set lora_target_modules to module names of this architecture (or 'all-linear')",
        ) from exc
    return peft_model


__all__ = ["add_lora"]
