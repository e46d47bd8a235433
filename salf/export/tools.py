"""One writer per tool, registered in ``EXPORTERS``: LLaMA-Factory, axolotl, PEFT, torchtune, DeepSpeed.
Each turns an ``ExportContext`` into the tool's settings and notes where the tool cannot express the plan.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

from salf.errors import SalfError
from salf.export.context import ExportContext, block_span
from salf.registry import Registry

LORA_RANK = 8


LORA_ALPHA = 16.0


LORA_DROPOUT = 0.0
"""LoRA defaults of the PEFT export: those of ``salf train --lora`` (``salf.training.config.TrainConfig``)."""


TORCHTUNE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
"""Model types torchtune builds with its own ``tok_embeddings / layers / norm / output`` modules."""


Exporter = Callable[[ExportContext], str]


EXPORTERS: Registry[Exporter] = Registry("export target")


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
        notes.append(f"LLaMA-Factory trains the last or first N layers only; the plan trains blocks {block_span(blocks)}, "
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


__all__ = ["EXPORTERS", "Exporter", "LORA_ALPHA", "LORA_DROPOUT", "LORA_RANK", "REQUIRES_GRAD_ONLY", "TORCHTUNE_TYPES", "axolotl_selects", "llamafactory_selects", "peft_modules_to_save", "to_axolotl", "to_deepspeed", "to_llamafactory", "to_peft", "to_torchtune"]
