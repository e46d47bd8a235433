"""Where each architecture keeps its embeddings, blocks, final norm and head.

``ARCHITECTURES`` is the one table salf reads. Paths are relative to the model's *base model*
(``model.base_model``: ``LlamaModel``, ``GPT2Model``, ``BertModel``...), so the same entry serves
``...ForCausalLM``, ``...ForSequenceClassification`` and the bare model. Everything outside the
base model (``lm_head``, ``score``, ``classifier``) is the head, plus ``head_extra`` parts that live
inside the base model but only feed the head (BERT's pooler).

Fallback for a ``model_type`` not in the table: the blocks are the longest ``nn.ModuleList`` in the
base model, the embeddings are ``get_input_embeddings()``, the final norm is a direct child of the
base model whose class name contains ``Norm``. If no block list is found, ``find_parts`` raises a
``SalfError`` naming the type and the supported ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from salf.errors import SalfError


@dataclass(frozen=True)
class ArchSpec:
    embeddings: tuple[str, ...]
    """Modules that turn token ids into the first latent state h_0 (all frozen when boundary > 0)."""
    blocks: str
    """The ``nn.ModuleList`` of transformer blocks, in order."""
    norm: str | None
    """The final norm applied before the head, or None where the model has none."""
    head_extra: tuple[str, ...] = ()
    """Parts inside the base model that only feed the head (trained with the head)."""
    encoder: bool = False
    """Bidirectional encoder (BERT-style): no causal LM head to read with ``logit-lens``."""


_DECODER = ArchSpec(embeddings=("embed_tokens",), blocks="layers", norm="norm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(embeddings=("wte", "wpe"), blocks="h", norm="ln_f"),
    "llama": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "mistral": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "phi3": _DECODER,
    "phi": ArchSpec(embeddings=("embed_tokens",), blocks="layers", norm="final_layernorm"),
    "gpt_neox": ArchSpec(embeddings=("embed_in",), blocks="layers", norm="final_layer_norm"),
    "opt": ArchSpec(
        embeddings=("decoder.embed_tokens", "decoder.embed_positions", "decoder.project_in"),
        blocks="decoder.layers",
        norm="decoder.final_layer_norm",
    ),
    "bert": ArchSpec(embeddings=("embeddings",), blocks="encoder.layer", norm=None, head_extra=("pooler",), encoder=True),
}


@dataclass
class ModelParts:
    """Named handles on one model's pipeline: embeddings -> blocks -> norm -> head."""

    model: nn.Module
    model_type: str
    base_prefix: str
    """Dotted name of the base model inside ``model`` ('' when the model is its own base)."""
    embeddings: dict[str, nn.Module]
    blocks: nn.ModuleList
    blocks_name: str
    norm: nn.Module | None
    norm_name: str | None
    head_names: list[str]
    """Full dotted names of head modules (everything outside the base model, plus head extras)."""
    encoder: bool
    from_fallback: bool = False
    _block_re: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._block_re = re.compile(re.escape(self.blocks_name) + r"\.(\d+)\.")

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def group_of(self, param_name: str) -> str:
        """Which pipeline part a parameter belongs to: 'embeddings', 'block:<i>', 'norm', 'head' or 'other'."""
        m = self._block_re.match(param_name)
        if m:
            return f"block:{int(m.group(1))}"
        if any(param_name.startswith(name + ".") for name in self.embeddings):
            return "embeddings"
        if self.norm_name and param_name.startswith(self.norm_name + "."):
            return "norm"
        if any(param_name.startswith(name + ".") for name in self.head_names):
            return "head"
        return "other"

    def output_head(self) -> nn.Module | None:
        """The vocabulary projection W for lenses, or None (encoders, classifiers)."""
        get = getattr(self.model, "get_output_embeddings", None)
        return get() if get is not None else None


def supported_types() -> list[str]:
    return sorted(ARCHITECTURES)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _base_prefix(model: nn.Module) -> tuple[str, nn.Module]:
    base = getattr(model, "base_model", model)
    if base is model:
        return "", model
    for name, module in model.named_modules():
        if module is base:
            return name, base
    raise SalfError(f"cannot locate the base model inside {type(model).__name__}")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _fallback_spec(base: nn.Module, model_type: str) -> ArchSpec:
    lists = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise SalfError(
            f"unsupported architecture {model_type!r}: no list of transformer blocks found",
            f"salf supports {', '.join(supported_types())}; add an entry to salf.models.arch.ARCHITECTURES",
        )
    blocks_name, _ = max(lists, key=lambda item: len(item[1]))
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    embeddings = tuple(name for name, m in base.named_modules() if embed is not None and m is embed)
    norms = [name for name, m in base.named_children() if "norm" in type(m).__name__.lower()]
    return ArchSpec(embeddings=embeddings, blocks=blocks_name, norm=norms[-1] if norms else None)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper, or the model itself."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def find_parts(model: nn.Module) -> ModelParts:
    """Locate embeddings, blocks, final norm and head of a Hugging Face model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    base_prefix, base = _base_prefix(model)
    spec = ARCHITECTURES.get(model_type)
    fallback = spec is None
    if spec is None:
        spec = _fallback_spec(base, model_type)
    blocks = _get(base, spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise SalfError(
            f"model type {model_type!r}: expected the block list at {spec.blocks!r}, found none",
            f"check that the model is a standard transformers class; supported: {', '.join(supported_types())}",
        )
    embeddings = {
        _join(base_prefix, name): module for name in spec.embeddings if (module := _get(base, name)) is not None
    }
    norm = _get(base, spec.norm) if spec.norm else None
    norm_name = _join(base_prefix, spec.norm) if norm is not None else None
    head_names = [name for name, _ in model.named_children() if name != base_prefix]
    head_names += [_join(base_prefix, name) for name in spec.head_extra if _get(base, name) is not None]
    return ModelParts(
        model=model,
        model_type=model_type,
        base_prefix=base_prefix,
        embeddings=embeddings,
        blocks=blocks,
        blocks_name=_join(base_prefix, spec.blocks),
        norm=norm,
        norm_name=norm_name,
        head_names=head_names,
        encoder=spec.encoder,
        from_fallback=fallback,
    )
