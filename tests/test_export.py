"""``salf export``: every tool's snippet freezes exactly the plan's parameters (or says where it cannot).

Each export is applied to a tiny model (``salf.models.tiny``) and the parameters it leaves trainable are
compared with what ``salf.method.freeze.apply_plan`` leaves trainable. PEFT is installed here, so its
snippet is executed and applied with PEFT's own ``get_peft_model``. LLaMA-Factory, axolotl and torchtune
are not installed (their dependencies pin other torch / transformers versions), so their snippets are
applied with their documented matching rules, re-implemented below from their sources; DeepSpeed is
checked by its own config parser and engine only where it is importable (it is not a test dependency).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from salf.errors import SalfError
from salf.export import export_plan
from salf.export.context import plan_fingerprint
from salf.export.tools import EXPORTERS
from salf.method.freeze import apply_plan
from salf.method.plan import Plan, Prediction, model_fingerprint
from salf.models.arch import find_parts
from salf.models.tiny import tiny_model

TARGETS = ["llamafactory", "axolotl", "peft", "torchtune", "deepspeed"]
ARCHS = [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "classification"), ("qwen2", "classification"),
         ("qwen2", "causal-lm")]
# hand-built plans have no cost model behind them: a placeholder prediction (export never reads it)
NO_PREDICTION = Prediction(step_flops_ratio=1.0, step_flops_saving=0.0, backward_flops_ratio=1.0, activation_memory_ratio=1.0,
                           training_memory_ratio=1.0, trainable_params_ratio=1.0, step_flops=0.0, full_step_flops=0.0)
# trainable blocks of the 4-block tiny models: a boundary plan, a non-contiguous one, head only, full fine-tuning
PLANS = {"boundary-2": [2, 3], "non-contiguous": [1, 3], "head-only": [], "full": [0, 1, 2, 3]}


def make_model(model_type: str, task: str) -> nn.Module:
    return tiny_model(model_type, task, **({"num_labels": 3} if task == "classification" else {}))


def make_plan(model: nn.Module, blocks: list[int], name_or_path: str = "tiny", data: dict | None = None) -> Plan:
    num_layers = find_parts(model).num_layers
    full = blocks == list(range(num_layers))
    boundary = 0 if full else (blocks[0] if blocks else num_layers)
    return Plan(
        boundary=boundary, num_layers=num_layers,
        trainable={"blocks": blocks, "embeddings": full, "norm": True, "head": True},
        trace=[0.0] * (num_layers + 1), trace_std=[0.0] * (num_layers + 1), gains=[1.0] * num_layers, fit={},
        lens="logit", estimator="sufficiency-uniform", policy="knee", benefit=[], cost=[], predicted=NO_PREDICTION,
        model={**model_fingerprint(model), "name_or_path": name_or_path}, data=data or {},
    )


def salf_trainable(model: nn.Module, plan: Plan) -> set[str]:
    report = apply_plan(model, plan.freeze_spec())
    try:
        return {n for n, p in model.named_parameters() if p.requires_grad}
    finally:
        report.remove()


def comment_free(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


@pytest.fixture(params=ARCHS, ids=lambda a: f"{a[0]}-{a[1]}")
def arch(request):
    return request.param


@pytest.fixture(params=list(PLANS), ids=str)
def blocks(request):
    return PLANS[request.param]


# -- axolotl ----------------------------------------------------------------------------------------


def axolotl_rule(names, patterns) -> set[str]:
    """axolotl ``utils/freeze.py`` (``freeze_layers_except`` / ``LayerNamePattern``): every '.' not followed by
    '+' becomes a literal dot, a trailing ``[start:end]`` is a range, and a name is unfrozen when
    ``re.match`` (anchored at the start) finds the pattern. Everything else is frozen."""
    selected = set()
    for pattern in patterns:
        assert not re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$", pattern), "a range suffix would change the meaning"
        regex = re.compile(re.sub(r"\.(?!\+)", "\\.", pattern))
        selected |= {n for n in names if regex.match(n)}
    return selected


def test_axolotl_unfreezes_exactly_the_plan(arch, blocks):
    """Documented rule (axolotl is not installed): the unfrozen set equals apply_plan's trainable set."""
    model = make_model(*arch)
    plan = make_plan(model, blocks)
    text = export_plan(plan, "axolotl", model=model)
    config = yaml.safe_load(comment_free(text)) or {}
    names = [n for n, _ in model.named_parameters()]
    if "unfrozen_parameters" not in config:  # full fine-tuning: axolotl freezes nothing
        assert blocks == PLANS["full"]
        selected = set(names)
    else:
        selected = axolotl_rule(names, config["unfrozen_parameters"])
    assert selected == salf_trainable(model, plan)
    assert "NOTE: axolotl" not in text  # exact: no difference to report


# -- LLaMA-Factory ----------------------------------------------------------------------------------


def llamafactory_rule(model: nn.Module, config: dict) -> set[str]:
    """LLaMA-Factory ``model/adapter.py::_setup_freeze_tuning`` (not installed here): the trainable layer ids are
    the last N (N > 0) or first -N (N <= 0) of ``num_hidden_layers``; a parameter is trained when ``.{id}.``
    (``freeze_trainable_modules: all``) or one of ``freeze_extra_modules`` is a *substring* of its name; each
    extra module must be one of the names directly above a parameter outside the numbered layers."""
    names = [n for n, _ in model.named_parameters()]
    if config["finetuning_type"] == "full":
        return set(names)
    assert config["finetuning_type"] == "freeze"
    num_layers = model.config.num_hidden_layers
    n = int(config["freeze_trainable_layers"])
    ids = range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))
    modules = [m.strip() for m in str(config.get("freeze_trainable_modules", "all")).split(",")]
    assert modules == ["all"]
    keys = [f".{i}." for i in ids]
    non_hidden = {name.split(".")[-2] for name in names if re.search(r"\.\d+\.", name) is None}
    for extra in [m.strip() for m in str(config.get("freeze_extra_modules") or "").split(",") if m.strip()]:
        assert extra in non_hidden, f"LLaMA-Factory would refuse {extra!r}: not in {non_hidden}"
        keys.append(extra)
    return {name for name in names if any(k in name for k in keys)}


def test_llamafactory_freezes_the_plan_or_says_where_not(arch, blocks):
    """Documented rule (LLaMA-Factory is not installed): the selection equals apply_plan's, except for the
    parameters the snippet's NOTE lines count; it never trains the frozen prefix of a boundary plan."""
    model = make_model(*arch)
    plan = make_plan(model, blocks)
    text = export_plan(plan, "llamafactory", model=model)
    selected = llamafactory_rule(model, yaml.safe_load(comment_free(text)))
    wanted = salf_trainable(model, plan)
    extra, missing = selected - wanted, wanted - selected
    said_extra = re.search(r"LLaMA-Factory also trains (\d+) parameter", text)
    said_missing = re.search(r"LLaMA-Factory leaves frozen (\d+) parameter", text)
    assert len(extra) == (int(said_extra.group(1)) if said_extra else 0)
    assert len(missing) == (int(said_missing.group(1)) if said_missing else 0)
    parts = find_parts(model)
    if blocks != PLANS["full"]:  # the embeddings and the blocks below the lowest trained one stay frozen
        lowest = blocks[0] if blocks else parts.num_layers
        assert not any(parts.group_of(n) == "embeddings" for n in selected)
        assert not any(parts.group_of(n).startswith("block:") and int(parts.group_of(n)[6:]) < lowest for n in selected)
    if arch[0] == "gpt2" and blocks in (PLANS["boundary-2"], PLANS["head-only"]):
        assert selected == wanted  # ln_f is a unique name and the head is tied: exact
    if arch[0] in ("llama", "qwen2") and blocks == PLANS["boundary-2"]:
        assert missing == {"model.norm.weight"} and not extra  # 'norm' would match every block's norms


# -- PEFT -------------------------------------------------------------------------------------------


def exec_snippet(text: str) -> dict:
    scope: dict = {}
    exec(compile(text, "<export>", "exec"), scope)
    return scope


def test_peft_snippet_puts_lora_on_the_planned_blocks_only(arch, blocks):
    """PEFT's own code: the exported LoraConfig, applied with get_peft_model, trains the same parameters as
    ``salf train --lora`` with the same target modules (salf's LoRA on the plan, then apply_plan), with adapters
    on every linear layer of exactly the planned blocks."""
    from peft import get_peft_model

    from salf.training.config import TrainConfig
    from salf.training.lora import add_lora

    model = make_model(*arch)
    plan = make_plan(model, blocks)
    if not blocks:
        with pytest.raises(SalfError, match="no block"):
            export_plan(plan, "peft", model=model)
        return
    scope = exec_snippet(export_plan(plan, "peft", model=model))
    theirs = get_peft_model(make_model(*arch), scope["lora_config"])
    targets = tuple(sorted(scope["lora_config"].target_modules))  # salf's default is PEFT's per-model default
    with warnings.catch_warnings():  # salf's own LoRA leaves PEFT to set fan_in_fan_out for GPT-2's Conv1D
        warnings.simplefilter("ignore", UserWarning)
        ours = add_lora(make_model(*arch), plan.freeze_spec(), TrainConfig(lora=True, lora_target_modules=targets),
                        arch[1].replace("causal-lm", "lm"))
    apply_plan(ours, plan.freeze_spec())
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ours.named_parameters() if p.requires_grad}
    parts = find_parts(make_model(*arch))
    block_re = re.compile(re.escape(parts.blocks_name) + r"\.(\d+)\.")
    lora = [n for n in trainable if "lora_" in n]
    assert {int(block_re.search(n).group(1)) for n in lora} == set(blocks)
    # every linear layer of a planned block carries an adapter
    for i in blocks:
        block = theirs.get_base_model().get_submodule(f"{parts.blocks_name}.{i}")
        adapted = {n.rsplit(".", 1)[-1] for n, m in block.named_modules() if hasattr(m, "lora_A")}
        assert adapted == set(scope["lora_config"].target_modules)
    if arch[1] == "classification":  # the head is trained in full, through modules_to_save
        assert any("modules_to_save" in n for n in trainable)


# -- torchtune --------------------------------------------------------------------------------------


def to_torchtune(name: str) -> str | None:
    """Hugging Face -> torchtune parameter names, as torchtune's ``models/convert_weights.py::_FROM_HF`` maps
    them (prefixes only: ``model.embed_tokens`` -> ``tok_embeddings``, ``model.layers.{i}`` -> ``layers.{i}``,
    ``model.norm`` -> ``norm``, ``lm_head`` (or a classifier's ``score``) -> ``output``)."""
    for hf, tune in (("model.embed_tokens.", "tok_embeddings."), ("model.layers.", "layers."), ("model.norm.", "norm."),
                     ("lm_head.", "output."), ("score.", "output.")):
        if name.startswith(hf):
            return tune + name[len(hf):]
    return None


def module_from_names(names: list[str]) -> nn.Module:
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(torch.zeros(1)))
    return root


@pytest.mark.parametrize("arch", [a for a in ARCHS if a[0] in ("llama", "qwen2")], ids=lambda a: f"{a[0]}-{a[1]}")
def test_torchtune_snippet_on_torchtune_names(arch, blocks):
    """Documented names (torchtune is not installed): the snippet's apply_salf_plan, run on a module with
    torchtune's parameter names, trains the torchtune names of apply_plan's trainable parameters; its
    salf_adapter_params keeps the LoRA adapters of the planned blocks only."""
    model = make_model(*arch)
    plan = make_plan(model, blocks)
    scope = exec_snippet(export_plan(plan, "torchtune", model=model))
    mapping = {hf: to_torchtune(hf) for hf, _ in model.named_parameters()}
    assert None not in mapping.values()
    tune_model = module_from_names(list(mapping.values()))
    scope["apply_salf_plan"](tune_model)
    trained = {n for n, p in tune_model.named_parameters() if p.requires_grad}
    assert trained == {mapping[n] for n in salf_trainable(model, plan)}
    adapters = {f"layers.{i}.attn.q_proj.lora_a.weight": i for i in range(4)} | {"output.lora_a.weight": None}
    kept = scope["salf_adapter_params"]({name: None for name in adapters})
    assert set(kept) == {name for name, i in adapters.items() if i in blocks}


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_torchtune_refuses_architectures_it_cannot_build(model_type):
    model = make_model(model_type, "classification" if model_type == "bert" else "causal-lm")
    with pytest.raises(SalfError, match="torchtune has no"):
        export_plan(make_plan(model, [2, 3]), "torchtune", model=model)


# -- DeepSpeed --------------------------------------------------------------------------------------


def test_deepspeed_config_leaves_the_optimizer_to_the_trainer(arch):
    model = make_model(*arch)
    plan = make_plan(model, [2, 3])
    config = json.loads(export_plan(plan, "deepspeed", model=model))
    assert config["zero_optimization"]["stage"] == 2
    assert "optimizer" not in config  # the Trainer builds AdamW over the requires_grad parameters
    assert "zero_allow_untested_optimizer" not in config  # not needed: the Trainer sets it, torch AdamW is supported
    assert config["_salf"]["plan"] == plan_fingerprint(plan)


def concrete(config: dict) -> dict:
    """The Trainer's 'auto' values filled in for one process (what HfTrainerDeepSpeedConfig does)."""
    filled = json.loads(json.dumps(config).replace('"auto"', "1"))
    filled["bf16"]["enabled"] = False
    return filled


def test_deepspeed_config_parses():
    """DeepSpeed's own parser (only where deepspeed is importable; it is not a test dependency)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    model = make_model("llama", "causal-lm")
    parsed = DeepSpeedConfig(concrete(json.loads(export_plan(make_plan(model, [2, 3]), "deepspeed", model=model))))
    assert parsed.zero_optimization_stage == 2


@pytest.mark.slow
def test_deepspeed_engine_keeps_frozen_parameters_out_of_the_optimizer(monkeypatch):
    """DeepSpeed's own engine (where importable; its CPU communication op compiles on first use): a ZeRO-2
    engine built from the export, over apply_plan's trainable parameters, holds exactly those in its optimizer
    and leaves the frozen ones bit-identical after a step."""
    deepspeed = pytest.importorskip("deepspeed")
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    model = make_model("llama", "causal-lm")
    plan = make_plan(model, [2, 3])
    config = concrete(json.loads(export_plan(plan, "deepspeed", model=model)))
    apply_plan(model, plan.freeze_spec())
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2),
                                                   model_parameters=params, config=config)
    ids = torch.randint(3, 100, (1, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    held = sum(p.numel() for group in optimizer.bit16_groups for p in group)
    assert held == sum(p.numel() for p in params)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name]), name


# -- every target -----------------------------------------------------------------------------------


def test_registry_and_cli_choices_agree():
    from salf.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["export"]
    to = next(a for a in sub._actions if a.dest == "to")
    assert sorted(to.choices) == EXPORTERS.names() == sorted(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_every_snippet_carries_fingerprint_and_summary(target):
    model = make_model("llama", "causal-lm")
    plan = make_plan(model, [2, 3])
    text = export_plan(plan, target, model=model)
    assert plan_fingerprint(plan) in text
    assert "trains blocks 2..3 + final norm + head; freezes embeddings and blocks 0..1" in text


def test_summary_names_a_tied_head_and_non_contiguous_blocks():
    model = make_model("gpt2", "causal-lm")
    text = export_plan(make_plan(model, [1, 3]), "axolotl", model=model)
    assert "trains blocks 1, 3 + final norm; freezes embeddings, blocks 0, 2 and head (tied to the embeddings)" in text


def test_fingerprint_is_stable_and_ignores_the_creation_time():
    model = make_model("llama", "causal-lm")
    a, b = make_plan(model, [2, 3]), make_plan(model, [2, 3])
    b.created = "1999-01-01T00:00:00+00:00"
    assert plan_fingerprint(a) == plan_fingerprint(b)
    assert plan_fingerprint(a) != plan_fingerprint(make_plan(model, [3]))


def test_export_does_not_touch_the_model():
    model = make_model("llama", "causal-lm")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    export_plan(make_plan(model, [3]), "axolotl", model=model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_cli_export_reads_the_model_from_the_plan(tmp_path: Path, capsys):
    """`salf export PLAN --to T`: the model is rebuilt from the config the plan names (the classifier head is
    found through the plan's fingerprint); --out writes the file atomically."""
    from helpers import save_tiny

    from salf.cli import main
    from salf.models.loading import load_model

    folder = save_tiny(tmp_path, "qwen2", "classification")
    loaded = load_model(folder, "classification", label_names=["animal", "colour"])
    plan = make_plan(loaded.model, [2, 3], name_or_path=str(folder),
                     data={"task": "classification", "label_names": ["animal", "colour"]})
    plan_file = plan.save(tmp_path / "plan.json")
    assert main(["export", str(plan_file), "--to", "axolotl"]) == 0
    printed = capsys.readouterr().out
    assert '"^score."' in printed and plan_fingerprint(Plan.load(plan_file)) in printed
    assert "does not match the fingerprint" not in printed  # the classifier head was found through the plan
    out = tmp_path / "cfg" / "lora.py"
    assert main(["export", str(plan_file), "--to", "peft", "--out", str(out)]) == 0
    assert 'modules_to_save=["score"]' in out.read_text()
    assert "wrote the peft settings" in capsys.readouterr().out
    assert main(["export", str(plan_file), "--to", "torchtune", "--model", str(folder)]) == 0


def test_cli_export_errors(tmp_path: Path, capsys):
    from salf.cli import main

    assert main(["export", str(tmp_path / "missing.json"), "--to", "peft"]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "plan.json", "--to", "nemo"])


def test_export_says_when_the_config_is_not_the_planned_model(tmp_path: Path):
    from helpers import save_tiny

    folder = save_tiny(tmp_path, "llama")
    plan = make_plan(make_model("llama", "causal-lm"), [2, 3], name_or_path=str(folder))
    plan.model["fingerprint"] = "0000000000000000"
    text = export_plan(plan, "axolotl")
    assert "does not match the fingerprint recorded in the plan" in text
    with pytest.raises(SalfError, match="blocks"):
        export_plan(make_plan(make_model("llama", "causal-lm"), [2, 3], name_or_path=str(save_tiny(
            tmp_path, "llama", name="two", num_hidden_layers=2))), "axolotl")


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "deepspeed"])
def test_an_untied_head_plan_exports_the_head_tied_and_says_so(target):
    """Other tools load a tied model tied: the export keeps the head frozen with the embeddings, with a note.
    (The DeepSpeed config freezes nothing itself: SalfCallback applies the plan, untying included.)"""
    model = make_model("gemma" if target == "torchtune" else "gpt2", "causal-lm")
    plan = make_plan(model, [2, 3])
    plan.trainable["untie_head"] = True
    assert plan.freeze_spec().untie_head
    text = export_plan(plan, target, model=model)
    assert "NOTE: the plan unties the output head" in text and "salf train --plan" in text
    tied = make_plan(model, [2, 3])
    from salf.export.context import export_context

    assert export_context(plan, model=model).trainable == export_context(tied, model=model).trainable
    assert "head (tied to the embeddings)" in text  # the summary says what the export does: frozen with them


def test_export_recognises_a_model_planned_with_a_tokenizer_without_pad(tmp_path: Path):
    """`salf plan` loads the model with a tokenizer that has no pad token (GPT-2 style), pads with EOS and writes
    that id into config.pad_token_id before recording the fingerprint; the export, built from the saved config,
    still recognises the model (found by running LLaMA-Factory on the export: scripts/check_export_llamafactory.py)."""
    from helpers import WORDS, completion_data

    from salf.cli import main
    from salf.models.loading import tiny_tokenizer

    folder = tmp_path / "gpt2"
    tiny_model("gpt2", "causal-lm").save_pretrained(folder)
    tiny_tokenizer(WORDS * 2, pad=False, bos=False).save_pretrained(folder)
    data = completion_data(tmp_path / "data.jsonl", n=8)
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(folder), "--data", str(data), "--policy", "freeze-first-half",
                 "--out", str(plan_path), "--sample-size", "8", "--no-progress"]) == 0
    assert json.loads((folder / "config.json").read_text())["pad_token_id"] == 0  # the loader makes it EOS (2)
    text = export_plan(plan_path, "llamafactory", model_path=str(folder))
    assert "does not match the fingerprint" not in text
    assert "freeze_trainable_layers: 2" in text
