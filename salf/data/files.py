"""Local JSONL / JSON / CSV / Parquet files -> tokenized ``TaskData``.

Three shapes of data, recognised from the fields of the file unless the task is given:

- ``text`` -> ``"lm"``: language modelling, every token is a target;
- ``prompt`` + ``completion`` -> ``"completion"``: loss only on the completion tokens (plus EOS);
- ``text`` + ``label`` -> ``"classification"``: one class index per row, by a classification head,
  or (``label_mode="words"``) turned into completion data whose completion is the label word.

Files are read with ``datasets.load_dataset``. JSON files are first checked line by line here, so a
syntax error is reported with its line number instead of a pyarrow traceback. Every datum follows
``salf.data.batch``: ``{"input_ids": [...], "labels": [...] | int}``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from salf.data.batch import IGNORE_INDEX
from salf.errors import SalfError
from salf.fileio import fingerprint

log = logging.getLogger(__name__)

TASKS = ("lm", "completion", "classification")
LABEL_MODES = ("head", "words")
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# transformers stores "no limit" as a huge number (int(1e30)); anything above this means unset.
_NO_LIMIT = 1_000_000
_SHOW = 5  # how many offending lines/rows an error message names


@dataclass
class DataConfig:
    """How to read one data file and turn it into tokenized data."""

    task: str | None = None
    """'lm', 'completion' or 'classification'; None detects it from the fields present."""
    text_field: str = "text"
    """Field holding the text (lm and classification)."""
    prompt_field: str = "prompt"
    """Field holding the prompt (completion)."""
    completion_field: str = "completion"
    """Field holding the completion, the only part that is a target (completion)."""
    label_field: str = "label"
    """Field holding the class, a string or an integer (classification)."""
    max_length: int = 512
    """Longest sequence in tokens; longer ones are truncated and counted. Also capped at the
    tokenizer's ``model_max_length`` (which ``salf.models.loading.load_model`` sets from the model)."""
    limit: int | None = None
    """Keep at most this many rows, a seeded random subset in file order; None keeps all."""
    label_mode: str = "head"
    """Classification by a 'head' (class index), or by label 'words' as completion data (causal LMs)."""
    label_separator: str = "\nLabel:"
    """In 'words' mode, put between the text and the label word: prompt = text + separator."""
    seed: int = 0
    """Seed of the ``limit`` subset."""

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise SalfError(f"unknown task {self.task!r}", f"choose one of: {', '.join(TASKS)} (or leave it unset)")
        if self.label_mode not in LABEL_MODES:
            raise SalfError(f"unknown label mode {self.label_mode!r}", f"choose one of: {', '.join(LABEL_MODES)}")
        if self.label_mode == "words" and self.task not in (None, "classification"):
            raise SalfError(
                f"label_mode 'words' turns classification data into completion data, but task is {self.task!r}",
                "leave the task unset or set it to 'classification', or use label_mode 'head'",
            )
        if self.max_length < 2:
            raise SalfError(f"max_length must be at least 2 tokens, got {self.max_length}", "raise max_length")
        if self.limit is not None and self.limit < 1:
            raise SalfError(f"limit must be a positive number of rows, got {self.limit}", "raise it, or unset it")
        names = [self.text_field, self.prompt_field, self.completion_field, self.label_field]
        if any(not name for name in names):
            raise SalfError("a field name is empty", "give every field name as it appears in the file")


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


# ---------------------------------------------------------------------------------------------
# Reading files


def records_from_file(path: str | Path) -> list[dict]:
    """The rows of a local data file as dicts, with clear errors for the usual mistakes."""
    path = Path(path)
    if not path.exists():
        raise SalfError(f"data file {str(path)!r} does not exist", "check the path (relative to the current directory)")
    if path.is_dir():
        raise SalfError(f"{str(path)!r} is a directory, not a data file", "pass one .jsonl, .json, .csv or .parquet file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SalfError(
            f"cannot tell the format of {str(path)!r} from its extension {path.suffix or '(none)'!r}",
            f"use one of: {', '.join(FORMATS)}",
        )
    if path.stat().st_size == 0:
        raise SalfError(f"data file {str(path)!r} is empty", "fill it with rows, one example each")
    if fmt == "json":
        _check_json(path)
    rows = _load_with_datasets(path, fmt)
    if not rows:
        raise SalfError(f"data file {str(path)!r} has no rows", "fill it with rows, one example each")
    return rows


def _check_json(path: Path) -> None:
    """Parse the file here first: datasets' own errors do not say which line is broken."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if not stripped:
        raise SalfError(f"data file {str(path)!r} is empty", "fill it with rows, one example each")
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(path, [f"line {e.lineno}: {e.msg} (column {e.colno})"]) from None
        bad = [f"item {i + 1}: expected a JSON object, found {_kind(r)}" for i, r in enumerate(rows) if not isinstance(r, dict)]
        if bad:
            raise _json_error(path, bad)
        return
    if path.suffix.lower() == ".json" and "\n" in stripped.rstrip() and _is_one_object(text):
        raise SalfError(
            f"{str(path)!r} holds one JSON object over several lines, not a list of rows",
            "write a list of objects ([{...}, {...}]) or one object per line (JSON lines)",
        )
    problems = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters that
    # splitlines() breaks on, and datasets counts lines by "\n" too.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: {e.msg} (column {e.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {number}: expected a JSON object {{...}}, found {_kind(row)}")
    if problems:
        raise _json_error(path, problems)


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _json_error(path: Path, problems: list[str]) -> SalfError:
    shown = "; ".join(problems[:_SHOW]) + (f"; and {len(problems) - _SHOW} more" if len(problems) > _SHOW else "")
    return SalfError(
        f"{str(path)!r} is not valid JSON lines ({len(problems)} bad line(s)): {shown}",
        "write one JSON object per line, e.g. {\"text\": \"...\", \"label\": \"...\"}",
    )


def _load_with_datasets(path: Path, fmt: str) -> list[dict]:
    from datasets import load_dataset  # heavy import, only when a file is read

    try:
        dataset = load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as e:  # datasets/pyarrow raise many types; the user needs the message, not the type
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if e.__cause__ is not None and str(e.__cause__).strip():
            cause += f" ({str(e.__cause__).strip().splitlines()[0]})"
        raise SalfError(
            f"could not read {str(path)!r} as {fmt}: {cause}",
            "check the file: every row needs the same fields with the same value types "
            "(e.g. labels all strings or all integers); CSV needs a header row",
        ) from e
    return dataset.to_list()


# ---------------------------------------------------------------------------------------------
# Task detection


def detect_task(fields: list[str], config: DataConfig) -> str:
    """The task a file's fields call for (or check that the configured task's fields are there)."""
    present = set(fields)
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
        f"{config.text_field!r} (lm), {config.prompt_field!r} + {config.completion_field!r} (completion), "
        f"or {config.text_field!r} + {config.label_field!r} (classification)",
        _fields_fix(config),
    )


def _fields_fix(config: DataConfig) -> str:
    return (
        "rename the fields in the file, or tell salf their names "
        "(text_field / prompt_field / completion_field / label_field)"
    )


# ---------------------------------------------------------------------------------------------
# Labels


def _label_key(value: Any) -> str | None:
    """One spelling per class: 1, 1.0 and '1' are the same class; None/NaN is a missing label."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    key = str(value).strip()
    return key or None


def _sorted_labels(keys: set[str]) -> list[str]:
    # Integer labels sort as numbers, so class 10 comes after class 2.
    if all(_is_int(k) for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _label_keys(rows: list[dict], field_name: str, path: Path) -> list[str]:
    _check_scalar(rows, field_name, path, "label")
    keys = [_label_key(row.get(field_name)) for row in rows]
    missing = [i + 1 for i, k in enumerate(keys) if k is None]
    if missing:
        raise SalfError(
            f"{len(missing)} row(s) of {str(path)!r} have no label in field {field_name!r} (rows {_rows(missing)})",
            "give every row a label, or remove those rows",
        )
    return keys  # type: ignore[return-value]


def _class_names(keys: list[str], label_names: list[str] | None, path: Path) -> list[str]:
    if label_names is None:
        names = _sorted_labels(set(keys))
        if len(names) < 2:
            raise SalfError(
                f"classification data in {str(path)!r} has only one label ({names[0]!r})",
                "a classifier needs at least two classes; add examples of the other classes",
            )
        return names
    known = set(label_names)
    unseen = sorted({k for k in keys if k not in known})
    if unseen:
        n_rows = sum(k not in known for k in keys)
        raise SalfError(
            f"{n_rows} row(s) of {str(path)!r} have labels the training data does not have: "
            f"{', '.join(map(repr, unseen[:10]))}{' ...' if len(unseen) > 10 else ''}",
            f"add examples of these labels to the training data or remove those rows; "
            f"training labels: {', '.join(map(repr, label_names[:20]))}",
        )
    return list(label_names)


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:_SHOW]))
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > _SHOW else "")


# ---------------------------------------------------------------------------------------------
# Tokenization


def _special_affixes(tokenizer, probes: list[str]) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] ... [SEP], <s> ...).

    Texts are tokenized without special tokens and wrapped here, so truncation never cuts them off
    and completion data gets the prefix (BOS) but not an end marker in the middle of the sequence.
    """
    for probe in [*probes, "hello world", "a"]:
        plain = tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
        if not plain:
            continue
        full = tokenizer(probe, verbose=False)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return list(full[:start]), list(full[start + len(plain) :])
        break
    return [], []  # a tokenizer that rewrites texts when adding specials: add none


def effective_max_length(config_max: int, tokenizer) -> int:
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < _NO_LIMIT:
        return min(config_max, tokenizer_max)
    return config_max


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: long texts are truncated here, so the tokenizer's "too long" warning is noise.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _check_scalar(rows: list[dict], field_name: str, path: Path, what: str) -> None:
    """Lists and objects are not texts or labels (datasets reads mixed types without complaint)."""
    bad = [i + 1 for i, row in enumerate(rows) if isinstance(row.get(field_name), (list, dict))]
    if bad:
        raise SalfError(
            f"{len(bad)} row(s) of {str(path)!r} hold a list or an object in field {field_name!r}, "
            f"where a {what} (a string or a number) belongs (rows {_rows(bad)})",
            f"write each {what} as a plain string",
        )


def _texts(rows: list[dict], field_name: str, path: Path, what: str) -> list[str]:
    _check_scalar(rows, field_name, path, what)
    values = [row.get(field_name) for row in rows]
    missing = [i + 1 for i, v in enumerate(values) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise SalfError(
            f"{len(missing)} row(s) of {str(path)!r} have no {what} in field {field_name!r} (rows {_rows(missing)})",
            f"give every row a {what}, or remove those rows",
        )
    return [v if isinstance(v, str) else str(v) for v in values]


def _empty_error(path: Path, rows: list[int], what: str) -> SalfError:
    return SalfError(
        f"{len(rows)} row(s) of {str(path)!r} have {what} (rows {_rows(rows)})",
        "remove those rows or give them text; check the field names and that the tokenizer fits the language",
    )


def _wrap(prefix: list[int], body: list[int], suffix: list[int], limit: int) -> tuple[list[int], bool]:
    room = limit - len(prefix) - len(suffix)
    return prefix + body[:room] + suffix, len(body) > room


def _single_text_data(
    texts: list[str], tokenizer, limit: int, path: Path, min_tokens: int
) -> tuple[list[list[int]], list[int]]:
    prefix, suffix = _special_affixes(tokenizer, texts[:3])
    if limit < len(prefix) + len(suffix) + 1:
        raise SalfError(f"max_length {limit} leaves no room for text between the special tokens", "raise max_length")
    ids, truncated, empty = [], [], []
    for number, body in enumerate(_encode(tokenizer, texts), start=1):
        seq, cut = _wrap(prefix, body, suffix, limit)
        if not body or len(seq) < min_tokens:
            empty.append(number)
        if cut:
            truncated.append(len(ids))
        ids.append(seq)
    if empty:
        what = "no tokens" if min_tokens <= 1 else f"fewer than {min_tokens} tokens (nothing to predict)"
        raise _empty_error(path, empty, f"{what} after tokenization")
    return ids, truncated


def _lm_data(rows, tokenizer, config, limit, path) -> tuple[list[dict], list[int]]:
    texts = _texts(rows, config.text_field, path, "text")
    # A causal LM predicts token t+1 from position t, so one token alone has no target.
    ids, truncated = _single_text_data(texts, tokenizer, limit, path, min_tokens=2)
    return [{"input_ids": seq, "labels": list(seq)} for seq in ids], truncated


def _classification_data(rows, tokenizer, config, limit, path, label_names) -> tuple[list[dict], list[str], list[int]]:
    texts = _texts(rows, config.text_field, path, "text")
    keys = _label_keys(rows, config.label_field, path)
    names = _class_names(keys, label_names, path)
    index = {name: i for i, name in enumerate(names)}
    ids, truncated = _single_text_data(texts, tokenizer, limit, path, min_tokens=1)
    return [{"input_ids": seq, "labels": index[k]} for seq, k in zip(ids, keys)], names, truncated


def _completion_data(prompts, completions, tokenizer, limit, path) -> tuple[list[dict], list[int]]:
    prefix, _ = _special_affixes(tokenizer, prompts[:3])
    eos = getattr(tokenizer, "eos_token_id", None)
    if limit < len(prefix) + 2:
        raise SalfError(f"max_length {limit} leaves no room for a prompt and a completion", "raise max_length")
    data, truncated, empty = [], [], []
    prompt_ids, completion_ids = _encode(tokenizer, prompts), _encode(tokenizer, completions)
    for number, (p, c) in enumerate(zip(prompt_ids, completion_ids), start=1):
        if not c:
            empty.append(number)
            continue
        if eos is not None:
            c = c + [eos]  # so the model learns where the completion ends
        p, c, cut = _fit_completion(prefix, p, c, limit)
        if cut:
            truncated.append(len(data))
        context = prefix + p
        data.append({"input_ids": context + c, "labels": [IGNORE_INDEX] * len(context) + c})
    if empty:
        raise _empty_error(path, empty, "an empty completion after tokenization")
    return data, truncated


def _fit_completion(prefix: list[int], p: list[int], c: list[int], limit: int) -> tuple[list[int], list[int], bool]:
    """Cut a too-long prompt+completion: drop the start of the prompt first, since the targets are
    in the completion; cut the completion's end only when it alone is too long. At least one
    context token is kept, because the first completion token is predicted from the one before."""
    room = limit - len(prefix)
    if len(p) + len(c) <= room:
        return p, c, False
    min_context = 1 if (p and not prefix) else 0
    keep_c = min(len(c), room - min_context)
    keep_p = min(len(p), room - keep_c)
    return p[len(p) - keep_p :], c[:keep_c], True


# ---------------------------------------------------------------------------------------------
# Entry points


def load_task_data(
    path: str | Path,
    tokenizer,
    config: DataConfig | None = None,
    label_names: list[str] | None = None,
) -> TaskData:
    """Read a data file and tokenize it for its task.

    ``label_names``: the class names of the training data, when loading evaluation data, so both use
    one mapping (a label the training data lacks is an error). None takes them from this file, sorted.
    """
    config = config or DataConfig()
    path = Path(path)
    rows = records_from_file(path)
    task = detect_task(list(rows[0].keys()), config)
    rows = _subset(rows, config.limit, config.seed)
    limit = effective_max_length(config.max_length, tokenizer)
    log.info("%s: %d rows, task %s, max length %d", path, len(rows), task, limit)
    if label_names is not None and task != "classification":
        raise SalfError(
            f"label names were given, but {str(path)!r} holds {task!r} data, not classification data",
            "use the same kind of data for training and evaluation",
        )
    names = None
    if task == "lm":
        data, truncated = _lm_data(rows, tokenizer, config, limit, path)
    elif task == "completion":
        prompts = _texts(rows, config.prompt_field, path, "prompt")
        completions = _texts(rows, config.completion_field, path, "completion")
        data, truncated = _completion_data(prompts, completions, tokenizer, limit, path)
    elif config.label_mode == "words":
        task, (data, names, truncated) = "completion", _label_word_data(rows, tokenizer, config, limit, path, label_names)
    else:
        data, names, truncated = _classification_data(rows, tokenizer, config, limit, path, label_names)
    if truncated:
        warnings.warn(
            f"{len(truncated)} of {len(data)} examples in {str(path)!r} were longer than {limit} tokens and were "
            "truncated (raise max_length to keep them whole, up to the model's limit)",
            stacklevel=2,
        )
    return TaskData(
        task=task,
        data=data,
        label_names=names,
        fingerprint=task_fingerprint(task, names, data),
        n_truncated=len(truncated),
        source=str(path),
        max_length=limit,
        truncated=truncated,
        extra={"label_mode": config.label_mode if names is not None else None},
    )


def _label_word_data(rows, tokenizer, config, limit, path, label_names) -> tuple[list[dict], list[str], list[int]]:
    """Classification rows as completion data: prompt = text + separator, completion = ' ' + label."""
    texts = _texts(rows, config.text_field, path, "text")
    keys = _label_keys(rows, config.label_field, path)
    names = _class_names(keys, label_names, path)
    prompts = [text + config.label_separator for text in texts]
    data, truncated = _completion_data(prompts, [" " + k for k in keys], tokenizer, limit, path)
    return data, names, truncated


def _subset(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    if limit is None or limit >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


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
