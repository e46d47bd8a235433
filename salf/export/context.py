"""What every exporter reads: the plan applied (by ``apply_plan``) to a meta-device copy of the planned
model (``ExportContext``: its parameter names, which of them train, the LoRA targets), and the plan's
fingerprint that every snippet starts with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from salf.errors import SalfError
from salf.fileio import fingerprint
from salf.method.freeze import FreezeSpec, apply_plan
from salf.method.plan import Plan, model_fingerprint
from salf.models.arch import ModelParts, find_parts
from salf.models.heads import tied_head_params


def plan_fingerprint(plan: Plan) -> str:
    """A short stable hash of the plan file's content (everything but its creation time)."""
    content = {k: v for k, v in plan.to_dict().items() if k != "created"}
    return fingerprint(content)


def block_span(blocks: Iterable[int]) -> str:
    """[2, 3, 4, 7] -> '2..4, 7'."""
    blocks = sorted(blocks)
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)


@dataclass(frozen=True)
class ExportContext:
    """What every exporter reads: the plan, the planned model's parameter names, and what salf trains."""

    plan: Plan
    spec: FreezeSpec
    parts: ModelParts
    names: tuple[str, ...]
    """Parameter names of the planned model (``named_parameters``: a tied head is listed once, as the embeddings)."""
    trainable: frozenset[str]
    """The names ``apply_plan`` leaves trainable."""
    task: str
    """'causal-lm' or 'classification' (the head the model carries)."""
    lora_targets: tuple[str, ...]
    """Leaf names of the linear layers inside the blocks (LoRA's ``target_modules``)."""
    conv1d: bool = False
    """The blocks' linear layers are transformers' ``Conv1D`` (GPT-2): LoRA needs ``fan_in_fan_out=True``."""
    plan_id: str = ""
    notes: list[str] = field(default_factory=list)
    """Remarks about how the model was found (printed in every snippet)."""

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    @property
    def model_type(self) -> str:
        return self.parts.model_type

    def group(self, name: str) -> str:
        return self.parts.group_of(name)

    def names_in(self, group: str) -> list[str]:
        return [n for n in self.names if self.group(n) == group]

    def trains(self, group: str) -> bool:
        """Whether the plan trains the parameters of ``group`` ('embeddings', 'norm', 'head', 'block:<i>', 'other')."""
        return any(n in self.trainable for n in self.names_in(group))

    def has(self, group: str) -> bool:
        return any(self.group(n) == group for n in self.names)

    @property
    def tied_head(self) -> bool:
        """The output head shares its weight with the input embeddings (then it follows the embeddings)."""
        out = self.parts.output_head()
        get_in = getattr(self.parts.model, "get_input_embeddings", None)
        inp = get_in() if get_in is not None else None
        return out is not None and inp is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0)

    @property
    def trained_blocks(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.trains(f"block:{i}")]

    def summary(self) -> str:
        """'trains blocks 9..11 + final norm + head; freezes embeddings and blocks 0..8'."""
        blocks = self.trained_blocks
        frozen_blocks = [i for i in range(self.num_layers) if i not in blocks]
        trained: list[str] = []
        frozen: list[str] = []
        if self.has("embeddings"):
            (trained if self.trains("embeddings") else frozen).append("embeddings")
        if blocks:
            trained.append(f"blocks {block_span(blocks)}")
        if frozen_blocks:
            frozen.append(f"blocks {block_span(frozen_blocks)}")
        if self.has("norm"):
            (trained if self.trains("norm") else frozen).append("final norm")
        if self.has("head"):
            (trained if self.trains("head") else frozen).append("head")
        if self.tied_head:
            (trained if self.trains("embeddings") else frozen).append("head (tied to the embeddings)")
        if self.has("other"):
            (trained if self.trains("other") else frozen).append("other parameters")
        text = "trains " + (" + ".join(trained) if trained else "nothing")
        if not frozen:
            return text + "; freezes nothing (full fine-tuning)"
        listed = frozen[0] if len(frozen) == 1 else ", ".join(frozen[:-1]) + " and " + frozen[-1]
        return f"{text}; freezes {listed}"

    def header(self, comment: str = "#") -> list[str]:
        name = self.plan.model.get("name_or_path") or self.model_type
        return [
            f"{comment} salf plan {self.plan_id} for {name} ({self.model_type}, {self.num_layers} blocks, "
            f"boundary {self.plan.boundary}, policy {self.plan.policy})",
            f"{comment} {self.summary()}",
            *(f"{comment} NOTE: {note}" for note in self.notes),
        ]


def _task_of(model: nn.Module) -> str:
    return "classification" if "ForSequenceClassification" in type(model).__name__ else "causal-lm"


def _meta_copy(model: nn.Module) -> nn.Module:
    """The same class and config on the meta device: real parameter names and shapes, no memory, no side effects."""
    with torch.device("meta"):
        return type(model)(model.config)


def _loaded_fingerprints(model: nn.Module) -> list[str]:
    """``model_fingerprint`` of ``model`` as its config says, and as salf's loader leaves it: a tokenizer without a pad
    token pads with EOS, and the loader writes that id into ``config.pad_token_id`` (``_ensure_pad_token``) before
    `salf plan` records the fingerprint (GPT-2, and base models whose config names no pad token)."""
    config = model.config
    eos = getattr(config, "eos_token_id", None)
    pads = [getattr(config, "pad_token_id", None), *(eos if isinstance(eos, (list, tuple)) else [eos])]
    original = pads[0]
    prints = []
    try:
        for pad in dict.fromkeys(p for i, p in enumerate(pads) if i == 0 or p is not None):
            config.pad_token_id = pad
            prints.append(model_fingerprint(model)["fingerprint"])
    finally:
        config.pad_token_id = original
    return prints


def _skeleton_from_plan(plan: Plan, model_path: str | None) -> tuple[nn.Module, list[str]]:
    """Build the plan's model from its config on the meta device; prefer the head whose fingerprint matches."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from salf.models.loading import load_config

    name = model_path or plan.model.get("name_or_path")
    if not name:
        raise SalfError("the plan does not say which model it was made for", "pass --model (a folder or hub name)")
    labels = plan.data.get("label_names") if plan.data.get("task") == "classification" else None
    candidates: list[tuple[Any, dict]] = []
    if labels:
        labels = [str(label) for label in labels]
        candidates.append((AutoModelForSequenceClassification, {
            "num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}))
    candidates.append((AutoModelForCausalLM, {}))
    built: list[nn.Module] = []
    for auto, kwargs in candidates:
        config = load_config(str(name), kwargs)
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
        except ValueError:  # no such head for this model type (an encoder has no causal LM)
            continue
        want = plan.model.get("fingerprint")
        if want is not None and want in _loaded_fingerprints(model):
            return model, []
        built.append(model)
    if not built:
        raise SalfError(f"cannot build {name!r} from its config", "pass --model with the folder the plan was made from")
    notes = []
    if plan.model.get("fingerprint") is not None:
        notes.append(f"{name}'s config does not match the fingerprint recorded in the plan; the names below are "
                     "this config's")
    return built[0], notes


def export_context(plan: Plan, model: nn.Module | None = None, model_path: str | None = None) -> ExportContext:
    """The plan applied (by ``apply_plan``) to a meta copy of ``model``, or of the plan's model."""
    if model is not None:
        skeleton, notes = _meta_copy(model), []
    else:
        skeleton, notes = _skeleton_from_plan(plan, model_path)
    parts = find_parts(skeleton)
    if parts.num_layers != plan.num_layers:
        raise SalfError(
            f"the plan is for {plan.num_layers} blocks but the model has {parts.num_layers}",
            "export the plan for the model it was made for (--model)",
        )
    spec = plan.freeze_spec()
    if spec.untie_head:
        # Another tool loads the model as its config says, with the head tied: naming lm_head there names the
        # embedding matrix, which the plan freezes. So the export keeps the head tied (frozen with the
        # embeddings) and says what that gives up; `salf train` (or SalfCallback, which unties) follows the plan.
        spec = replace(spec, untie_head=False)
        notes.append(f"the plan unties the output head (its own trainable copy of the embedding matrix, "
                     f"{tied_head_params(skeleton):,} "
                     "parameters, while the input embeddings stay frozen); this tool loads the model with the head "
                     "tied, so this export keeps the head tied and frozen with the embeddings. To train the untied "
                     "head, train with `salf train --plan` or add `SalfCallback(plan)` to a Hugging Face Trainer")
    report = apply_plan(skeleton, spec, parts=parts, only_freeze=False)
    try:
        names = tuple(n for n, _ in skeleton.named_parameters())
        trainable = frozenset(n for n, p in skeleton.named_parameters() if p.requires_grad)
    finally:
        report.remove()
    from transformers.pytorch_utils import Conv1D

    block_prefix = parts.blocks_name + "."
    linears = [(name, m) for name, m in skeleton.named_modules()
               if name.startswith(block_prefix) and isinstance(m, (nn.Linear, Conv1D))]
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
    return ExportContext(plan=plan, spec=spec, parts=parts, names=names, trainable=trainable,
                         task=_task_of(skeleton), lora_targets=tuple(targets),
                         conv1d=any(isinstance(m, Conv1D) for _, m in linears), plan_id=plan_fingerprint(plan),
                         notes=notes)


__all__ = ["ExportContext", "block_span", "export_context", "plan_fingerprint"]
