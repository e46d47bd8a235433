"""The LoRA part of the cost model: which linears of a block get adapters (``lora_config_for``) and the
profiling passes of a block whose weights are frozen but whose adapters train (``LORA_MODES``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from salf.errors import SalfError
from salf.method.cost import head_kind_of
from salf.method.cost_counting import run_probe
from salf.models.arch import ModelParts, find_parts


def _block_linear_names(parts: ModelParts) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in parts.blocks.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D))})


def lora_config_for(model: nn.Module, rank: int, blocks: Iterable[int], alpha: float | None = None,
                    dropout: float = 0.0, task: str | None = None):
    """The ``peft.LoraConfig`` that places LoRA where salf does (and where the cost profile measures it).

    Rank-``rank`` adapters go on every ``nn.Linear`` / ``Conv1D`` inside the chosen ``blocks``, and
    nowhere else. For a classification model the final norm and head are trained fully
    (``modules_to_save``); a causal LM's head stays frozen.
    """
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise SalfError("LoRA needs the peft package", "pip install 'salf[lora]'") from e
    if rank < 1:
        raise SalfError(f"LoRA rank must be >= 1, got {rank}")
    parts = find_parts(model)
    layers = sorted(set(blocks))
    if not layers:
        raise SalfError("LoRA needs at least one block to adapt", "train at least one block, or the head alone without LoRA")
    task = task or head_kind_of(model)
    save = None
    if task == "classification":
        names = [*parts.head_names, *([parts.norm_name] if parts.norm_name else [])]
        # Parameter-free parts (dropout) are left out: peft matches names by suffix ('lora_dropout').
        save = [name for name in names if any(True for _ in model.get_submodule(name).parameters())]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=_block_linear_names(parts),
        layers_to_transform=layers,
        layers_pattern=parts.blocks_name.rsplit(".", 1)[-1],
        modules_to_save=save,
    )


def profile_lora(meta: nn.Module, parts: ModelParts, batch: dict, task: str, rank: int,
                  forward_blocks: list[float], keep: Tensor | None = None) -> dict[str, Any]:
    try:
        from peft import get_peft_model
    except ImportError as e:
        raise SalfError("profiling LoRA needs the peft package", "pip install 'salf[lora]'") from e
    n = parts.num_layers
    config = lora_config_for(meta, rank, range(n), task=task)
    config.modules_to_save = None  # the head is costed by the full-model passes
    # peft injects the adapters into the same block objects, so `parts` still points at them.
    model = get_peft_model(meta, config).get_base_model()

    def adapter(name: str) -> bool:
        return "lora_" in name

    passes = {"lora_full": run_probe(model, parts, batch, True, adapter, keep=keep),
              "lora_lowest": run_probe(model, parts, batch, False, adapter, keep=keep)}
    sizes = [p.element_size() for name, p in model.named_parameters() if adapter(name)]
    return dict(
        lora_forward=[float(passes["lora_full"].forward[j]) - forward_blocks[j] for j in range(n)],
        lora_params=[sum(p.numel() for name, p in block.named_parameters() if adapter(name))
                     for block in parts.blocks],
        lora_dtype_bytes=sizes[0] if sizes else 4,
        backward_blocks={m: [float(p.backward[j]) for j in range(n)] for m, p in passes.items()},
        activation_blocks={m: [int(p.saved.bytes[j]) for j in range(n)] for m, p in passes.items()},
        shared_activation_blocks={m: [int(p.saved.shared_bytes[j]) for j in range(n)] for m, p in passes.items()},
    )


__all__ = ["lora_config_for", "profile_lora"]
