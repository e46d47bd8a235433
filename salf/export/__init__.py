"""Export a plan to the training tools people already use: ``salf export PLAN --to TARGET``.

A plan freezes the embeddings and blocks ``0..k-1`` and trains blocks ``k..L-1``, the final norm and the
head (``salf.method.freeze.apply_plan``). Each exporter writes the snippet that makes another tool freeze
the same parameters, and says where that tool cannot express the plan exactly:

- ``llamafactory``: LLaMA-Factory's freeze tuning (``finetuning_type: freeze``, ``freeze_trainable_layers``,
  ``freeze_trainable_modules``, ``freeze_extra_modules``). LLaMA-Factory trains the last (or first) N
  layers and matches extra modules by *substring* of the parameter name, so a non-contiguous plan, or a
  final norm whose name is a substring of the blocks' norms (``norm`` in ``input_layernorm``), is not exact.
- ``axolotl``: ``unfrozen_parameters``, regexes that axolotl matches with ``re.match`` (anchored at the
  start of the name) after turning every ``.`` not followed by ``+`` into a literal dot. Exact.
- ``peft``: a ``LoraConfig`` with LoRA on the planned blocks only (``layers_to_transform``,
  ``layers_pattern``, ``target_modules``) and a classifier's head in ``modules_to_save``: what
  ``salf train --lora`` builds.
- ``torchtune``: torchtune's configs select no layers, so a Python function over torchtune's own parameter
  names (``tok_embeddings``, ``layers.{i}``, ``norm``, ``output``) to call in a copied recipe.
- ``deepspeed``: a ZeRO config; DeepSpeed only builds optimizer state for the parameters it is given, and
  the Hugging Face ``Trainer`` gives it those with ``requires_grad`` at ``deepspeed_init``.

Each exporter reads the real parameter names of the planned architecture: from a meta-device copy of a model
passed in, or of the plan's model built from its config (``--model`` overrides where to find it), never its
weights. Every snippet starts with the plan's fingerprint (``plan_fingerprint``) and a line saying what it
trains and freezes. Exporters are registered by name in ``EXPORTERS`` (``salf.export.tools``); the planned
model they read is ``salf.export.context``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from salf.export.context import export_context, plan_fingerprint
from salf.export.tools import EXPORTERS
from salf.fileio import write_atomic
from salf.method.plan import Plan


def export_plan(plan: Plan | str | Path, target: str, *, model: nn.Module | None = None,
                model_path: str | None = None) -> str:
    """The snippet that applies ``plan`` in ``target`` (a name in ``EXPORTERS``).

    ``model``: the planned model (only its class and config are read); default: the plan's model, built from
    its config (``model_path`` overrides the plan's ``name_or_path``, e.g. a local folder).
    """
    exporter = EXPORTERS.get(target)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    return exporter(export_context(plan, model=model, model_path=model_path))


def export(plan: str, to: str, out: str | None = None, model: str | None = None) -> str:
    """``salf export``: print the snippet, or write it atomically to ``out``."""
    loaded = Plan.load(plan)
    text = export_plan(loaded, to, model_path=model)
    if out is None:
        return text.rstrip("\n")
    write_atomic(out, text)
    return f"wrote the {to} settings of plan {plan_fingerprint(loaded)} to {out}"


__all__ = ["EXPORTERS", "export", "export_context", "export_plan", "plan_fingerprint"]
