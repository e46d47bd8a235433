"""salf.data (files, tasks, encode): local files -> tokenized TaskData, every shape, every user mistake."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from salf.data.batch import IGNORE_INDEX, collate
from salf.data.encode import load_task_data
from salf.data.files import records_from_file
from salf.data.tasks import DataConfig, TaskData, split_holdout
from salf.errors import SalfError
from salf.models.loading import minilm_path, tiny_tokenizer
from salf.models.tiny import tiny_model

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "fast", "red", "blue", "green", "sky", "is"]
BOS, EOS = 1, 2


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    # Keep the arrow caches datasets writes for every file out of the user's HF cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer([" ".join(WORDS)] * 2 + ["label : positive negative neutral"])


@pytest.fixture(scope="module")
def bert_tok():
    return AutoTokenizer.from_pretrained(minilm_path())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def plain_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def load(path, tok, **config) -> TaskData:
    return load_task_data(path, tok, DataConfig(**config))


CLS_ROWS = [
    {"text": "the cat sat", "label": "pos"},
    {"text": "a dog ran fast", "label": "neg"},
    {"text": "the sky is blue", "label": "pos"},
    {"text": "green mat", "label": "mid"},
]


# ----------------------------------------------------------------------------- formats and shapes


def test_jsonl_lm_labels_are_the_ids(tmp_path, tok):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "the cat sat"}, {"text": "a dog ran fast on the mat"}])
    td = load(path, tok)
    assert td.task == "lm" and td.label_names is None and len(td) == 2
    first = td.data[0]
    assert first["input_ids"] == [BOS, *plain_ids(tok, "the cat sat")]
    assert first["labels"] == first["input_ids"]
    assert td.n_truncated == 0 and td.source == str(path)


def test_csv_classification_maps_sorted_labels(tmp_path, tok):
    path = tmp_path / "cls.csv"
    path.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in CLS_ROWS))
    td = load(path, tok)
    assert td.task == "classification"
    assert td.label_names == ["mid", "neg", "pos"]
    assert [d["labels"] for d in td.data] == [2, 1, 2, 0]
    assert td.data[1]["input_ids"] == [BOS, *plain_ids(tok, "a dog ran fast")]


def test_integer_labels_sort_as_numbers(tmp_path, tok):
    rows = [{"text": "the cat", "label": n} for n in (10, 2, 1, 2)]
    td = load(write_jsonl(tmp_path / "n.jsonl", rows), tok)
    assert td.label_names == ["1", "2", "10"]
    assert [d["labels"] for d in td.data] == [2, 1, 0, 1]


def test_parquet_completion_masks_the_prompt(tmp_path, tok):
    path = tmp_path / "c.parquet"
    table = pa.table({"prompt": ["the cat sat on", "a dog"], "completion": [" the mat", " ran fast"]})
    pq.write_table(table, path)
    td = load(path, tok)
    assert td.task == "completion"
    for datum, (prompt, completion) in zip(td.data, [("the cat sat on", " the mat"), ("a dog", " ran fast")]):
        context = [BOS, *plain_ids(tok, prompt)]
        target = [*plain_ids(tok, completion), EOS]
        assert datum["input_ids"] == context + target
        assert datum["labels"] == [IGNORE_INDEX] * len(context) + target


def test_loss_only_on_completion_tokens(tmp_path, tok):
    """The model's own loss on a completion datum equals cross-entropy over the completion tokens."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "the cat sat on the", "completion": " mat"}])
    datum = load(path, tok).data[0]
    model = tiny_model("llama")
    batch = collate([datum], pad_token_id=0)
    with torch.no_grad():
        out = model(**batch)
    n_context = sum(label == IGNORE_INDEX for label in datum["labels"])
    logits = out.logits[0, n_context - 1 : -1]  # positions that predict the completion tokens
    targets = torch.tensor(datum["input_ids"][n_context:])
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(logits, targets), atol=1e-6)
    # and it differs from the loss over every token, so the mask matters
    everything = torch.nn.functional.cross_entropy(out.logits[0, :-1], batch["input_ids"][0, 1:])
    assert not torch.allclose(out.loss, everything)


def test_json_array_file(tmp_path, tok):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(CLS_ROWS))
    td = load(path, tok)
    assert td.task == "classification" and len(td) == 4


def test_label_words_turn_classification_into_completion(tmp_path, tok):
    path = write_jsonl(tmp_path / "w.jsonl", [{"text": "the cat", "label": "positive"}, {"text": "a dog", "label": "negative"}])
    td = load(path, tok, label_mode="words")
    assert td.task == "completion" and td.label_names == ["negative", "positive"]
    datum = td.data[0]
    prompt = [BOS, *plain_ids(tok, "the cat" + "\nLabel:")]
    assert datum["input_ids"][: len(prompt)] == prompt
    targets = [t for t in datum["labels"] if t != IGNORE_INDEX]
    assert targets == [*plain_ids(tok, " positive"), EOS]
    assert tok.decode(targets[:-1]).strip() == "positive"


def test_explicit_field_names_and_task(tmp_path, tok):
    path = write_jsonl(tmp_path / "f.jsonl", [{"body": "the cat sat", "y": "a"}, {"body": "a dog", "y": "b"}])
    td = load(path, tok, text_field="body", label_field="y")
    assert td.task == "classification" and td.label_names == ["a", "b"]
    # the same file read as plain text when the task says so
    assert load(path, tok, text_field="body", task="lm").task == "lm"


def test_bert_tokenizer_keeps_cls_and_sep(tmp_path, bert_tok):
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": "hello world " * 20, "label": "x"}, {"text": "hi", "label": "y"}])
    with pytest.warns(UserWarning, match="1 of 2"):
        td = load(path, bert_tok, max_length=8)
    long, short = td.data
    assert len(long["input_ids"]) == 8
    assert long["input_ids"][0] == bert_tok.cls_token_id and long["input_ids"][-1] == bert_tok.sep_token_id
    assert short["input_ids"] == bert_tok("hi")["input_ids"]
    assert td.n_truncated == 1 and td.truncated == [0]


# ----------------------------------------------------------------------------- truncation and limits


def test_truncation_is_counted_and_warned(tmp_path, tok):
    rows = [{"text": " ".join(WORDS[: n])} for n in (2, 5, 9, 14)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.warns(UserWarning, match=r"2 of 4 examples .* longer than 6 tokens"):
        td = load(path, tok, max_length=6)
    assert td.n_truncated == 2 and td.truncated == [2, 3]
    assert [len(d["input_ids"]) for d in td.data] == [3, 6, 6, 6]
    assert td.data[3]["input_ids"] == [BOS, *plain_ids(tok, " ".join(WORDS[:5]))]


def test_no_warning_without_truncation(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(path, tok, max_length=6).n_truncated == 0


def test_completion_truncation_keeps_the_completion(tmp_path, tok):
    prompt = " ".join(WORDS)  # 14 words
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": prompt, "completion": " red sky"}])
    with pytest.warns(UserWarning, match="1 of 1"):
        td = load(path, tok, max_length=8)
    datum = td.data[0]
    target = [*plain_ids(tok, " red sky"), EOS]
    assert len(datum["input_ids"]) == 8
    assert datum["input_ids"][0] == BOS and datum["input_ids"][-3:] == target
    # the prompt lost its start, not its end (the words next to the completion)
    assert datum["input_ids"][1:-3] == plain_ids(tok, prompt)[-4:]
    assert datum["labels"] == [IGNORE_INDEX] * 5 + target


def test_tokenizer_max_length_caps_config(tmp_path):
    small = tiny_tokenizer(WORDS, model_max_length=4)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(WORDS)}])
    with pytest.warns(UserWarning):
        td = load(path, small, max_length=100)
    assert td.max_length == 4 and len(td.data[0]["input_ids"]) == 4


def test_limit_takes_a_seeded_subset_in_file_order(tmp_path, tok):
    rows = [{"text": f"{w} cat"} for w in WORDS]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    a, b = load(path, tok, limit=5, seed=3), load(path, tok, limit=5, seed=3)
    other = load(path, tok, limit=5, seed=4)
    assert len(a) == 5 and a.data == b.data and a.fingerprint == b.fingerprint
    assert a.data != other.data
    firsts = [d["input_ids"][1] for d in a.data]
    order = [tok.convert_tokens_to_ids(w) for w in WORDS]
    assert firsts == sorted(firsts, key=order.index)  # file order kept


def test_fingerprint_is_stable_and_content_sensitive(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", CLS_ROWS)
    first = load(path, tok).fingerprint
    assert load(path, tok).fingerprint == first
    changed = [dict(r) for r in CLS_ROWS]
    changed[0]["label"] = "neg"
    assert load(write_jsonl(tmp_path / "b.jsonl", changed), tok).fingerprint != first


# ----------------------------------------------------------------------------- holdout


def test_split_holdout_is_deterministic_disjoint_and_stratified(tmp_path, tok):
    rows = [{"text": f"{w} {v}", "label": lab} for (w, v), lab in zip(itertools.product(WORDS[:6], WORDS[6:10]), itertools.cycle("abc"))]
    td = load(write_jsonl(tmp_path / "s.jsonl", rows), tok)
    train, held = split_holdout(td, 0.25, seed=1)
    again = split_holdout(td, 0.25, seed=1)
    assert train.data == again[0].data and held.data == again[1].data
    assert len(train) + len(held) == len(td) == 24 and len(held) == 6
    ids = lambda part: sorted(tuple(d["input_ids"]) for d in part.data)  # noqa: E731
    assert sorted(ids(train) + ids(held)) == ids(td)
    assert {d["labels"] for d in held.data} == {0, 1, 2} == {d["labels"] for d in train.data}
    assert train.label_names == held.label_names == td.label_names
    assert len({train.fingerprint, held.fingerprint, td.fingerprint}) == 3
    assert split_holdout(td, 0.25, seed=2)[1].data != held.data


def test_split_holdout_keeps_truncation_per_part(tmp_path, tok):
    rows = [{"text": " ".join(WORDS[: n])} for n in range(1, 11)]
    with pytest.warns(UserWarning):
        td = load(write_jsonl(tmp_path / "t.jsonl", rows), tok, max_length=6)
    train, held = split_holdout(td, 0.3, seed=0)
    assert train.n_truncated + held.n_truncated == td.n_truncated == 5
    for part in (train, held):
        assert all(len(part.data[i]["input_ids"]) == 6 for i in part.truncated)


def test_split_holdout_errors(tmp_path, tok):
    td = load(write_jsonl(tmp_path / "one.jsonl", [{"text": "the cat"}]), tok)
    with pytest.raises(SalfError, match="cannot split 1 example"):
        split_holdout(td, 0.5)
    with pytest.raises(SalfError, match="between 0 and 1"):
        split_holdout(td, 1.5)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path, tok):
    with pytest.raises(SalfError, match="does not exist") as e:
        load(tmp_path / "nope.jsonl", tok)
    assert "nope.jsonl" in str(e.value)


def test_unknown_extension(tmp_path, tok):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(SalfError, match=r"extension '\.txt'") as e:
        load(path, tok)
    assert ".jsonl" in e.value.fix and ".parquet" in e.value.fix


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("w.jsonl", "\n  \n"), ("h.csv", "text,label\n")])
def test_empty_files(tmp_path, tok, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SalfError, match="empty|no rows"):
        load(path, tok)


def test_malformed_json_lines_are_reported_by_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "a" "b"}\n\n{"text": }\n[1, 2]\n{"text": "fine"}\n')
    with pytest.raises(SalfError) as e:
        load(path, tok)
    message = str(e.value)
    assert "3 bad line(s)" in message
    assert "line 2: Expecting ',' delimiter" in message
    assert "line 4: Expecting value" in message
    assert "line 5: expected a JSON object" in message
    assert "line 1" not in message and "line 6" not in message


def test_malformed_json_array(tmp_path, tok):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b",}\n]')
    with pytest.raises(SalfError, match="line 3: Expecting property name"):
        load(path, tok)


def test_json_file_with_one_object_over_several_lines(tmp_path, tok):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"data": CLS_ROWS}, indent=2))
    with pytest.raises(SalfError, match="one JSON object over several lines") as e:
        load(path, tok)
    assert "[{...}, {...}]" in e.value.fix


def test_unicode_line_separator_inside_a_string_is_fine(tmp_path, tok):
    path = write_jsonl(tmp_path / "u.jsonl", [{"text": "the cat\u2028sat"}, {"text": "dog"}])
    assert len(load(path, tok)) == 2


def test_list_labels_and_texts_are_rejected(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": [1]}\n')
    with pytest.raises(SalfError, match=r"1 row\(s\) .* list or an object in field 'label'.* \(rows 2\)"):
        load(path, tok)
    path.write_text('{"text": {"a": 1}}\n{"text": "b"}\n')
    with pytest.raises(SalfError, match=r"field 'text', where a text"):
        load(path, tok)


def test_mixed_scalar_labels_are_one_class_per_spelling(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n{"text": "c", "label": 2.0}\n')
    td = load(path, tok)
    assert td.label_names == ["1", "2"] and [d["labels"] for d in td.data] == [0, 0, 1]


def test_unreadable_file_is_a_salf_error(tmp_path, tok):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(SalfError, match="could not read .* as parquet") as e:
        load(path, tok)
    assert "same fields" in e.value.fix


def test_missing_fields_name_what_is_there(tmp_path, tok):
    path = write_jsonl(tmp_path / "f.jsonl", [{"sentence": "the cat", "target": "x"}])
    with pytest.raises(SalfError) as e:
        load(path, tok)
    message = str(e.value)
    assert "'sentence', 'target'" in message and "'text' (lm)" in message and "'prompt' + 'completion'" in message
    assert "text_field" in e.value.fix
    with pytest.raises(SalfError, match=r"task 'classification' needs the field\(s\) 'text', 'label'"):
        load(path, tok, task="classification")


def test_eval_label_not_seen_in_train(tmp_path, tok):
    train = load(write_jsonl(tmp_path / "train.jsonl", CLS_ROWS), tok)
    eval_rows = [{"text": "the cat", "label": "pos"}, {"text": "a dog", "label": "angry"}, {"text": "sky", "label": "zen"}]
    with pytest.raises(SalfError, match="2 row.* labels the training data does not have: 'angry', 'zen'") as e:
        load_task_data(write_jsonl(tmp_path / "eval.jsonl", eval_rows), tok, DataConfig(), train.label_names)
    assert "'mid', 'neg', 'pos'" in e.value.fix
    # eval data with a subset of the classes uses the training mapping
    ok = load_task_data(write_jsonl(tmp_path / "ok.jsonl", eval_rows[:1]), tok, DataConfig(), train.label_names)
    assert ok.label_names == train.label_names and ok.data[0]["labels"] == 2


def test_empty_text_after_tokenization(tmp_path, tok):
    rows = [{"text": "the cat", "label": "a"}, {"text": "", "label": "b"}, {"text": "   ", "label": "a"}]
    with pytest.raises(SalfError, match=r"2 row\(s\) .* no tokens after tokenization \(rows 2, 3\)"):
        load(write_jsonl(tmp_path / "e.jsonl", rows), tok)


def test_lm_row_with_nothing_to_predict(tmp_path):
    # a tokenizer without BOS: a one-token text gives no next-token target
    gpt_like = tiny_tokenizer(WORDS, bos=False)
    rows = [{"text": "the cat"}, {"text": "dog"}]
    with pytest.raises(SalfError, match=r"fewer than 2 tokens \(nothing to predict\) .* \(rows 2\)"):
        load(write_jsonl(tmp_path / "one.jsonl", rows), gpt_like)


def test_empty_completion(tmp_path, tok):
    rows = [{"prompt": "the cat", "completion": " sat"}, {"prompt": "a dog", "completion": ""}]
    with pytest.raises(SalfError, match=r"empty completion .* \(rows 2\)"):
        load(write_jsonl(tmp_path / "c.jsonl", rows), tok)


def test_missing_and_single_labels(tmp_path, tok):
    rows = [{"text": "the cat", "label": "a"}, {"text": "a dog", "label": None}]
    with pytest.raises(SalfError, match=r"have no label in field 'label' \(rows 2\)"):
        load(write_jsonl(tmp_path / "m.jsonl", rows), tok)
    rows = [{"text": "the cat", "label": "a"}, {"text": "a dog", "label": "a"}]
    with pytest.raises(SalfError, match="only one label"):
        load(write_jsonl(tmp_path / "s.jsonl", rows), tok)


def test_label_names_for_non_classification_data(tmp_path, tok):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "the cat"}])
    with pytest.raises(SalfError, match="holds 'lm' data"):
        load_task_data(path, tok, DataConfig(), ["a", "b"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(task="regression"), "unknown task"),
        (dict(label_mode="logits"), "unknown label mode"),
        (dict(label_mode="words", task="lm"), "label_mode 'words'"),
        (dict(max_length=1), "max_length"),
        (dict(limit=0), "limit"),
        (dict(text_field=""), "field name is empty"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(SalfError, match=match):
        DataConfig(**kwargs)


def test_records_from_file_returns_rows(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\nhello,1\nworld,2\n")
    assert records_from_file(path) == [{"text": "hello", "label": 1}, {"text": "world", "label": 2}]


# ----------------------------------------------------------------------------- properties

_counter = itertools.count()
TEXT = st.lists(st.sampled_from(WORDS + ["zebra", "Ünïcode", "x\u2028y", "!?"]), min_size=1, max_size=12).map(" ".join)
LABEL = st.sampled_from(["red", "green", "blue", "a label with spaces", "ünï"])


def _fresh_path(folder: Path) -> Path:
    return folder / f"p{next(_counter)}.jsonl"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(TEXT, LABEL), min_size=2, max_size=15), max_length=st.integers(2, 10))
def test_property_classification_round_trip(tmp_path, tok, rows, max_length):
    labels = [label for _, label in rows]
    if len(set(labels)) < 2:
        labels[0], labels[1] = "red", "blue"
    path = write_jsonl(_fresh_path(tmp_path), [{"text": t, "label": lab} for (t, _), lab in zip(rows, labels)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        td = load(path, tok, max_length=max_length)
    assert len(td) == len(rows)
    assert td.label_names == sorted(set(labels))
    assert [td.label_names[d["labels"]] for d in td.data] == labels
    lengths = [len(d["input_ids"]) for d in td.data]
    assert all(1 < n <= max_length for n in lengths)
    full = [1 + len(plain_ids(tok, t)) for t, _ in rows]
    assert td.n_truncated == sum(n > max_length for n in full)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=10), max_length=st.integers(3, 12))
def test_property_completion_targets(tmp_path, tok, pairs, max_length):
    path = write_jsonl(_fresh_path(tmp_path), [{"prompt": p, "completion": " " + c} for p, c in pairs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        td = load(path, tok, max_length=max_length)
    assert td.task == "completion" and len(td) == len(pairs)
    for datum, (_, completion) in zip(td.data, pairs):
        ids, labels = datum["input_ids"], datum["labels"]
        assert len(ids) == len(labels) <= max_length
        n_context = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
        assert n_context >= 1 and all(t == IGNORE_INDEX for t in labels[:n_context])
        assert labels[n_context:] == ids[n_context:]  # targets are exactly the completion tokens
        target = [*plain_ids(tok, " " + completion), EOS]
        assert labels[n_context:] == target[: len(labels) - n_context]
