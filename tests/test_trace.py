import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import salf.method.lenses as trace_mod
from salf.data.batch import collate
from salf.errors import SalfError
from salf.method.lenses import LENSES, TraceConfig, choose_lens, chunked_cross_entropy, label_kind
from salf.method.probe import stratified_folds
from salf.method.trace import Trace, trace_model
from salf.models.arch import find_parts
from salf.models.tiny import CAUSAL_TYPES, tiny_model

QUIET = dict(show_progress=False)


def lm_data(n=5, length=10, prompt=3, seed=0):
    """Equal-length data with the same number of targets each, so datum mean == token mean."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def class_data(n=40, seed=0):
    """Two classes drawn from disjoint token ranges, all starting with the same token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        c = i % 2
        ids = [1] + torch.randint(10 + 50 * c, 60 + 50 * c, (7,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": c})
    return out


def sharpened(model_type):
    """A tiny LM whose head is scaled up: large logits make softcapping and layer differences matter."""
    model = tiny_model(model_type)
    with torch.no_grad():
        find_parts(model).output_head().weight.mul_(30)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny models on a shared machine: a second intra-op thread only adds waiting (4x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert", "classification", num_labels=2)


@pytest.mark.parametrize("model_type", CAUSAL_TYPES)
def test_logit_lens_at_last_layer_is_the_model_loss(model_type):
    model = sharpened(model_type)
    data = lm_data()
    trace = trace_model(model, data, TraceConfig(lens="logit-lens", batch_size=2, **QUIET), pad_token_id=0)
    with torch.no_grad():
        loss = model(**collate(data, 0)).loss.item()
    assert trace.lens == "logit-lens" and trace.num_layers == 4
    assert trace.per_datum.shape == (5, 5)
    assert trace.mean[-1] == pytest.approx(loss, abs=1e-4)


def test_gemma2_softcapping_is_part_of_the_lens(monkeypatch):
    model = sharpened("gemma2")
    data = lm_data()
    capped = trace_model(model, data, TraceConfig(lens="logit-lens", **QUIET), 0)
    monkeypatch.setattr(model.config, "final_logit_softcapping", None)
    uncapped = trace_model(model, data, TraceConfig(lens="logit-lens", **QUIET), 0)
    assert abs(capped.mean[-1] - uncapped.mean[-1]) > 1e-2


def test_chunked_cross_entropy_matches_torch(monkeypatch):
    # Small row pieces too, so both the vocabulary and the token loops take several turns.
    monkeypatch.setattr(trace_mod, "_MAX_LOGIT_ELEMENTS", 20)
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (
        torch.randn(50, 16, generator=g),
        torch.randn(37, 16, generator=g),
        torch.randn(37, generator=g),
    )
    y = torch.randint(0, 37, (50,), generator=g)
    expected = F.cross_entropy(x @ weight.T + bias, y, reduction="none")
    got = chunked_cross_entropy(x, weight, bias, y, vocab_chunk=5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "phi"])  # phi's head has a bias
def test_chunked_vocab_trace_equals_unchunked(model_type):
    model = sharpened(model_type)
    data = lm_data()
    whole = trace_model(model, data, TraceConfig(lens="logit-lens", vocab_chunk=8192, **QUIET), 0)
    chunked = trace_model(model, data, TraceConfig(lens="logit-lens", vocab_chunk=7, **QUIET), 0)
    np.testing.assert_allclose(chunked.per_datum, whole.per_datum, atol=1e-5)


def test_basis_cosine_reads_normed_states_against_head_rows():
    model = tiny_model("llama")
    data = lm_data()
    trace = trace_model(model, data, TraceConfig(lens="basis-cosine", **QUIET), 0)
    assert trace.lens == "basis-cosine"
    assert np.all(trace.per_datum >= 0) and np.all(trace.per_datum <= 2)
    # At l = L: HF's last hidden state is already normed; score it by hand.
    batch = collate(data, 0)
    with torch.no_grad():
        last = model(**batch, output_hidden_states=True).hidden_states[-1]
    weight = model.get_output_embeddings().weight
    expected = []
    for row in range(len(data)):
        targets = batch["labels"][row, 1:]
        t = (targets != -100).nonzero(as_tuple=True)[0]
        cos = F.cosine_similarity(last[row, t], weight[targets[t]], dim=-1)
        expected.append((1 - cos).mean().item())
    np.testing.assert_allclose(trace.per_datum[:, -1], expected, atol=1e-5)


def test_probe_on_separable_classes(bert):
    data = class_data()
    trace = trace_model(bert, data, TraceConfig(probe_folds=4, **QUIET), 0)
    assert trace.lens == "probe" and trace.pooling == "first"
    assert trace.per_datum.shape == (40, 5) and trace.n_data == 40
    assert np.all(np.isfinite(trace.per_datum)) and np.all(trace.per_datum >= 0)
    # The first token is the same for every datum before any block: the probe can only guess.
    np.testing.assert_allclose(trace.per_datum[:, 0], math.log(2), atol=1e-6)
    assert trace.mean[-1] < 0.6 * math.log(2)
    pooled = trace_model(bert, data, TraceConfig(pooling="mean", probe_folds=4, **QUIET), 0)
    assert pooled.pooling == "mean"
    assert pooled.mean[0] < 0.6 * math.log(2)  # the token mix itself separates the classes


def test_probe_needs_two_classes_and_enough_data(bert):
    one_class = [dict(d, labels=0) for d in class_data(20)]
    with pytest.raises(SalfError, match="2 classes"):
        trace_model(bert, one_class, TraceConfig(**QUIET), 0)
    with pytest.raises(SalfError, match="at least 10 data"):
        trace_model(bert, class_data(6), TraceConfig(probe_folds=5, **QUIET), 0)


def test_stratified_folds_cover_every_datum_once():
    labels = np.array([0] * 7 + [1] * 5 + [2] * 3)
    folds = stratified_folds(labels, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(15))
    for fold in folds:
        assert len(set(labels[fold])) >= 2


def test_lens_auto_choice_and_mismatches():
    lm, classifier = (
        find_parts(tiny_model("llama")),
        find_parts(tiny_model("bert", "classification", num_labels=2)),
    )
    causal_classifier = find_parts(tiny_model("llama", "classification", num_labels=2))
    assert choose_lens(lm, "completion", None) == "logit-lens"  # salf.config.plan.DEFAULT_LENS, by the data's row
    assert choose_lens(lm, "completion-closed", None) == "basis-cosine"
    assert choose_lens(lm, "lm", None) == "logit-lens"
    assert choose_lens(causal_classifier, "classification", None) == "probe"
    assert choose_lens(classifier, "classification", None) == "probe"
    with pytest.raises(SalfError, match="probe"):
        choose_lens(classifier, "classification", "logit-lens")
    with pytest.raises(SalfError, match="probe") as err:
        choose_lens(causal_classifier, "completion", "logit-lens")
    assert "language-model head" in str(err.value)
    with pytest.raises(SalfError):
        choose_lens(classifier, "completion", None)
    with pytest.raises(SalfError, match="class labels"):
        choose_lens(lm, "lm", "probe")


def test_label_kind_rejects_mixed_and_empty_data():
    assert label_kind(class_data(2)) == "classes"
    assert label_kind(lm_data(2)) == "tokens"
    with pytest.raises(SalfError, match="mix"):
        label_kind(class_data(2) + lm_data(2))
    with pytest.raises(SalfError, match="no data"):
        label_kind([])


def test_unknown_lens_lists_the_known_ones():
    from salf.api import check_plan_config
    from salf.config import PlanConfig

    with pytest.raises(SalfError) as err:  # checked before a model is loaded (configs import no registries)
        check_plan_config(PlanConfig(trace=TraceConfig(lens="x-ray")))
    for name in LENSES.names():
        assert name in str(err.value)
    assert {"logit-lens", "basis-cosine", "probe"} <= set(LENSES.names())


@pytest.mark.parametrize(
    "bad",
    [dict(sample_size=0), dict(batch_size=0), dict(pooling="max"), dict(probe_folds=1), dict(probe_l2=-1.0)],
)
def test_config_validation(bad):
    with pytest.raises(SalfError):
        TraceConfig(**bad)


def test_hooks_removed_and_mode_restored():
    model = tiny_model("gpt2")
    batch = collate(lm_data(), 0)
    with torch.no_grad():
        before = model(**batch).logits
    model.train()
    trace_model(model, lm_data(), TraceConfig(**QUIET), 0)
    assert model.training
    model.eval()
    parts = find_parts(model)
    for block in parts.blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)


def test_hooks_removed_when_the_lens_fails(monkeypatch):
    model = tiny_model("gpt2")

    def boom(self, layer, hidden):
        raise RuntimeError("lens failed")

    monkeypatch.setattr(trace_mod.LogitLens, "read", boom)
    with pytest.raises(RuntimeError, match="lens failed"):
        trace_model(model, lm_data(), TraceConfig(lens="logit-lens", **QUIET), 0)
    assert not any(block._forward_hooks or block._forward_pre_hooks for block in find_parts(model).blocks)


def test_sampling_and_probe_are_deterministic(bert):
    data = class_data(60)
    config = TraceConfig(sample_size=24, probe_folds=3, seed=7, **QUIET)
    first, second = trace_model(bert, data, config, 0), trace_model(bert, data, config, 0)
    assert first.indices.tolist() == sorted(set(first.indices.tolist())) and len(first.indices) == 24
    np.testing.assert_array_equal(first.indices, second.indices)
    np.testing.assert_array_equal(first.per_datum, second.per_datum)
    other = trace_model(bert, data, TraceConfig(sample_size=24, probe_folds=3, seed=8, **QUIET), 0)
    assert other.indices.tolist() != first.indices.tolist()


def test_data_without_targets_are_not_traced():
    data = lm_data(4)
    # Only position 0 is labelled: after the shift (t predicts labels[t+1]) nothing is a target.
    data[1] = dict(data[1], labels=[5] + [-100] * 9)
    trace = trace_model(tiny_model("gpt2"), data, TraceConfig(**QUIET), 0)
    assert trace.indices.tolist() == [0, 2, 3]
    assert trace.n_tokens == 30
    with pytest.raises(SalfError, match="target"):
        trace_model(tiny_model("gpt2"), [data[1]], TraceConfig(**QUIET), 0)


def test_trace_json_round_trip():
    trace = trace_model(tiny_model("gpt2"), lm_data(), TraceConfig(lens="logit-lens", **QUIET), 0)
    again = Trace.from_dict(json.loads(json.dumps(trace.to_dict())))
    np.testing.assert_array_equal(again.per_datum, trace.per_datum)
    np.testing.assert_array_equal(again.mean, trace.mean)
    np.testing.assert_array_equal(again.indices, trace.indices)
    assert (again.lens, again.pooling, again.num_layers, again.n_data) == ("logit-lens", "targets", 4, 5)
    assert trace.to_dict()["std"] == pytest.approx(np.std(trace.per_datum, axis=0).tolist())


def test_chance_level_is_the_entropy_of_what_the_lens_predicts(bert):
    probe = trace_model(bert, class_data(), TraceConfig(probe_folds=4, **QUIET), 0)
    assert probe.chance == pytest.approx(math.log(2))  # two balanced classes
    data = lm_data()
    targets = np.array([t for d in data for t in d["labels"][1:] if t != -100])
    _, counts = np.unique(targets, return_counts=True)
    p = counts / counts.sum()
    logit = trace_model(tiny_model("gpt2"), data, TraceConfig(lens="logit-lens", **QUIET), 0)
    assert logit.chance == pytest.approx(float(-(p * np.log(p)).sum()))
    assert trace_model(tiny_model("gpt2"), data, TraceConfig(lens="basis-cosine", **QUIET), 0).chance is None
    assert Trace.from_dict(json.loads(json.dumps(logit.to_dict()))).chance == logit.chance


def answer_data(n=40, seed=0, answers=((7, 2), (9, 2)), prompt_lengths=(5, 8)):
    """Label-word style completions: prompts of two lengths whose last token tells the answer (the rest is noise),
    then the answer's tokens (a closed set), as ``salf.data.encode`` writes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        c, length = i % len(answers), prompt_lengths[(i // 2) % len(prompt_lengths)]
        prompt = [1] + torch.randint(10, 110, (length - 2,), generator=g).tolist() + [120 + c]
        out.append({"input_ids": prompt + list(answers[c]), "labels": [-100] * length + list(answers[c])})
    return out


def test_closed_answers_tell_label_words_from_open_completions_and_text():
    from salf.method.lenses import RARE_ANSWER, answer_classes, closed_answers

    closed = answer_data()
    assert closed_answers(closed)
    unique = [{"input_ids": d["input_ids"][:-2] + [20 + i, 2], "labels": d["labels"][:-2] + [20 + i, 2]}
              for i, d in enumerate(closed)]
    assert not closed_answers(unique)
    text = [{"input_ids": d["input_ids"], "labels": list(d["input_ids"])} for d in closed]
    assert not closed_answers(text)
    # an answer seen too rarely to be cross-fitted joins the rare class
    assert answer_classes(closed[:4] + unique[:3], 2) == ["7 2", "9 2", "7 2", "9 2", *[RARE_ANSWER] * 3]


def test_answer_probe_reads_the_answer_position_and_finds_separable_answers():
    model = tiny_model("llama")
    data = answer_data()
    trace = trace_model(model, data, TraceConfig(lens="answer-probe", **QUIET), 0)
    assert trace.lens == "answer-probe" and trace.per_datum.shape == (40, model.config.num_hidden_layers + 1)
    assert trace.chance == pytest.approx(math.log(2))
    # the last prompt token tells the answer, so every latent space read there does
    assert trace.mean.max() < 0.5 * trace.chance
    # the state read is the one at the last prompt token: shuffle everything before it, nothing changes
    lens = LENSES.get("answer-probe")(find_parts(model), TraceConfig(**QUIET), data)
    batch = collate(data[:4], 0)
    lens.begin_batch(torch.arange(4), batch)
    assert lens._answer_at.tolist() == [4, 4, 7, 7]


def test_answer_probe_refuses_open_completions():
    model = tiny_model("llama")
    with pytest.raises(SalfError, match="answers repeat") as e:
        trace_model(model, lm_data(20), TraceConfig(lens="answer-probe", **QUIET), 0)
    assert "logit-lens" in e.value.fix
    # not a default: closed answers are read by the basis cosine, open ones and plain text by the logit lens
    # (salf.config.plan.DEFAULT_CELLS)
    assert trace_model(model, answer_data(), TraceConfig(**QUIET), 0).lens == "basis-cosine"
    assert trace_model(model, lm_data(20), TraceConfig(**QUIET), 0).lens == "logit-lens"
    text = [{"input_ids": d["input_ids"], "labels": list(d["input_ids"])} for d in lm_data()]
    assert trace_model(model, text, TraceConfig(**QUIET), 0).lens == "logit-lens"


def test_default_cell_key_splits_completions_by_their_answers():
    from salf.config.plan import CLOSED_COMPLETION, DEFAULT_CELLS
    from salf.method.lenses import default_cell_key

    closed = answer_data()
    assert default_cell_key(closed) == CLOSED_COMPLETION
    unique = [{"input_ids": d["input_ids"][:-2] + [20 + i, 2], "labels": d["labels"][:-2] + [20 + i, 2]}
              for i, d in enumerate(closed)]
    assert default_cell_key(unique) == "completion"
    # answers cut off by the length limit are no answer, not one more repeated answer
    cut = [{"input_ids": d["input_ids"], "labels": [-100] * len(d["labels"])} for d in closed]
    one_repeated = [d for d in closed if d["labels"][-2] == 7][:10] + unique[:30]  # 10 of 40 repeat one answer
    assert default_cell_key(one_repeated) == "completion"
    assert default_cell_key(one_repeated + cut) == "completion"
    assert default_cell_key([{"input_ids": d["input_ids"], "labels": list(d["input_ids"])} for d in closed]) == "lm"
    assert default_cell_key([{"input_ids": d["input_ids"], "labels": i % 2} for i, d in enumerate(closed)]) == (
        "classification")
    assert set(DEFAULT_CELLS) == {"classification", CLOSED_COMPLETION, "completion", "lm"}


def test_answer_lens_is_the_heads_loss_over_the_answer_set():
    from salf.method.lenses import AnswerSetLens

    model = tiny_model("llama")
    data = answer_data()
    trace = trace_model(model, data, TraceConfig(lens="answer-lens", **QUIET), 0)
    assert trace.lens == "answer-lens" and trace.per_datum.shape == (40, model.config.num_hidden_layers + 1)
    # answers (7, 2) and (9, 2), half each: the first token is a fair coin, the second is certain
    assert trace.chance == pytest.approx(math.log(2) / 2)
    lens = AnswerSetLens(find_parts(model), TraceConfig(**QUIET), data)
    assert {j: c.tolist() for j, c in lens.candidates.items()} == {0: [7, 9], 1: [2]}
    # at the top layer: the model's own logits at the answer positions, softmax over the candidates only
    datum = data[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([datum["input_ids"]])).logits[0]
    at = [t - 1 for t, y in enumerate(datum["labels"]) if y != -100]  # position t - 1 predicts token t
    first = torch.log_softmax(logits[at[0], [7, 9]], dim=-1)[[7, 9].index(datum["labels"][at[0] + 1])]
    expected = (-first.item() + 0.0) / 2  # the second answer token has one candidate: no loss
    assert trace.per_datum[trace.indices.tolist().index(0), -1] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(SalfError, match="answer lens needs completions whose answers repeat"):
        trace_model(model, lm_data(20), TraceConfig(lens="answer-lens", **QUIET), 0)
