"""What the data are for: the task (``detect_task``, from the fields of the records unless given), the
settings of loading (``DataConfig``), the tokenized result (``TaskData``) and its held-out split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

from salf.config.data import LABEL_MODES, TASKS, DataConfig, Task
from salf.errors import SalfError
from salf.fileio import fingerprint


@dataclass
class TaskData:
    """Tokenized data of one task, ready for ``salf.data.batch.collate``."""

    task: str
    """'lm', 'completion' or 'classification' (label words are 'completion')."""
    data: list[dict]
    """One datum per row: ``{"input_ids": [...], "labels": [...] or int}``."""
    label_names: list[str] | None
    """Class names in class-index order (classification, and label words); None otherwise."""
    fingerprint: str
    """Stable hash of the token ids, labels, task and label names."""
    n_truncated: int
    """How many rows were longer than the effective max length and were cut."""
    source: str
    """The file the data came from."""
    max_length: int = 0
    """The effective max length the data was cut to (config and tokenizer limits together)."""
    truncated: list[int] = field(default_factory=list)
    """Indices into ``data`` of the truncated rows (``n_truncated == len(truncated)``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about the data (e.g. the label mode) for reports."""

    def __len__(self) -> int:
        return len(self.data)


def task_fingerprint(task: str, label_names: list[str] | None, data: list[dict]) -> str:
    return fingerprint(task, label_names, [d["input_ids"] for d in data], [d["labels"] for d in data])


# Task detection
def detect_task(fields: list[str], config: DataConfig) -> str:
    """The task a file's fields call for (or check that the configured task's fields are there)."""
    present = set(fields)
    if config.messages_field in present and config.task in (None, "completion"):
        return "completion"  # a conversation is completion data: its assistant turns are the targets
    needs = {
        "completion": [config.prompt_field, config.completion_field],
        "classification": [config.text_field, config.label_field],
        "lm": [config.text_field],
    }
    if config.task is not None:
        missing = [f for f in needs[config.task] if f not in present]
        if missing:
            raise SalfError(
                f"task {config.task!r} needs the field(s) {', '.join(map(repr, missing))}, "
                f"but the data has: {', '.join(map(repr, fields)) or 'no fields'}",
                _fields_fix(config),
            )
        return config.task
    for task in ("completion", "classification", "lm"):
        if all(f in present for f in needs[task]):
            return task
    raise SalfError(
        f"cannot tell the task from the fields {', '.join(map(repr, fields)) or '(none)'}: salf reads "
        f"{config.text_field!r} (lm), {config.prompt_field!r} + {config.completion_field!r} or "
        f"{config.messages_field!r} (completion), or {config.text_field!r} + {config.label_field!r} (classification)",
        _fields_fix(config),
    )


def _fields_fix(config: DataConfig) -> str:
    return (
        f"rename the fields in the file to {config.text_field!r} (lm), {config.prompt_field!r} + "
        f"{config.completion_field!r} or {config.messages_field!r} (a list of role/content turns; completion) or "
        f"{config.text_field!r} + {config.label_field!r} (classification); from Python, DataConfig's text_field / "
        "prompt_field / completion_field / label_field / messages_field name other fields"
    )


def split_holdout(task_data: TaskData, fraction: float, seed: int = 0) -> tuple[TaskData, TaskData]:
    """Split off a held-out part, deterministically; classification is split within each class, so
    every class with at least two examples is in both parts."""
    if not 0 < fraction < 1:
        raise SalfError(f"holdout fraction must be between 0 and 1, got {fraction}", "use e.g. 0.1")
    n = len(task_data.data)
    if n < 2:
        raise SalfError(f"cannot split {n} example(s) into training and held-out parts", "use more data")
    rng = random.Random(seed)
    if task_data.task == "classification":
        held = _stratified_holdout(task_data.data, fraction, rng)
    else:
        order = list(range(n))
        rng.shuffle(order)
        held = set(order[: min(n - 1, max(1, round(n * fraction)))])
    train = [i for i in range(n) if i not in held]
    evaluation = [i for i in range(n) if i in held]
    return _part(task_data, train, "train"), _part(task_data, evaluation, "holdout")


def _stratified_holdout(data: list[dict], fraction: float, rng: random.Random) -> set[int]:
    by_class: dict[int, list[int]] = {}
    for i, d in enumerate(data):
        by_class.setdefault(d["labels"], []).append(i)
    held: set[int] = set()
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        # A class with one example stays in training: the eval split may lack it, never the reverse.
        take = min(len(members) - 1, max(1, round(len(members) * fraction))) if len(members) > 1 else 0
        held.update(members[:take])
    if not held:
        held.add(rng.randrange(len(data)))
    return held


def _part(task_data: TaskData, indices: list[int], name: str) -> TaskData:
    data = [task_data.data[i] for i in indices]
    cut = set(task_data.truncated)
    truncated = [j for j, i in enumerate(indices) if i in cut]
    return replace(
        task_data,
        data=data,
        fingerprint=task_fingerprint(task_data.task, task_data.label_names, data),
        n_truncated=len(truncated),
        truncated=truncated,
        source=f"{task_data.source}#{name}",
        extra=dict(task_data.extra),
    )


__all__ = ["DataConfig", "LABEL_MODES", "TASKS", "Task", "TaskData", "detect_task", "split_holdout", "task_fingerprint"]
