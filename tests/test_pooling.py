"""salf.models.pooling end to end: the masked-mean head pooler, and --classifier-pooling through loading, freezing,
tracing, planning, training and the benchmark's baselines, on tiny models (the cost model: test_cost.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import label_data, save_tiny
from test_cli import FAST_TRACE, FAST_TRAIN, assert_clear_error, run

from salf.bench.baselines import BASELINES, BaselineContext
from salf.bench.baselines_representation import cosine_change
from salf.data.batch import collate
from salf.errors import SalfError
from salf.method.freeze import FreezeSpec, apply_plan
from salf.method.lenses import TraceConfig
from salf.method.trace import trace_model
from salf.models.arch import find_parts
from salf.models.loading import load_model
from salf.models.pooling import (
    MaskedMeanPooler,
    apply_head_pooling,
    has_pooler,
    head_pooling,
    use_mean_pooling,
)
from salf.models.tiny import tiny_model

LABELS = ["animal", "colour"]


def ragged(n: int = 6, seed: int = 0) -> list[dict]:
    """Classification data of lengths 9, 8, 7, ... (padding exercised)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": [1] + torch.randint(4, 120, (8 - i % 4,), generator=g).tolist(), "labels": i % 2}
            for i in range(n)]


def mean_bert(seed: int = 0):
    return use_mean_pooling(tiny_model("bert", "classification", seed=seed, num_labels=2))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("pooling")


@pytest.fixture(scope="module")
def bert_dir(work):
    return save_tiny(work, "bert", "classification")


@pytest.fixture(scope="module")
def labels_file(work):
    return label_data(work / "labels.jsonl", n=24)


# ---------------------------------------------------------------------------------------- the pooler


def test_masked_mean_is_the_hand_computed_mean_and_ignores_padding():
    model = mean_bert()
    data = ragged()
    batch = collate(data, 0)
    with torch.no_grad():
        pooled = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        for i, d in enumerate(data):
            ids = torch.tensor([d["input_ids"]])
            alone = model.bert(input_ids=ids)  # no padding, no mask
            hidden = alone.last_hidden_state[0]
            by_hand = torch.tanh(model.bert.pooler.dense(hidden.mean(dim=0)))
            assert torch.allclose(alone.pooler_output[0], by_hand, atol=1e-6)
            assert torch.allclose(pooled[i], by_hand, atol=1e-5), f"datum {i} (length {len(d['input_ids'])})"
        # the classifier's logits do not depend on how much padding a batch carries
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        wider = collate(data + [{"input_ids": [1] * 20, "labels": 0}], 0)
        wider_logits = model(input_ids=wider["input_ids"], attention_mask=wider["attention_mask"]).logits
    assert torch.allclose(logits, wider_logits[:-1], atol=1e-5)


def test_a_deep_copy_pools_its_own_batch():
    """--lr auto trains deep copies of the model: each copy's hook must feed its own pooler the mask (it fed
    the original's, and a copy then pooled with a stale mask of another length: a shape error on e5)."""
    import copy

    model = mean_bert()
    data = ragged()
    short, long = collate(data[:1], 0), collate(data + [{"input_ids": [1] * 20, "labels": 0}], 0)
    with torch.no_grad():
        model(input_ids=long["input_ids"], attention_mask=long["attention_mask"])  # the original's last mask
        clone = copy.deepcopy(model)
        out = clone(input_ids=short["input_ids"], attention_mask=short["attention_mask"]).logits
        expected = model(input_ids=short["input_ids"], attention_mask=short["attention_mask"]).logits
    assert torch.allclose(out, expected, atol=1e-6)
    assert clone.bert.pooler.mask.shape == short["attention_mask"].shape


def test_parameters_keep_their_names_and_the_pooler_stays_in_the_head():
    plain = tiny_model("bert", "classification", num_labels=2)
    before = {n: p.shape for n, p in plain.named_parameters()}
    model = use_mean_pooling(plain)
    assert isinstance(model.bert.pooler, MaskedMeanPooler) and use_mean_pooling(model) is model  # idempotent
    assert {n: p.shape for n, p in model.named_parameters()} == before
    assert head_pooling(model) == "mean" and model.config.salf_head_pooling == "mean"
    parts = find_parts(model)
    report = apply_plan(model, FreezeSpec.from_boundary(parts.num_layers, parts.num_layers))
    try:
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
        assert report.prefix_blocks == parts.num_layers
        model.train()
        batch = collate(ragged(), 0)
        model(**batch).loss.backward()  # the head learns through the mean of a frozen body
        assert all(p.grad is not None for n, p in model.named_parameters() if n in trained)
    finally:
        report.remove()


def test_pooling_choice_errors():
    with pytest.raises(SalfError, match="no BERT-style pooler"):
        use_mean_pooling(tiny_model("llama", "classification", num_labels=2))
    assert not has_pooler(tiny_model("gpt2")) and has_pooler(tiny_model("bert", "classification", num_labels=2))
    with pytest.raises(SalfError, match="unknown head pooling"):
        apply_head_pooling(tiny_model("bert", "classification", num_labels=2), "max")
    with pytest.raises(SalfError, match="cannot be switched back"):
        apply_head_pooling(mean_bert(), "first")


# ---------------------------------------------------------------------------------------- loading


def test_load_model_applies_and_records_the_pooling(bert_dir):
    assert load_model(bert_dir, "classification", label_names=LABELS).head_pooling == "first"
    loaded = load_model(bert_dir, "classification", label_names=LABELS, head_pooling="mean")
    assert loaded.head_pooling == "mean" and isinstance(loaded.model.bert.pooler, MaskedMeanPooler)
    llama = save_tiny(bert_dir.parent, "llama", "classification")
    assert load_model(llama, "classification", label_names=LABELS).head_pooling is None  # reads the last token
    with pytest.raises(SalfError, match="unknown head pooling"):
        load_model(bert_dir, "classification", label_names=LABELS, head_pooling="max")


@pytest.mark.parametrize("model_type,task", [("gpt2", "lm"), ("llama", "classification")])
def test_mean_pooling_without_a_bert_pooler_is_refused(work, model_type, task):
    folder = save_tiny(work, model_type, "classification" if task == "classification" else "causal-lm")
    labels = {"label_names": LABELS} if task == "classification" else {}
    with pytest.raises(SalfError, match="no BERT-style pooler") as info:
        load_model(folder, task, head_pooling="mean", **labels)
    assert "--classifier-pooling first" in info.value.fix
    assert load_model(folder, task, head_pooling="first", **labels).head_pooling is None


def test_a_saved_mean_pooling_model_reloads_pooling_the_mean(tmp_path, bert_dir):
    loaded = load_model(bert_dir, "classification", label_names=LABELS, head_pooling="mean")
    with torch.no_grad():
        loaded.model.classifier.weight.normal_()  # like a trained head: not the fresh one a reload would draw
    loaded.model.save_pretrained(tmp_path / "saved")
    loaded.tokenizer.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["salf_head_pooling"] == "mean"
    again = load_model(tmp_path / "saved", "classification", label_names=LABELS)
    assert again.head_pooling == "mean" and not again.fresh_head
    batch = collate(ragged(), 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert torch.allclose(loaded.model(**inputs).logits, again.model(**inputs).logits, atol=1e-6)
    with pytest.raises(SalfError, match="cannot be switched back"):
        load_model(tmp_path / "saved", "classification", label_names=LABELS, head_pooling="first")


# ---------------------------------------------------------------------------------------- trace, baselines


def test_the_probe_lens_reads_what_the_head_reads():
    config = TraceConfig(lens="probe", sample_size=12, batch_size=4, show_progress=False)
    data = ragged(12)
    assert trace_model(tiny_model("bert", "classification", num_labels=2), data, config, 0).pooling == "first"
    traced = trace_model(mean_bert(), data, config, 0)
    assert traced.pooling == "mean" and traced.to_dict()["pooling"] == "mean"


def test_cosine_change_baseline_reads_the_token_mean_of_a_mean_pooling_head():
    model = mean_bert()
    data = ragged(12)
    ctx = BaselineContext(load=lambda: SimpleNamespace(model=model, pad_token_id=0), data=SimpleNamespace(data=data),
                          num_layers=4, cost=np.linspace(1, 0.3, 5), seed=0, batch_size=4, learning_rate=1e-4)
    importance = BASELINES.get("cosine-change").decide(ctx).details["block_cosine_change"]
    rows = []
    with torch.no_grad():  # each datum alone (no padding): the plain mean of its tokens at every latent space
        for d in data:
            hidden = model.bert(input_ids=torch.tensor([d["input_ids"]]), output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0].mean(dim=0) for h in hidden]))
    assert importance == pytest.approx(cosine_change(torch.stack(rows).numpy()).tolist(), abs=1e-5)


# ---------------------------------------------------------------------------------------- the command line


def test_plan_and_train_with_mean_pooling_from_the_cli(tmp_path, capsys, bert_dir, labels_file):
    plan_path = tmp_path / "plan.json"
    rc, out, err = run(capsys, "plan", "--model", bert_dir, "--data", labels_file, "--classifier-pooling", "mean",
                       "--out", plan_path, "--json", *FAST_TRACE)
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["model"]["head_pooling"] == "mean" and plan["lens"] == "probe"
    # without the flag, the run takes the plan's pooling, and the saved model keeps it
    rc, out, err = run(capsys, "train", "--model", bert_dir, "--data", labels_file, "--plan", plan_path,
                       "--out", tmp_path / "run", "--json", *FAST_TRAIN)
    assert rc == 0, err
    assert json.loads(out)["boundary"] == plan["boundary"]
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["salf_head_pooling"] == "mean"
    # asking for the other pooling than the plan's is refused before anything is loaded or written
    rc, _, err = run(capsys, "train", "--model", bert_dir, "--data", labels_file, "--plan", plan_path,
                     "--classifier-pooling", "first", "--out", tmp_path / "other", *FAST_TRAIN)
    assert_clear_error(rc, err, "head pooling 'mean'", "--classifier-pooling first", "--classifier-pooling mean")
    assert not (tmp_path / "other").exists()


def test_a_first_token_plan_refuses_a_mean_pooling_model(tmp_path, capsys, bert_dir, labels_file):
    plan_path = tmp_path / "plan.json"
    assert run(capsys, "plan", "--model", bert_dir, "--data", labels_file, "--out", plan_path, *FAST_TRACE)[0] == 0
    assert json.loads(plan_path.read_text())["model"]["head_pooling"] == "first"
    rc, _, err = run(capsys, "train", "--model", bert_dir, "--data", labels_file, "--plan", plan_path,
                     "--classifier-pooling", "mean", "--out", tmp_path / "run", *FAST_TRAIN)
    assert_clear_error(rc, err, "head pooling 'first'", "--classifier-pooling mean")


def test_trace_records_the_head_pooling(tmp_path, capsys, bert_dir, labels_file):
    out = tmp_path / "trace.json"
    rc, _, err = run(capsys, "trace", "--model", bert_dir, "--data", labels_file, "--classifier-pooling", "mean",
                     "--out", out, *FAST_TRACE)
    assert rc == 0, err
    stored = json.loads(out.read_text())
    assert stored["pooling"] == "mean" and stored["model"]["head_pooling"] == "mean"
    rc, _, err = run(capsys, "plan", "--model", bert_dir, "--data", labels_file, "--trace-file", out,
                     "--out", tmp_path / "plan.json", *FAST_TRACE)
    assert_clear_error(rc, err, "traced with head pooling 'mean'", "--classifier-pooling mean")


def test_mean_pooling_on_a_causal_lm_is_a_clear_error(tmp_path, capsys, work):
    from helpers import text_data

    gpt2 = save_tiny(work, "gpt2")
    rc, _, err = run(capsys, "plan", "--model", gpt2, "--data", text_data(tmp_path / "text.jsonl"),
                     "--classifier-pooling", "mean", "--out", tmp_path / "plan.json", *FAST_TRACE)
    assert_clear_error(rc, err, "no BERT-style pooler", "--classifier-pooling first")
    assert not (tmp_path / "plan.json").exists()
