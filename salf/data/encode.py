"""Local JSONL / JSON / CSV / Parquet files -> tokenized ``TaskData``.

Three shapes of data, recognised from the fields of the file unless the task is given:

- ``text`` -> ``"lm"``: language modelling, every token is a target;
- ``prompt`` + ``completion`` -> ``"completion"``: loss only on the completion tokens (plus EOS);
- ``messages`` (role/content turns) -> ``"completion"``: rendered with the model's chat template, loss
  only on the assistant turns (``salf.data.chat``);
- ``text`` + ``label`` -> ``"classification"``: one class index per row, by a classification head,
  or (``label_mode="words"``) turned into completion data whose completion is the label word.

Files are read by ``salf.data.files``, the task is told by ``salf.data.tasks``. Every datum follows
``salf.data.batch``: ``{"input_ids": [...], "labels": [...] | int}``.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from pathlib import Path
from typing import Any

from salf.data.batch import IGNORE_INDEX
from salf.data.chat import messages_data
from salf.data.files import quoted_rows, records_from_file
from salf.data.tasks import DataConfig, TaskData, detect_task, task_fingerprint
from salf.errors import SalfError

log = logging.getLogger(__name__)


# transformers stores "no limit" as a huge number (int(1e30)); anything above this means unset.
_NO_LIMIT = 1_000_000


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
            f"{len(missing)} row(s) of {str(path)!r} have no label in field {field_name!r} (rows {quoted_rows(missing)})",
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
            f"where a {what} (a string or a number) belongs (rows {quoted_rows(bad)})",
            f"write each {what} as a plain string",
        )


def _texts(rows: list[dict], field_name: str, path: Path, what: str) -> list[str]:
    _check_scalar(rows, field_name, path, what)
    values = [row.get(field_name) for row in rows]
    missing = [i + 1 for i, v in enumerate(values) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise SalfError(
            f"{len(missing)} row(s) of {str(path)!r} have no {what} in field {field_name!r} (rows {quoted_rows(missing)})",
            f"give every row a {what}, or remove those rows",
        )
    return [v if isinstance(v, str) else str(v) for v in values]


def _empty_error(path: Path, rows: list[int], what: str) -> SalfError:
    return SalfError(
        f"{len(rows)} row(s) of {str(path)!r} have {what} (rows {quoted_rows(rows)})",
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
        raise SalfError(f"max_length {limit} leaves no room for text between the special tokens", "raise --max-length (max_length from Python)")
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
        raise SalfError(f"max_length {limit} leaves no room for a prompt and a completion", "raise --max-length (max_length from Python)")
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
    return encode_rows(records_from_file(path), tokenizer, config, label_names, source=str(path))


def encode_rows(
    rows: list[dict],
    tokenizer,
    config: DataConfig | None = None,
    label_names: list[str] | None = None,
    source: str = "in-memory data",
) -> TaskData:
    """Tokenize rows already in memory (dicts with the fields of a data file) for their task.

    ``source`` names the rows in messages and in the data's fingerprint record; see ``load_task_data``.
    """
    config = config or DataConfig()
    path = Path(source)
    if not rows:
        raise SalfError(f"{source} has no rows", "give at least one example")
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
    fmt = "messages" if task == "completion" and config.messages_field in rows[0] else None
    if fmt == "messages":
        data, truncated = messages_data(rows, tokenizer, config.messages_field, limit, path)
    elif task == "lm":
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
            "truncated (raise --max-length to keep them whole, up to the model's limit)",
            stacklevel=2,
        )
    return TaskData(
        task=task,
        data=data,
        label_names=names,
        fingerprint=task_fingerprint(task, names, data),
        n_truncated=len(truncated),
        source=source,
        max_length=limit,
        truncated=truncated,
        extra={"label_mode": config.label_mode if names is not None else None, **({"format": fmt} if fmt else {})},
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


__all__ = ["effective_max_length", "encode_rows", "load_task_data", "log"]
