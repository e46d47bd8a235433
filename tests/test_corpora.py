"""salf.data.corpora: built-in datasets from the stdlib sources and the apt lists on this machine."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from salf.data import corpora
from salf.data.corpora import CORPORA, CorpusFiles, build_corpus
from salf.data.encode import load_task_data
from salf.data.tasks import DataConfig
from salf.errors import SalfError
from salf.models.loading import tiny_tokenizer

HAVE_APT = any(corpora.APT_LISTS.glob("*_Packages*")) and corpora.shutil.which("apt-cache") is not None
needs_apt = pytest.mark.skipif(not HAVE_APT, reason="no apt package lists on this machine (run apt-get update)")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def module_corpus(tmp_path_factory) -> CorpusFiles:
    return build_corpus("docstring_module", tmp_path_factory.mktemp("dm"))


def test_registry_names():
    assert CORPORA.names() == ["debian-bshift", "debian-name", "debian-name-section", "debian-section",
                               "debian-text", "docstring-function", "docstring-module", "docstring-module-chat"]
    with pytest.raises(SalfError, match="unknown corpus 'wikipedia'") as e:
        build_corpus("wikipedia", ".")
    assert "docstring-module" in e.value.fix


def test_docstring_module_files(module_corpus):
    files = module_corpus
    assert files.task == "classification" and files.name == "docstring-module"
    assert files.train_path.name == "docstring-module-train.jsonl"
    train, held = read(files.train_path), read(files.eval_path)
    assert (len(train), len(held)) == (files.n_train, files.n_eval)
    assert len(train) + len(held) >= 500
    assert all(set(row) == {"text", "label"} for row in train + held)
    counts = Counter(row["label"] for row in train)
    assert set(counts) == set(corpora.DOCSTRING_MODULES)
    assert max(counts.values()) <= 3 * min(counts.values())  # balanced-ish
    assert {row["label"] for row in held} == set(counts)
    texts = [row["text"] for row in train + held]
    assert len(set(texts)) == len(texts)  # deduplicated, so nothing leaks from train into eval
    assert all(corpora.MIN_TEXT_CHARS <= len(t) <= corpora.MAX_TEXT_CHARS + 4 and "\n" not in t for t in texts)
    assert 0.15 < len(held) / (len(train) + len(held)) < 0.25


def test_docstring_text_is_real_stdlib_text(module_corpus):
    # Each row is a docstring as written in the stdlib source, labelled with its own module.
    found = {d.text: d for d in corpora.stdlib_docstrings()}
    rows = read(module_corpus.train_path)
    for row in rows[:20]:
        assert found[row["text"]].module == row["label"]


def test_docstring_module_is_deterministic(module_corpus, tmp_path):
    # Parsing is deterministic (sorted files, ast order); checked on one module, since the whole
    # parse takes seconds. The full build then reuses the parse and redoes sampling and split.
    assert list(corpora._parse_docstrings(("tarfile",))) == list(corpora._parse_docstrings(("tarfile",)))
    again = build_corpus("docstring-module", tmp_path)
    assert again.train_path.read_bytes() == module_corpus.train_path.read_bytes()
    assert again.eval_path.read_bytes() == module_corpus.eval_path.read_bytes()
    other = build_corpus("docstring-module", tmp_path / "s1", seed=1)
    assert other.train_path.read_bytes() != module_corpus.train_path.read_bytes()


def test_limit_is_balanced_over_classes(tmp_path):
    files = build_corpus("docstring-module", tmp_path, limit=60)
    rows = read(files.train_path) + read(files.eval_path)
    assert len(rows) == 60
    assert set(Counter(row["label"] for row in rows).values()) == {6}
    assert {row["label"] for row in read(files.eval_path)} == set(corpora.DOCSTRING_MODULES)
    with pytest.raises(SalfError, match="at least 2"):
        build_corpus("docstring-module", tmp_path, limit=1)


def test_docstring_function_files(tmp_path):
    files = build_corpus("docstring-function", tmp_path)
    assert files.task == "completion"
    rows = read(files.train_path) + read(files.eval_path)
    assert len(rows) >= 500 and files.n_train == len(read(files.train_path))
    assert all(set(row) == {"prompt", "completion"} for row in rows)
    assert all(row["prompt"].endswith("\nName:") for row in rows)
    names = [row["completion"] for row in rows]
    assert all(n.startswith(" ") and n[1:].isidentifier() and not n[1:].startswith("__") for n in names)
    assert " assertIsNone" in names or " getLogger" in names
    again = build_corpus("docstring-function", tmp_path / "again")
    assert again.train_path.read_bytes() == files.train_path.read_bytes()


def test_corpus_files_load_as_task_data(module_corpus, tmp_path_factory):
    tok = tiny_tokenizer([row["text"] for row in read(module_corpus.train_path)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf"))
        train = load_task_data(module_corpus.train_path, tok, DataConfig(max_length=256, limit=300))
        held = load_task_data(module_corpus.eval_path, tok, DataConfig(max_length=256), train.label_names)
    assert train.task == "classification" and len(train) == 300 and train.n_truncated == 0
    assert train.label_names == sorted(corpora.DOCSTRING_MODULES) and len(held) == module_corpus.n_eval


def test_unambiguous_drops_conflicting_texts():
    pairs = [("x", "a"), ("y", "b"), ("x", "c"), ("y", "b"), ("z", "a")]
    assert corpora._unambiguous(pairs) == [("y", "b"), ("z", "a")]


def test_stanza_parser():
    dump = (
        "Package: one\nVersion: 1\nSection: contrib/net\nDescription: short one\n long line\n .\n second para\n"
        "Tag: role::program,\n use::x\n\n"
        "Package: two\nDescription: no section here\n\n"
        "Package: three\nSection: libs\nDescription: only a short one\nDescription-md5: abc\n"
    )
    assert list(corpora._stanza_packages(dump)) == [
        corpora.DebianPackage("one", "net", "short one. long line second para"),
        corpora.DebianPackage("three", "libs", "only a short one"),
    ]


def test_debian_without_apt_lists(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "APT_LISTS", tmp_path)
    monkeypatch.setattr(corpora, "_debian_packages_cached", corpora._debian_packages_cached.__wrapped__)
    with pytest.raises(SalfError, match="no Debian package lists") as e:
        build_corpus("debian_section", tmp_path / "out")
    assert "apt-get update" in e.value.fix


@needs_apt
def test_debian_section_files(tmp_path):
    files = build_corpus("debian_section", tmp_path)
    assert files.task == "classification" and files.name == "debian-section"
    train, held = read(files.train_path), read(files.eval_path)
    labels = Counter(row["label"] for row in train)
    assert len(labels) == corpora.DEBIAN_SECTIONS and "/" not in "".join(labels)
    assert max(labels.values()) <= 3 * min(labels.values())
    assert {row["label"] for row in held} == set(labels)
    assert len(train) + len(held) >= 1000
    assert all(set(row) == {"text", "label"} and row["text"] for row in train)
    again = build_corpus("debian-section", tmp_path / "again")
    assert again.train_path.read_bytes() == files.train_path.read_bytes()


@needs_apt
def test_debian_name_files(tmp_path):
    files = build_corpus("debian-name", tmp_path, limit=500)
    rows = read(files.train_path) + read(files.eval_path)
    assert files.task == "completion" and len(rows) == 500 == files.n_train + files.n_eval
    assert files.n_eval == 100
    assert all(row["prompt"].endswith("\nName:") and row["completion"].startswith(" ") for row in rows)
    names = {p.name for p in corpora.debian_packages()}
    assert all(row["completion"][1:] in names for row in rows)


def test_docstring_module_chat_asks_the_module_question_as_one_turn(module_corpus, tmp_path):
    files = build_corpus("docstring-module-chat", tmp_path, limit=300)
    rows = read(files.train_path) + read(files.eval_path)
    assert files.task == "completion" and len(rows) == 300
    by_text = {row["text"]: row["label"] for row in read(module_corpus.train_path) + read(module_corpus.eval_path)}
    for row in rows:
        system, user, assistant = row["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        text = user["content"].split("\n\n", 1)[1]
        assert assistant["content"] in corpora.DOCSTRING_MODULES and by_text.get(text, assistant["content"]) == \
            assistant["content"]


@needs_apt
def test_debian_text_is_plain_descriptions(tmp_path):
    files = build_corpus("debian-text", tmp_path, limit=300)
    rows = read(files.train_path) + read(files.eval_path)
    descriptions = {p.description for p in corpora.debian_packages()}
    assert files.task == "lm" and len(rows) == 300 and len({r["text"] for r in rows}) == 300
    assert all(set(row) == {"text"} and row["text"] in descriptions for row in rows)


@needs_apt
def test_debian_name_section_reads_the_name_alone(tmp_path):
    files = build_corpus("debian-name-section", tmp_path, limit=800)
    rows = read(files.train_path) + read(files.eval_path)
    packages = {p.name: p.section for p in corpora.debian_packages()}
    assert files.task == "classification" and len(rows) == 800
    assert all(packages[row["text"]] == row["label"] for row in rows)
    assert len({row["label"] for row in rows}) == corpora.DEBIAN_SECTIONS


def test_bigram_shift_swaps_two_adjacent_plain_words():
    import random

    sentence = "Tools to convert scanned images into text"
    shifted = corpora.bigram_shift(sentence, random.Random(0))
    a, b = sentence.split(), shifted.split()
    moved = [i for i in range(len(a)) if a[i] != b[i]]
    assert sorted(a) == sorted(b) and len(moved) == 2 and moved[1] == moved[0] + 1
    assert moved[0] >= 1 and moved[1] <= len(a) - 2, "first and last words stay in place"
    assert corpora.bigram_shift("Library - ( ) files", random.Random(0)) is None, "no two plain words to swap"
    assert corpora.description_sentences("One thing. Another thing here. And a cut tail ...") == [
        "One thing", "Another thing here"]


@needs_apt
def test_debian_bshift_files(tmp_path):
    files = build_corpus("debian-bshift", tmp_path, limit=1000)
    rows = read(files.train_path) + read(files.eval_path)
    labels = Counter(row["label"] for row in rows)
    assert labels == {"original": 500, "shifted": 500}
    openings = [" ".join(row["text"].lower().split()[:5]) for row in rows]
    low, high = corpora.BSHIFT_WORDS
    assert all(low <= len(row["text"].split()) <= high for row in rows)
    # the originals are real short descriptions, word for word
    descriptions = {p.description.split(". ")[0].rstrip(".") for p in corpora.debian_packages()}
    originals = [row["text"] for row in rows if row["label"] == "original"]
    assert sum(text in descriptions for text in originals) >= 0.95 * len(originals)
    assert len(set(openings)) >= 0.9 * len(openings)
