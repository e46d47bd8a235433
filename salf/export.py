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
trains and freezes. Exporters are registered by name in ``EXPORTERS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salf.errors import SalfError
from salf.fileio import fingerprint, write_atomic
from salf.method.freeze import FreezeSpec, apply_plan
from salf.method.plan import Plan, model_fingerprint
from salf.models.arch import ModelParts, find_parts
from salf.registry import Registry

LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_DROPOUT = 0.0
"""LoRA defaults of the PEFT export: those of ``salf train --lora`` (``salf.training.config.TrainConfig``)."""

TORCHTUNE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
"""Model types torchtune builds with its own ``tok_embeddings / layers / norm / output`` modules."""


def plan_fingerprint(plan: Plan) -> str:
    """A short stable hash of the plan file's content (everything but its creation time)."""
    content = {k: v for k, v in plan.to_dict().items() if k != "created"}
    return fingerprint(content)


def _span(blocks: Iterable[int]) -> str:
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
            trained.append(f"blocks {_span(blocks)}")
        if frozen_blocks:
            frozen.append(f"blocks {_span(frozen_blocks)}")
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


Exporter = Callable[[ExportContext], str]
EXPORTERS: Registry[Exporter] = Registry("export target")


# -- the planned model ------------------------------------------------------------------------------


def _task_of(model: nn.Module) -> str:
    return "classification" if "ForSequenceClassification" in type(model).__name__ else "causal-lm"


def _meta_copy(model: nn.Module) -> nn.Module:
    """The same class and config on the meta device: real parameter names and shapes, no memory, no side effects."""
    with torch.device("meta"):
        return type(model)(model.config)


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
        if want is not None and model_fingerprint(model)["fingerprint"] == want:
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


def export(plan: str, to: str, out: str | None = None, model: str | None = None, **_: Any) -> str:
    """``salf export``: print the snippet, or write it atomically to ``out``."""
    loaded = Plan.load(plan)
    text = export_plan(loaded, to, model_path=model)
    if out is None:
        return text.rstrip("\n")
    write_atomic(out, text)
    return f"wrote the {to} settings of plan {plan_fingerprint(loaded)} to {out}"


# -- shared helpers ---------------------------------------------------------------------------------


REQUIRES_GRAD_ONLY = ("this only sets requires_grad; SalfCallback also keeps autograd off in the frozen prefix when "
                      "gradient checkpointing (enable_input_require_grads) makes the embeddings' output require grad, "
                      "and keeps dropout off in frozen blocks")


def _yaml_list(items: Iterable[str], indent: str = "  ") -> list[str]:
    return [f"{indent}- {json.dumps(item)}" for item in items]


def _diff_note(tool: str, selected: set[str], ctx: ExportContext) -> list[str]:
    """Notes naming the parameters where ``tool``'s selection differs from the plan's."""
    notes = []
    extra = sorted(selected - ctx.trainable)
    missing = sorted(ctx.trainable - selected)
    if extra:
        notes.append(f"{tool} also trains {len(extra)} parameter(s) the plan freezes: {', '.join(extra[:6])}"
                     + (", ..." if len(extra) > 6 else ""))
    if missing:
        notes.append(f"{tool} leaves frozen {len(missing)} parameter(s) the plan trains: {', '.join(missing[:6])}"
                     + (", ..." if len(missing) > 6 else ""))
    return notes


# -- LLaMA-Factory ----------------------------------------------------------------------------------


def llamafactory_selects(names: Iterable[str], num_layers: int, trainable_layers: int,
                         extra_modules: Iterable[str]) -> set[str]:
    """LLaMA-Factory's freeze tuning (``_setup_freeze_tuning``) with ``freeze_trainable_modules: all``.

    Positive ``trainable_layers`` = the last N layers, negative = the first N; a parameter is trained when
    ``.{idx}.`` or one of ``extra_modules`` is a substring of its name.
    """
    if trainable_layers > 0:
        ids = range(max(0, num_layers - trainable_layers), num_layers)
    else:
        ids = range(min(-trainable_layers, num_layers))
    keys = [f".{i}." for i in ids] + list(extra_modules)
    return {n for n in names if any(k in n for k in keys)}


@EXPORTERS.register("llamafactory")
def to_llamafactory(ctx: ExportContext) -> str:
    """LLaMA-Factory YAML: ``finetuning_type: freeze`` and its three freeze settings."""
    lines = ctx.header()
    notes: list[str] = []
    L = ctx.num_layers
    if set(ctx.trainable) == set(ctx.names):
        lines += ["# the plan is full fine-tuning", "finetuning_type: full"]
        return "\n".join(lines) + "\n"
    blocks = ctx.trained_blocks
    if blocks == list(range(L - len(blocks), L)):
        n = len(blocks)
    elif blocks == list(range(len(blocks))):
        n = -len(blocks)
    else:  # non-contiguous: the top layers from the lowest trained one
        n = L - blocks[0]
        notes.append(f"LLaMA-Factory trains the last or first N layers only; the plan trains blocks {_span(blocks)}, "
                     f"so this trains blocks {blocks[0]}..{L - 1}")
    # Extra modules: LLaMA-Factory accepts the module names directly above a parameter outside the numbered
    # layers (name.split('.')[-2]) and trains every parameter whose name contains one as a substring.
    outside = [name for name in ctx.names if re.search(r"\.\d+\.", name) is None]
    extras: list[str] = []
    rejected: set[str] = set()
    for name in outside:
        if name not in ctx.trainable:
            continue
        token = name.split(".")[-2] if "." in name else name
        if token in extras or token in rejected:
            continue
        hits = {m for m in ctx.names if token in m}
        if hits <= ctx.trainable:
            extras.append(token)
        else:
            rejected.add(token)
            wrong = sorted(hits - ctx.trainable)
            kept = sorted(m for m in outside if m in ctx.trainable and m.split(".")[-2:-1] == [token])
            notes.append(f"left out {token!r}: LLaMA-Factory matches freeze_extra_modules by substring, so it would "
                         f"also train {', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}; "
                         f"so {', '.join(kept)} {'stays' if len(kept) == 1 else 'stay'} frozen")
    if ctx.task == "classification":
        notes.append("LLaMA-Factory trains causal LMs; the head names here are those of the planned classifier")
    notes += _diff_note("LLaMA-Factory", llamafactory_selects(ctx.names, L, n, extras), ctx)
    notes.append(REQUIRES_GRAD_ONLY)
    lines += [f"# NOTE: {note}" for note in notes]
    lines += [
        "finetuning_type: freeze",
        f"freeze_trainable_layers: {n}",
        "freeze_trainable_modules: all",
    ]
    if extras:
        lines.append(f"freeze_extra_modules: {','.join(extras)}")
    return "\n".join(lines) + "\n"


# -- axolotl ----------------------------------------------------------------------------------------


def axolotl_selects(names: Iterable[str], patterns: Iterable[str]) -> set[str]:
    """axolotl's ``freeze_layers_except``: ``.`` (not before ``+``) is literal, ``re.match`` from the start."""
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\.", p)) for p in patterns]
    return {n for n in names if any(c.match(n) for c in compiled)}


def _prefix_patterns(ctx: ExportContext) -> list[str]:
    """One pattern per trained group: a dotted prefix, anchored, with plain dots (axolotl escapes them)."""
    patterns: list[str] = []
    blocks = ctx.trained_blocks
    if blocks:
        alternatives = "|".join(str(b) for b in blocks)
        patterns.append(f"^{ctx.parts.blocks_name}.({alternatives})." if len(blocks) > 1
                        else f"^{ctx.parts.blocks_name}.{blocks[0]}.")
    for group in ("embeddings", "norm", "head", "other"):
        if not ctx.trains(group):
            continue
        if group == "embeddings":
            prefixes = [p for p in ctx.parts.embeddings if any(n.startswith(p + ".") for n in ctx.names)]
        elif group == "norm":
            prefixes = [ctx.parts.norm_name] if ctx.parts.norm_name else []
        elif group == "head":
            prefixes = [h for h in ctx.parts.head_names if any(n.startswith(h + ".") for n in ctx.names)]
        else:
            prefixes = [n.rsplit(".", 1)[0] if "." in n else n for n in ctx.names_in("other")]
        patterns += [f"^{p}." for p in dict.fromkeys(prefixes)]
    return patterns


@EXPORTERS.register("axolotl")
def to_axolotl(ctx: ExportContext) -> str:
    """axolotl YAML: ``unfrozen_parameters`` (everything else is frozen)."""
    lines = ctx.header()
    if set(ctx.trainable) == set(ctx.names):
        lines += ["# the plan is full fine-tuning: leave unfrozen_parameters unset"]
        return "\n".join(lines) + "\n"
    patterns = _prefix_patterns(ctx)
    notes = _diff_note("axolotl", axolotl_selects(ctx.names, patterns), ctx) + [REQUIRES_GRAD_ONLY]
    lines += [f"# NOTE: {note}" for note in notes]
    lines += ["# axolotl freezes every parameter that no pattern matches (re.match; '.' is a literal dot)"]
    lines += ["unfrozen_parameters:", *_yaml_list(patterns)]
    return "\n".join(lines) + "\n"


# -- PEFT -------------------------------------------------------------------------------------------


def peft_modules_to_save(ctx: ExportContext) -> list[str]:
    """A classifier's head modules (as ``salf train --lora``): full copies PEFT trains beside the adapters."""
    if ctx.task != "classification" or not ctx.trains("head"):
        return []
    return sorted({h.rsplit(".", 1)[-1] for h in ctx.parts.head_names if any(n.startswith(h + ".") for n in ctx.names)})


@EXPORTERS.register("peft")
def to_peft(ctx: ExportContext) -> str:
    """A PEFT ``LoraConfig``: LoRA on the planned blocks only, as ``salf train --lora`` builds it."""
    blocks = ctx.trained_blocks
    if not blocks:
        raise SalfError("the plan trains no block, so LoRA has nothing to adapt",
                        "train the head alone without PEFT (`salf train --plan`), or plan a smaller boundary")
    lines = [*ctx.header()]
    notes = []
    if ctx.trains("norm"):
        notes.append("the final norm stays frozen under LoRA (as in `salf train --lora`); add its full name "
                     f"({ctx.parts.norm_name!r}) to modules_to_save to train it")
    if ctx.task == "causal-lm" and (ctx.trains("head") or (ctx.tied_head and ctx.trains("embeddings"))):
        notes.append("the LM head stays frozen under LoRA (as in `salf train --lora`)")
    if ctx.trains("embeddings"):
        notes.append("the embeddings stay frozen under LoRA (the plan is full fine-tuning)")
    lines += [f"# NOTE: {note}" for note in notes]
    task_type = "SEQ_CLS" if ctx.task == "classification" else "CAUSAL_LM"
    save = peft_modules_to_save(ctx)
    lines += [
        "from peft import LoraConfig, TaskType, get_peft_model",
        "",
        "lora_config = LoraConfig(",
        f"    r={LORA_RANK},",
        f"    lora_alpha={LORA_ALPHA:g},",
        f"    lora_dropout={LORA_DROPOUT:g},",
        f"    target_modules={json.dumps(list(ctx.lora_targets))},  # every linear layer inside a block",
        f"    layers_to_transform={json.dumps(blocks)},  # the planned blocks; the others get no adapter",
        f"    layers_pattern={json.dumps(ctx.parts.blocks_name.rsplit('.', 1)[-1])},  # {ctx.parts.blocks_name}.<i>",
        *(["    fan_in_fan_out=True,  # the blocks use transformers' Conv1D (weights stored transposed)"]
          if ctx.conv1d else []),
        f"    modules_to_save={json.dumps(save) if save else None},",
        f"    task_type=TaskType.{task_type},",
        ")",
        "# model = get_peft_model(model, lora_config)",
    ]
    return "\n".join(lines) + "\n"


# -- torchtune --------------------------------------------------------------------------------------


_TORCHTUNE_BODY = '''\
import re

TRAINABLE_BLOCKS = frozenset({blocks})
TRAIN_EMBEDDINGS = {embeddings}  # tok_embeddings (and an output tied to it)
TRAIN_NORM = {norm}
TRAIN_OUTPUT = {output}


def salf_trainable(name: str) -> bool:
    """Whether the plan trains a parameter, by torchtune's parameter name."""
    match = re.match(r"layers\\.(\\d+)\\.", name)
    if match:
        return int(match.group(1)) in TRAINABLE_BLOCKS
    if name.startswith("tok_embeddings."):
        return TRAIN_EMBEDDINGS
    if name.startswith("norm."):
        return TRAIN_NORM
    if name.startswith("output."):
        return TRAIN_OUTPUT
    return {full}


def apply_salf_plan(model) -> None:
    """Full-finetune recipes: call on the model before the optimizer is built."""
    for name, param in model.named_parameters():
        param.requires_grad_(salf_trainable(name))


def salf_adapter_params(adapter_params: dict) -> dict:
    """LoRA recipes: the adapters of the planned blocks, for set_trainable_params(model, ...)."""
    return {{name: p for name, p in adapter_params.items() if re.match(r"layers\\.(\\d+)\\.", name)
            and int(name.split(".")[1]) in TRAINABLE_BLOCKS}}
'''


@EXPORTERS.register("torchtune")
def to_torchtune(ctx: ExportContext) -> str:
    """A Python snippet over torchtune's parameter names (torchtune's configs select no layers)."""
    if ctx.model_type not in TORCHTUNE_TYPES:
        raise SalfError(f"torchtune has no {ctx.model_type} model builder",
                        f"torchtune builds {', '.join(TORCHTUNE_TYPES)}; use --to peft or axolotl for {ctx.model_type}")
    full = set(ctx.trainable) == set(ctx.names)
    lines = ctx.header()
    lines += [
        "# torchtune's configs have no per-layer selection:",
        "# - full-finetune recipes: copy the recipe (`tune cp full_finetune_single_device my_recipe.py`) and call",
        "#   apply_salf_plan(model) in _setup_model, before the optimizer is built;",
        "# - LoRA recipes: lora_attn_modules, apply_lora_to_mlp and apply_lora_to_output act on every layer, so the",
        "#   adapters are still built in the frozen layers; in a copied recipe replace",
        "#   set_trainable_params(model, get_adapter_params(model)) with",
        "#   set_trainable_params(model, salf_adapter_params(get_adapter_params(model))): the frozen layers' adapters",
        "#   stay at their zero init (no effect on the output, but they still cost compute).",
        f"# NOTE: {REQUIRES_GRAD_ONLY}",
    ]
    if ctx.tied_head:
        lines.append("# NOTE: the output is tied to tok_embeddings (torchtune's TiedLinear has no parameter of its own)")
    body = _TORCHTUNE_BODY.format(
        blocks="{" + ", ".join(str(b) for b in ctx.trained_blocks) + "}" if ctx.trained_blocks else "()",
        embeddings=ctx.trains("embeddings"), norm=ctx.trains("norm"), output=ctx.trains("head"), full=full,
    )
    return "\n".join(lines) + "\n" + body


# -- DeepSpeed --------------------------------------------------------------------------------------


@EXPORTERS.register("deepspeed")
def to_deepspeed(ctx: ExportContext) -> str:
    """A ZeRO config (JSON) for the Hugging Face ``Trainer`` (and tools built on it) with the plan applied."""
    config = {
        "_salf": {
            "plan": ctx.plan_id,
            "model": ctx.plan.model.get("name_or_path") or ctx.model_type,
            "what": ctx.summary(),
            "how": [
                "DeepSpeed cannot freeze parameters; freeze them before deepspeed.initialize: with SalfCallback "
                "(it applies the plan when the Trainer is built), or the --to axolotl / llamafactory settings.",
                "The Hugging Face Trainer passes DeepSpeed only the parameters with requires_grad "
                "(deepspeed_init), so frozen parameters get no gradient buffer and no optimizer state; with no "
                "'optimizer' block here the Trainer builds its AdamW over them (and sets "
                "zero_allow_untested_optimizer itself).",
                "Calling deepspeed.initialize yourself: pass model_parameters=[p for p in model.parameters() "
                "if p.requires_grad] (torch AdamW is a ZeRO-supported optimizer).",
                "ZeRO-3 also shards the frozen weights (not their optimizer state, which they have none of).",
            ],
        },
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "bf16": {"enabled": "auto"},
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
    }
    return json.dumps(config, indent=2) + "\n"
