"""The ``salf`` command line end to end, through ``salf.cli.main``, on tiny saved models.

Every user mistake must end in one clear message (the problem, then a ``fix:`` line), exit code 2 and
no traceback (unless ``--debug``); the happy paths must write plans and runs whose ``--json`` output
parses; the same seed must give the same trace, plan and loss history.
"""

from __future__ import annotations

import json
import shutil
import traceback

import pytest
from helpers import WORDS, completion_data, label_data, save_tiny, text_data, write_jsonl

from salf.cli import main
from salf.errors import SalfError
from salf.models.loading import tiny_tokenizer
from salf.models.tiny import tiny_model

# The version matrix (scripts/version_matrix.sh) runs these on the lowest allowed and the newest dependencies.
pytestmark = pytest.mark.matrix

FAST_TRACE = ["--no-progress", "--sample-size", "16", "--trace-batch-size", "8"]
FAST_TRAIN = ["--no-progress", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier steps printed
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clear_error(rc: int, err: str, *needles: str) -> None:
    """Exit code 2, one 'error:' line naming the problem, a 'fix:' line, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1, err
    fix_lines = [line for line in err.splitlines() if line.strip().startswith("fix: ")]
    assert len(fix_lines) == 1, err
    message = error_lines[0] + "\n" + fix_lines[0]
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def llama(work):
    return save_tiny(work, "llama")


@pytest.fixture(scope="module")
def bert(work):
    return save_tiny(work, "bert", "classification")


@pytest.fixture(scope="module")
def text_file(work):
    return text_data(work / "text.jsonl", n=24)


@pytest.fixture(scope="module")
def labels_file(work):
    return label_data(work / "labels.jsonl", n=24)


@pytest.fixture(scope="module")
def lm_plan(work, llama, text_file):
    """`salf plan --json` on the tiny llama and text data, run once for the module."""
    out = work / "lm-plan" / "plan.json"
    rc = main(["plan", "--model", str(llama), "--data", str(text_file), "--out", str(out), "--json", *FAST_TRACE])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def lm_trace(work, llama, text_file):
    """`salf trace` on the tiny llama and text data, run once for the module."""
    out = work / "lm-trace" / "trace.json"
    assert main(["trace", "--model", str(llama), "--data", str(text_file), "--out", str(out), *FAST_TRACE]) == 0
    return out


# ------------------------------------------------------------------------------------------ errors


def test_unknown_architecture(tmp_path, capsys, llama, text_file):
    model = tmp_path / "florp"
    shutil.copytree(llama, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "florp"
    (model / "config.json").write_text(json.dumps(config))
    rc, _, err = run(capsys, "plan", "--model", model, "--data", text_file, "--out", tmp_path / "p.json", *FAST_TRACE)
    assert_clear_error(rc, err, "'florp'", "salf supports", "llama")
    assert not (tmp_path / "p.json").exists()


def test_logit_lens_on_a_bert_classifier_suggests_probe(tmp_path, capsys, bert, labels_file):
    rc, _, err = run(capsys, "trace", "--model", bert, "--data", labels_file, "--lens", "logit-lens",
                     "--out", tmp_path / "t.json", *FAST_TRACE)
    assert_clear_error(rc, err, "logit-lens", "probe")


def test_empty_data_file(tmp_path, capsys, llama):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, _, err = run(capsys, "plan", "--model", llama, "--data", empty, "--out", tmp_path / "p.json", *FAST_TRACE)
    assert_clear_error(rc, err, "empty.jsonl", "is empty")


def test_malformed_json_lines_name_their_line_numbers(tmp_path, capsys, llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat sat"}\n{"text": "the dog\n{"text": "a bird flew"}\n[1, 2]\n')
    rc, _, err = run(capsys, "plan", "--model", llama, "--data", bad, "--out", tmp_path / "p.json", *FAST_TRACE)
    assert_clear_error(rc, err, "2 bad line(s)", "line 2:", "line 4:", "one JSON object per line")
    assert "line 1:" not in err and "line 3:" not in err


@pytest.mark.parametrize("rows, extra, needles", [
    ([{"txt": "the cat sat"}] * 4, [], ["cannot tell the task", "'txt'", "rename the fields"]),
    ([{"text": "the cat sat"}] * 4, ["--task", "classification"], ["needs the field(s) 'label'", "rename the fields"]),
], ids=["unknown-fields", "task-without-its-field"])
def test_missing_fields(tmp_path, capsys, llama, rows, extra, needles):
    data = write_jsonl(tmp_path / "fields.jsonl", rows)
    rc, _, err = run(capsys, "plan", "--model", llama, "--data", data, "--out", tmp_path / "p.json", *extra, *FAST_TRACE)
    assert_clear_error(rc, err, *needles)


def test_eval_labels_unseen_in_training(tmp_path, capsys, bert, labels_file):
    eval_file = label_data(tmp_path / "eval.jsonl", n=6, labels=["animal", "plant"])
    rc, _, err = run(capsys, "train", "--model", bert, "--data", labels_file, "--eval-data", eval_file,
                     "--out", tmp_path / "run", *FAST_TRAIN)
    assert_clear_error(rc, err, "3 row(s)", "'plant'", "training labels: 'animal', 'colour'")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("budget", ["1.5", "0"])
def test_budget_outside_zero_one(tmp_path, capsys, llama, text_file, budget):
    rc, _, err = run(capsys, "plan", "--model", llama, "--data", text_file, "--policy", f"budget={budget}",
                     "--out", tmp_path / "p.json", *FAST_TRACE)
    assert_clear_error(rc, err, f"budget={float(budget)} is outside (0, 1]", "budget=0.5")
    assert not (tmp_path / "p.json").exists()


def test_plan_made_for_another_model(tmp_path, capsys, lm_plan, text_file):
    shallow = save_tiny(tmp_path, "llama", num_hidden_layers=2)
    rc, _, err = run(capsys, "train", "--model", shallow, "--data", text_file, "--plan", lm_plan,
                     "--out", tmp_path / "run", *FAST_TRAIN)
    assert_clear_error(rc, err, "another model", "num_layers is 4 in the plan but 2 here", "salf plan")
    assert not (tmp_path / "run").exists()


def test_output_dir_not_empty_without_overwrite(tmp_path, capsys, llama, text_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, err = run(capsys, "train", "--model", llama, "--data", text_file, "--out", out, *FAST_TRAIN)
    assert_clear_error(rc, err, "is not empty", "overwrite")
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_debug_shows_the_traceback(tmp_path, capsys, llama):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = ["plan", "--model", str(llama), "--data", str(empty), "--out", str(tmp_path / "p.json"), *FAST_TRACE]
    assert main(argv) == 2  # without --debug: a message, no exception
    with pytest.raises(SalfError, match="is empty") as info:
        main([*argv, "--debug"])
    frames = "".join(traceback.format_exception(info.value))
    assert "salf/data/files.py" in frames and "records_from_file" in frames


# -------------------------------------------------------------------------------------- happy paths


def test_plan_then_train_on_text(tmp_path, capsys, lm_plan, llama, text_file):
    plan = json.loads(lm_plan.read_text())
    assert plan["data"]["task"] == "lm" and plan["lens"] == "logit-lens" and 0 <= plan["boundary"] <= 4
    assert lm_plan.with_suffix(".png").stat().st_size > 1000
    rc, out, err = run(capsys, "train", "--model", llama, "--data", text_file, "--plan", lm_plan,
                       "--out", tmp_path / "run", "--json", *FAST_TRAIN)
    assert rc == 0, err
    metrics = json.loads(out)  # stdout holds the JSON and nothing else
    assert metrics["steps"] == 3 and metrics["boundary"] == plan["boundary"] and metrics["task"] == "lm"
    assert metrics["data"]["path"] == f"{text_file}#train" and len(metrics["data"]["fingerprint"]) == 16
    assert metrics["eval_data"]["n"] > 0 and metrics["data"]["n"] + metrics["eval_data"]["n"] == plan["data"]["n"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train_loss"] == metrics["train_loss"]
    assert [h["step"] for h in json.loads((tmp_path / "run" / "history.json").read_text())] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["boundary"] == plan["boundary"]


def test_lora_merged_model_loads_on_its_own(tmp_path, capsys, llama, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rc, _, err = run(capsys, "train", "--model", llama, "--data", text_file, "--out", tmp_path / "full",
                     "--lora-merged", *FAST_TRAIN)
    assert_clear_error(rc, err, "merged LoRA model", "--lora")
    rc, _, err = run(capsys, "train", "--model", llama, "--data", text_file, "--out", tmp_path / "run", "--lora",
                     "--lora-merged", *FAST_TRAIN)
    assert rc == 0, err
    merged = tmp_path / "run" / "model-merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora_" in name for name, _ in model.named_parameters())  # the adapters are merged in
    assert AutoTokenizer.from_pretrained(merged)("a b").input_ids


@pytest.mark.parametrize("kind", ["completion", "words", "classification"])
def test_plan_then_train(tmp_path, capsys, kind, llama, bert):
    words = ("--label-mode", "words") if kind == "words" else ()  # label words: a closed set of answers
    if kind == "completion":
        model, data = llama, completion_data(tmp_path / "comp.jsonl", n=24)
    elif words:  # label names in the tiny tokenizer's vocabulary, so the answers differ as tokens too
        model, data = llama, label_data(tmp_path / "labels.jsonl", n=24, labels=("dog", "blue"))
    else:
        model, data = bert, label_data(tmp_path / "labels.jsonl", n=24)
    rc, out, err = run(capsys, "plan", "--model", model, "--data", data, "--out", tmp_path / "plan.json", "--json",
                       *words, *FAST_TRACE)
    assert rc == 0, err
    plan = json.loads(out)
    expected = {"completion": ("completion", "logit-lens", "sufficiency-uniform", "unsolved"),  # DEFAULT_CELLS
                "words": ("completion", "basis-cosine", "observed", "coverage=0.9"),
                "classification": ("classification", "probe", "sufficiency-uniform", "unsolved=0.75")}[kind]
    assert (plan["data"]["task"], plan["lens"], plan["estimator"], plan["policy"]) == expected
    assert plan["data"]["default_cell"] == {"words": "completion-closed"}.get(kind, kind)
    assert plan["paths"]["plan"] == str(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["boundary"] == plan["boundary"]
    rc, out, err = run(capsys, "train", "--model", model, "--data", data, "--plan", tmp_path / "plan.json",
                       "--out", tmp_path / "run", "--json", *words, *FAST_TRAIN)
    assert rc == 0, err
    metrics = json.loads(out)
    assert metrics["steps"] == 3 and metrics["boundary"] == plan["boundary"]
    if kind == "classification":
        assert 0.0 <= metrics["eval_accuracy"] <= 1.0
        assert (metrics["trainable_params"] < metrics["total_params"]) == (plan["boundary"] > 0)
    else:
        assert metrics["eval_loss"] > 0
        assert 0.0 <= metrics["eval_exact_match"] <= metrics["eval_token_accuracy"] <= 1.0


def test_a_plan_is_not_a_trace_file(tmp_path, capsys, lm_plan, llama, text_file):
    rc, _, err = run(capsys, "plan", "--model", llama, "--data", text_file, "--trace-file", lm_plan,
                     "--out", tmp_path / "plan.json", *FAST_TRACE)
    assert_clear_error(rc, err, f"{lm_plan} is not a trace written by `salf trace`", "salf trace --model")


def test_table_output_without_json(tmp_path, capsys, lm_trace, llama, text_file):
    rc, out, err = run(capsys, "plan", "--model", llama, "--data", text_file, "--trace-file", lm_trace,
                       "--policy", "budget=0.6", "--out", tmp_path / "plan.json", *FAST_TRACE)
    assert rc == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["cost"][plan["boundary"]] <= 0.6
    assert f"boundary k={plan['boundary']} of 4" in out and "<- plan" in out and "wrote " in out
    # the data's row of the defaults, whichever options were given (here the policy)
    assert plan["data"]["default_cell"] == "lm"
    assert "defaults for plain text: lens logit-lens, estimator sufficiency-uniform, policy unsolved" in out


# -------------------------------------------------------------------------------------- determinism


def test_same_seed_same_trace_plan_and_loss_history(tmp_path, capsys, lm_trace, lm_plan, llama, text_file):
    again = tmp_path / "trace.json"
    assert main(["trace", "--model", str(llama), "--data", str(text_file), "--out", str(again), *FAST_TRACE]) == 0
    traces = [json.loads(lm_trace.read_text()), json.loads(again.read_text())]
    for t in traces:
        assert t.pop("seconds") > 0
    assert traces[0] == traces[1] and len(traces[0]["per_datum"]) == 16
    assert traces[0]["mean"] == json.loads(lm_plan.read_text())["trace"]  # the plan traced the same way

    again = tmp_path / "plan.json"
    argv = ["plan", "--model", str(llama), "--data", str(text_file), "--out", str(again), *FAST_TRACE]
    assert main(argv) == 0
    first, second = json.loads(lm_plan.read_text()), json.loads(again.read_text())
    assert second["boundary"] == first["boundary"] and second["gains"] == first["gains"]

    histories = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        argv = ["train", "--model", str(llama), "--data", str(text_file), "--plan", str(lm_plan), "--out", str(out),
                "--seed", "3", *FAST_TRAIN]
        assert main(argv) == 0
        histories.append([(h["step"], h["loss"], h["tokens"]) for h in json.loads((out / "history.json").read_text())])
    assert len(histories[0]) == 3 and histories[0] == histories[1]
    capsys.readouterr()


# -------------------------------------------------------------------------------------- truncation


def test_sequences_longer_than_the_model_are_truncated_counted_and_warned(tmp_path, capsys):
    # GPT-2 has learned positions: a sequence past n_positions would index outside them. The saved
    # tokenizer says nothing about the limit (model_max_length "unlimited"), as many real ones do.
    model_dir = tmp_path / "gpt2"
    tiny_model("gpt2", n_positions=16).save_pretrained(model_dir)
    tiny_tokenizer(WORDS * 2, model_max_length=int(1e30)).save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(["the cat sat"] * 10)}] * 6
                       + [{"text": "a short one"}] * 6)
    with pytest.warns(UserWarning, match=r"6 of 12 examples .* longer than 16 tokens and were truncated"):
        rc, _, err = run(capsys, "plan", "--model", model_dir, "--data", data, "--out", tmp_path / "plan.json",
                         *FAST_TRACE)
    assert rc == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["data"]["n_truncated"] == 6
    with pytest.warns(UserWarning, match="truncated"):
        rc, out, err = run(capsys, "train", "--model", model_dir, "--data", data, "--out", tmp_path / "run",
                           "--json", *FAST_TRAIN)
    assert rc == 0, err
    assert json.loads(out)["padded_tokens"] <= 3 * 4 * 16  # no batch longer than the model's 16 positions


# --------------------------------------------------------------------- beyond the paper, from the CLI


def test_per_datum_plan_and_training(tmp_path, capsys, llama, text_file):
    plan_path = tmp_path / "plan.json"
    rc, _, err = run(capsys, "plan", "--model", llama, "--data", text_file, "--out", plan_path, "--per-datum",
                     "--policy", "budget=0.8", *FAST_TRACE)
    assert rc == 0, err
    plan = json.loads(plan_path.read_text())
    assert len(plan["per_datum_boundaries"]) == len(plan["per_datum_indices"]) == 16
    assert all(0 <= k <= plan["num_layers"] for k in plan["per_datum_boundaries"])
    rc, out, err = run(capsys, "train", "--model", llama, "--data", text_file, "--plan", plan_path, "--per-datum",
                       "--out", tmp_path / "run", "--json", *FAST_TRAIN)
    assert rc == 0, err
    assert json.loads(out)["steps"] == 3


def test_per_datum_training_needs_a_per_datum_plan(tmp_path, capsys, lm_plan, llama, text_file):
    rc, _, err = run(capsys, "train", "--model", llama, "--data", text_file, "--plan", lm_plan, "--per-datum",
                     "--out", tmp_path / "run", *FAST_TRAIN)
    assert_clear_error(rc, err, "per-datum")


def test_prefix_cache_from_the_cli(tmp_path, capsys, llama, text_file):
    plan_path = tmp_path / "plan.json"
    assert run(capsys, "plan", "--model", llama, "--data", text_file, "--out", plan_path, "--policy", "budget=0.7", *FAST_TRACE)[0] == 0
    rc, out, err = run(capsys, "train", "--model", llama, "--data", text_file, "--plan", plan_path,
                       "--prefix-cache", tmp_path / "cache", "--out", tmp_path / "run", "--json", *FAST_TRAIN)
    assert rc == 0, err
    assert (tmp_path / "cache" / "manifest.json").exists()
    assert json.loads(out)["steps"] == 3


def test_head_only_plan_says_only_the_head_trains(lm_plan):
    import dataclasses

    from salf.commands.plan import PlanResult
    from salf.method.plan import Plan

    plan = Plan.load(lm_plan)
    text = PlanResult(dataclasses.replace(plan, boundary=plan.num_layers)).render()
    assert "train only the head (and the final norm)" in text and f"blocks {plan.num_layers}.." not in text


# ------------------------------------------------------------------------------ bad inputs, no traceback

@pytest.mark.parametrize("name, content, line", [
    ("latin1.jsonl", '{"text": "the cat sat"}\n{"text": "caf\u00e9 au lait"}\n', 2),
    ("latin1.csv", "text\nthe cat sat\ncaf\u00e9 au lait\n", 3),
])
def test_data_file_that_is_not_utf8(tmp_path, capsys, llama, name, content, line):
    bad = tmp_path / name
    bad.write_bytes(content.encode("latin-1"))
    rc, _, err = run(capsys, "plan", "--model", llama, "--data", bad, "--out", tmp_path / "p.json", *FAST_TRACE)
    assert_clear_error(rc, err, name, "not UTF-8", f"line {line}", "re-encode the file as UTF-8")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-0.001"), ("--head-lr", "nan")])
def test_learning_rate_must_be_a_positive_number(tmp_path, capsys, llama, text_file, flag, value):
    rc, _, err = run(capsys, "train", "--model", llama, "--data", text_file, "--out", tmp_path / "run",
                     *FAST_TRAIN, flag, value)
    assert rc == 2 and "Traceback" not in err
    error = next(line for line in err.splitlines() if ": error: " in line)
    named = {"--lr": ("--lr", "learning_rate"), "--head-lr": ("--head-lr", "head_learning_rate")}[flag]
    assert any(n in error for n in named) and "must be a positive" in error, err
    assert not (tmp_path / "run" / "metrics.json").exists()
