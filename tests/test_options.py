"""Every option once: each flag of each subcommand is one config field, with the library's default.

The parser is generated from the config dataclasses (``salf.config``), so these tests walk it: a flag
maps to exactly one field, parsing no flags builds exactly the configs the library builds by default,
older spellings still parse (with a deprecation line), and the lists of choices match the registries.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from salf.cli import HANDLERS, build_parser
from salf.config import DataConfig, PlanConfig, TraceConfig, TrainConfig
from salf.config.commands import COMMANDS, CostOptions, ExportOptions
from salf.config.fields import option_info
from salf.config.parser import add_options, build, walk


def minimal_args(options_class: type) -> list[str]:
    """The required flags and positionals of a command, each given the value 'x'."""
    args = []
    for flag in walk(options_class):
        if flag.default is dataclasses.MISSING:
            args += ["x"] if flag.info.positional else [flag.spelling, flag.info.choices[0] if flag.info.choices else "x"]
    return args


def with_required(options_class: type, args: list[str]) -> object:
    """``options_class`` built by hand with the same required values ``minimal_args`` gives the parser."""
    values: dict = {}
    for flag in walk(options_class):
        if flag.default is dataclasses.MISSING:
            node = values
            for name in flag.path[:-1]:
                node = node.setdefault(name, {})
            node[flag.path[-1]] = ["x"] if flag.info.nargs == "+" else (flag.info.choices[0] if flag.info.choices else "x")

    def make(cls: type, given: dict) -> object:
        hints = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in given.items():
            field = hints[name]
            kwargs[name] = make(field.default_factory, value) if isinstance(value, dict) else value
        return cls(**kwargs)

    return make(options_class, values)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_flag_is_one_field_and_its_default_is_the_librarys(command):
    options_class = COMMANDS[command]
    flags = list(walk(options_class))
    spellings = [s for f in flags for s in (f.spelling, *f.info.old)]
    assert len(spellings) == len(set(spellings)), f"{command}: a flag spelled twice"
    assert len({f.path for f in flags}) == len(flags)
    parser = build_parser()
    args = parser.parse_args([command, *minimal_args(options_class)])
    # Parsing no optional flag builds exactly what the library builds by default: no default is written twice.
    assert build(options_class, args) == with_required(options_class, minimal_args(options_class))
    # Every parsed value is one field's (no flag lands nowhere, no field is fed by two flags).
    dests = {k for k in vars(args) if k != "command"}
    assert dests == {f.dest for f in flags}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_a_handler_module_with_run(command):
    import importlib

    module, _, function = HANDLERS[command].partition(":")
    run = getattr(importlib.import_module(module), function)
    import inspect

    assert list(inspect.signature(run).parameters) == ["options"]


def test_every_config_field_has_help():
    for cls in (DataConfig, TraceConfig, PlanConfig, TrainConfig, *COMMANDS.values()):
        for field in dataclasses.fields(cls):
            info = option_info(field)
            assert info is not None or field.metadata.get("group"), f"{cls.__name__}.{field.name} has no help"
            assert info is None or len(info.help) > 10


def test_the_drifted_defaults_are_one_value():
    from salf.config.plan import LORA_RANK
    from salf.training.recipes import RECIPES, resolve_recipe

    assert DataConfig().max_length == 256
    assert TrainConfig().save_steps == 200
    assert PlanConfig().lora_rank == TrainConfig().lora_rank == CostOptions("c").lora_rank == LORA_RANK
    # A fresh classification head gets the recipe's rate, from the CLI and from Python alike.
    resolved, _ = resolve_recipe(TrainConfig(), "classification", width=384)
    assert resolved.head_learning_rate == RECIPES["classifier"].head_learning_rate


@pytest.mark.parametrize("old, new, value, field", [
    ("--head-lr", "--output-head-lr", "0.001", ("train", "head_learning_rate")),
    ("--head-pooling", "--classifier-pooling", "mean", ("inputs", "source", "classifier_pooling")),
])
def test_old_spellings_parse_with_a_deprecation_line(capsys, old, new, value, field):
    base = ["train", "--model", "m", "--data", "d", "--out", "o"]
    parser = build_parser()
    old_args, new_args = parser.parse_args([*base, old, value]), parser.parse_args([*base, new, value])
    assert "deprecated" in capsys.readouterr().err
    assert vars(old_args) == vars(new_args)
    options = build(COMMANDS["train"], old_args)
    for name in field:
        options = getattr(options, name)
    assert str(options) == value


@pytest.mark.parametrize("old, new, value", [("--head", "--output-head", "tied"), ("--pooling", "--probe-pooling", "last")])
def test_old_plan_spellings_parse(capsys, old, new, value):
    base = ["plan", "--model", "m", "--data", "d", "--out", "o"]
    parser = build_parser()
    assert vars(parser.parse_args([*base, old, value])) == vars(parser.parse_args([*base, new, value]))
    assert f"{old} is deprecated" in capsys.readouterr().err


def test_the_old_label_mode_value_parses_with_a_deprecation_line_and_keeps_bench_recipes(capsys):
    from salf.bench.suite import BenchTask

    base = ["plan", "--model", "m", "--data", "d", "--out", "o"]
    parser = build_parser()
    old = build(COMMANDS["plan"], parser.parse_args([*base, "--label-mode", "head"]))
    assert "--label-mode head is deprecated" in capsys.readouterr().err
    assert old.inputs.data.label_mode == "classifier" == DataConfig(label_mode="head").label_mode
    # A benchmark task's recipe fingerprint (which its committed records are keyed by) does not change.
    spelt = [BenchTask(name="t", model="builtin:minilm", corpus="docstring-module", label_mode=m) for m in ("head", "classifier")]
    assert spelt[0].recipe_fingerprint() == spelt[1].recipe_fingerprint()


def test_choices_match_the_registries():
    from salf.config.commands import CLASSIFIER_POOLINGS, EXPORT_TOOLS
    from salf.config.plan import (
        CLOSED_COMPLETION,
        DEFAULT_CELLS,
        DEFAULT_ESTIMATOR,
        DEFAULT_POLICY,
        OUTPUT_HEAD_MODES,
    )
    from salf.config.trace import PROBE_POOLINGS
    from salf.export import EXPORTERS
    from salf.method.gain import ESTIMATORS
    from salf.method.lenses import LENSES, POOLERS
    from salf.method.plan import POLICIES, parse_policy
    from salf.models.heads import HEAD_MODES
    from salf.models.pooling import HEAD_POOLINGS

    assert set(PROBE_POOLINGS) == set(POOLERS)
    assert tuple(OUTPUT_HEAD_MODES) == tuple(HEAD_MODES)
    assert set(CLASSIFIER_POOLINGS) == set(HEAD_POOLINGS)
    assert set(EXPORT_TOOLS) == set(EXPORTERS.names())
    assert PlanConfig().estimator is None and PlanConfig().policy is None  # the data's label kind decides
    for cell in DEFAULT_CELLS.values():  # every default names a registered lens, estimator and policy
        LENSES.get(cell.lens), ESTIMATORS.get(cell.estimator), POLICIES.get(parse_policy(cell.policy)[0])
    help_of = {f.name: option_info(f).help for f in dataclasses.fields(PlanConfig) if option_info(f)}
    for name, table in (("policy", DEFAULT_POLICY), ("estimator", DEFAULT_ESTIMATOR)):  # every row, in words
        assert f"{table['classification']} for classification data" in help_of[name]
        assert f"{table[CLOSED_COMPLETION]} for completions with a closed set of answers" in help_of[name]
        assert f"{table['completion']} for other completions" in help_of[name]
        assert f"{table['lm']} for plain text" in help_of[name]
        assert help_of[name].count(" for ") == len(DEFAULT_CELLS)
    assert all(name in help_of["estimator"] for name in ESTIMATORS.names())
    lens_help = option_info(next(f for f in dataclasses.fields(TraceConfig) if f.name == "lens")).help
    assert all(name in lens_help for name in LENSES.names())


def test_a_bad_value_fails_when_the_config_is_made():
    from salf.errors import SalfError

    with pytest.raises(SalfError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)
    with pytest.raises(SalfError, match="--lr"):
        TrainConfig(learning_rate="fast")
    with pytest.raises(SalfError, match="cost_batch"):
        PlanConfig(cost_batch=0)
    with pytest.raises(SalfError, match="max_length"):
        DataConfig(max_length=1)


def test_a_positional_and_a_list_option_round_trip():
    parser = argparse.ArgumentParser()
    add_options(parser, ExportOptions)
    options = build(ExportOptions, parser.parse_args(["plan.json", "--to", "peft", "--json"]))
    assert (options.plan, options.to, options.output.json) == ("plan.json", "peft", True)
