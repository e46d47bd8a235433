"""Conversational data (``salf.data.chat``): ``messages`` rows rendered with the model's chat template, the
loss on assistant tokens only, clear errors for a tokenizer without a template and for malformed turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import WORDS, save_tiny

from salf.cli import main
from salf.data.batch import IGNORE_INDEX
from salf.data.encode import load_task_data
from salf.errors import SalfError
from salf.models.loading import tiny_tokenizer

# The version matrix (scripts/version_matrix.sh) runs these on the lowest allowed and the newest dependencies.
pytestmark = pytest.mark.matrix

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
"""A minimal ChatML-like template for the tiny word-level tokenizer (its markers become <unk> words)."""


def chat_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        rows.append({"messages": [
            {"role": "system", "content": "the small cat"},
            {"role": "user", "content": f"{a} sat on the mat"},
            {"role": "assistant", "content": f"{b} ran"},
            {"role": "user", "content": f"{b} flew"},
            {"role": "assistant", "content": f"{a} swam in the sea"},
        ]})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tokenizer():
    tok = tiny_tokenizer([" ".join(WORDS)], vocab_size=64)
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_loss_covers_only_the_assistant_tokens(tmp_path, tokenizer, suffix):
    data = load_task_data(write(tmp_path / f"chat{suffix}", chat_rows()), tokenizer)
    assert data.task == "completion" and data.extra["format"] == "messages"
    first = data.data[0]
    targets = [t for t, label in zip(first["input_ids"], first["labels"]) if label != IGNORE_INDEX]
    # both assistant answers and their end-of-turn marker, nothing of the system, user or role markers
    assert tokenizer.decode(targets) == tokenizer.decode(tokenizer("cat ran </s> the swam in the sea </s>",
                                                                     add_special_tokens=False)["input_ids"])
    assert first["labels"][: first["input_ids"].index(tokenizer.convert_tokens_to_ids("sat"))] == \
        [IGNORE_INDEX] * first["input_ids"].index(tokenizer.convert_tokens_to_ids("sat"))


def test_tokenizer_without_a_template_is_refused(tmp_path, tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(SalfError, match="has no chat template") as e:
        load_task_data(write(tmp_path / "chat.jsonl", chat_rows()), tokenizer)
    assert "prompt/completion" in e.value.fix


@pytest.mark.parametrize("turns, problem", [
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}],
     "a system turn after the first"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "a turn without text content"),
    ([], "not a non-empty list"),
])
def test_malformed_turns_name_the_rows_and_the_problem(tmp_path, tokenizer, turns, problem):
    rows = chat_rows(3)
    rows[1] = {"messages": turns}
    with pytest.raises(SalfError, match=problem) as e:
        load_task_data(write(tmp_path / "chat.jsonl", rows), tokenizer)
    assert "rows 2" in str(e.value) and "assistant" in e.value.fix


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{{ messages | length }}"
    with pytest.raises(SalfError, match="renders a conversation's first turns differently"):
        load_task_data(write(tmp_path / "chat.jsonl", chat_rows()), tokenizer)


def test_plan_and_train_on_messages_with_a_tiny_model(tmp_path, capsys):
    folder = save_tiny(tmp_path, "llama")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    data = write(tmp_path / "chat.jsonl", chat_rows(16))
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", str(folder), "--data", str(data), "--out", str(plan), "--no-progress",
                 "--sample-size", "16"]) == 0, capsys.readouterr().err
    assert main(["train", "--model", str(folder), "--data", str(data), "--plan", str(plan), "--out",
                 str(tmp_path / "run"), "--max-steps", "2", "--no-progress"]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == "completion" and metrics["steps"] == 2
