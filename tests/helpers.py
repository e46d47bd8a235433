"""Shared test helpers: tiny saved models and small data files, all local and fast.

``save_tiny(tmp_path, "llama")`` writes a tiny random model (``salf.models.tiny``) and a tiny word-level
tokenizer (``salf.models.loading.tiny_tokenizer``) into one folder with ``save_pretrained``, the way a user's
checkpoint looks to ``salf plan --model FOLDER``. The data writers produce JSONL files of the three
shapes salf reads (text | prompt+completion | text+label) from a small fixed vocabulary, so every
word is in the tiny tokenizer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from salf.models.loading import tiny_tokenizer
from salf.models.tiny import tiny_model

WORDS = (
    "the cat dog bird fish sat ran flew swam on in under over mat tree sky sea red blue green "
    "small big fast slow a one two three happy sad"
).split()
CLASSES = {"animal": ["cat", "dog", "bird", "fish"], "colour": ["red", "blue", "green"]}


def sentences(n: int, length: int = 8, seed: int = 0) -> list[str]:
    """``n`` sentences of ``length`` words drawn (by ``seed``) from ``WORDS``."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def save_tiny(tmp_path: Path, model_type: str = "llama", task: str = "causal-lm", name: str | None = None,
              **overrides) -> Path:
    """A tiny model + tiny tokenizer saved together; returns the folder.

    ``task``: 'causal-lm' or 'classification' (a tiny classifier with ``num_labels``, default 2).
    ``overrides`` go to the model config (e.g. ``num_hidden_layers=2``, ``max_position_embeddings=16``).
    """
    folder = Path(tmp_path) / (name or f"{model_type}-{task}")
    if task == "classification":
        overrides.setdefault("num_labels", 2)
    model = tiny_model(model_type, task, **overrides)
    max_positions = overrides.get("max_position_embeddings", overrides.get("n_positions", 128))
    tokenizer = tiny_tokenizer(WORDS * 2, model_max_length=max_positions)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def text_data(path: Path, n: int = 24, length: int = 8, seed: int = 0) -> Path:
    """Language-modelling rows: ``{"text": ...}``."""
    return write_jsonl(path, ({"text": s} for s in sentences(n, length, seed)))


def completion_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Prompt/completion rows: the completion repeats the prompt's last word (learnable)."""
    rows = []
    for s in sentences(n, 6, seed):
        rows.append({"prompt": s + " then", "completion": s.split()[-1]})
    return write_jsonl(path, rows)


def label_data(path: Path, n: int = 24, seed: int = 0, labels: Sequence[str] = tuple(CLASSES)) -> Path:
    """Classification rows ``{"text", "label"}``: the text holds words of its class (learnable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        vocab = CLASSES.get(label, WORDS)
        words = [rng.choice(vocab) for _ in range(3)] + [rng.choice(WORDS) for _ in range(4)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return write_jsonl(path, rows)


def ragged_lm_data(n: int = 8, seq: int = 16, seed: int = 0) -> list[dict]:
    """Tokenized language-modelling datums of lengths seq, seq-1, seq-2 (padding is exercised)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        ids = torch.randint(3, 120, (seq - i % 3,), generator=g).tolist()
        data.append({"input_ids": ids, "labels": ids})
    return data
