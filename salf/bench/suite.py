"""``salf bench``: does the plan land on the oracle's cost-quality frontier? (METHOD.md, "How we know it works")

A **suite** (JSON under ``bench/``) is a list of tasks; a task is a model, data, a training recipe and
seeds. For every task and seed the benchmark runs

1. the **oracle sweep**: one fine-tuning per boundary k = 0..L (embeddings frozen for k > 0), same data,
   steps, recipe and seed; eval loss, accuracy and macro-F1 (classification) or exact match of greedy
   generations (completion), measured train FLOPs, wall time, median step time and memory;
2. **salf plans**: one trace per applicable lens, then every estimator x policy picks a boundary; the
   profiling time (trace + cost profile + plan) is timed. A plan's quality is the oracle run at its
   boundary: the same recipe, seed and data, so the run would be identical; nothing is retrained;
3. **baselines** (``salf.bench.baselines.BASELINES``): depth-only policies, gradient-norm,
   hidden-state variability and cosine change give boundaries (reusing the oracle runs); LoRA and LISA
   get their own runs;
4. **per-datum** (METHOD §4, ``BenchSuite.per_datum``): the default lens's trace (the one the plans
   above already made; not traced again), ``PER_DATUM_ESTIMATOR`` and ``knee`` give every traced datum its
   own boundary and every other datum the plan's global boundary; one run of its own trains each batch
   at its data's boundary (``salf.training.run.train(..., boundaries=...)``) with the oracle's recipe, steps and
   seed, and is compared with the single-boundary plan. Its FLOPs are every boundary's measured FLOPs per
   padded token (the oracle run at that boundary) times the padded tokens it trained at that boundary;
5. optionally a **ceiling** (full fine-tuning for ``ceiling_steps``) and **equal-compute** runs (each
   planned boundary trained for as many steps as fit in the full run's FLOPs).

Everything lands in ``out_dir``: ``runs.json`` (every run and plan, rewritten atomically after each),
``results.md`` (first every plan and baseline's regret per model, pooled over tasks and seeds; then per task
the oracle, plans and baselines with regret, trade-off regret and share kept, predicted vs measured savings,
profiling share, mean ± std over seeds), ``summary.json`` (the same numbers), ``frontier.png`` and
``progress.log``. A finished run is never repeated: its key (task, seed, variant) and the task's recipe
fingerprint are looked up in ``runs.json`` on restart. ``salf bench-table DIR...`` (``bench_table``) pools
the per-model table over several output directories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import gc
import io
import json
import math
import os
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salf.bench.baselines import BASELINES, BaselineContext, BaselineSettings, TrainVariant
from salf.errors import SalfError
from salf.fileio import fingerprint, write_atomic, write_json
from salf.method.freeze import FreezeSpec
from salf.method.plan import DEFAULT_POLICY
from salf.models.builtin import BUILTIN_PREFIX, cache_dirs, resolve_builtin
from salf.models.pooling import HEAD_POOLINGS
from salf.registry import Registry

BENCH_FORMAT = 1
POLICIES_DEFAULT = ("knee", "budget=0.5", "coverage=0.9", "unsolved")
PER_DATUM_ESTIMATOR, PER_DATUM_POLICY = "headroom", "knee"
"""Estimator and policy of the per-datum variant's global boundary (each datum's own boundary comes from its
own observed drops, ``salf.method.plan.per_datum_boundaries``); fixed, so that its finished runs stay valid when
the defaults of ``salf plan`` change."""
PER_DATUM_FILL = "global"
"""Boundary of the data the trace did not read (``salf.training.perdatum.datum_boundaries``)."""
PER_DATUM_FLOPS_METHOD = (
    "sum over boundaries k of (FLOPs per padded token at k x padded tokens this run trained at k); FLOPs per "
    "padded token at k = the oracle run at k of the same seed (FlopCounterMode over its first step: same "
    "model, recipe and instrument as every oracle cost), or, where that run has none, the cost model's "
    "predicted step-FLOPs ratio of k times the measured k=0 value; padded tokens per boundary counted by the "
    "boundary switcher on every training forward"
)
SUITE_DIRS = (Path("bench"), Path(__file__).resolve().parents[2] / "bench")
"""Where suite names are looked up (``<dir>/<name>.json``): the working directory's ``bench/``, then the repo's."""
FIXTURE_BUILD = "python -m salf.data.fixtures --out {dir} --minutes 45 --layers 8 --threads 1"

QUALITY: dict[str, tuple[str, bool]] = {
    "classification": ("eval_accuracy", True),
    "completion": ("exact_match", True),
    "lm": ("eval_loss", False),
}
"""The quality metric of each data task, and whether higher is better."""
LOSS = ("eval_loss", False)


# --------------------------------------------------------------------------------------------- suite


@dataclass
class BenchTask:
    """One model on one dataset with one training recipe, repeated over ``seeds``."""

    name: str
    """Short unique name (used in keys and folder names)."""
    model: str
    """A model folder or hub id, 'builtin:e5-small' or 'builtin:minilm' (``salf.models.builtin``; 'minilm' alone is
    an alias of the latter), 'fixture:gpt-debian' (the pretrained
    causal fixture, see ``salf.data.fixtures``) or 'tiny:<type>' (a tiny random model of ``salf.models.tiny``)."""
    corpus: str | None = None
    """A built-in corpus (``salf.data.corpora``); or give ``train_file`` and ``eval_file``."""
    corpus_limit: int | None = None
    """Rows of the corpus to build (train + eval), balanced over classes; None: all."""
    train_file: str | None = None
    eval_file: str | None = None
    label_mode: str = "head"
    """Classification by a head, or by label 'words' (completion data, for causal LMs)."""
    head_pooling: str | None = None
    """What a BERT-style classifier's head reads: 'first' token, token 'mean' (``salf.models.pooling``: for sentence
    encoders trained with mean pooling), or None: the checkpoint's own. Left out of the recipe fingerprint
    when None, so the tasks written before it existed keep their finished runs."""
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-4
    """Learning rate of the pretrained blocks."""
    head_lr: float | None = None
    """Learning rate of the head (None: salf.training.config's default, larger for a fresh classification head)."""
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_length: int = 64
    train_limit: int | None = None
    """Training rows used at most (seeded subset); None: all."""
    eval_limit: int | None = 500
    """Evaluation rows used at most (seeded subset); None: all."""
    em_limit: int = 200
    """Completion tasks: evaluation rows whose greedy generations are checked for exact match."""
    generation_batch: int = 32
    trace_sample: int = 256
    """Data traced by each lens."""
    seeds: list[int] = field(default_factory=lambda: [0])
    data_seed: int = 0
    """Seed of the corpus split and data subsets (the same for every training seed)."""
    ceiling_steps: int | None = None
    """Also run full fine-tuning for this many steps (the ceiling)."""
    equal_compute: bool | list[int] = False
    """Also train every planned boundary for as many steps as fit in the full run's measured FLOPs: ``true``
    for every seed, or a list of the seeds that get these runs (each costs about one full run per boundary)."""
    baselines: BaselineSettings = field(default_factory=BaselineSettings)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/|\\ "):
            raise SalfError(f"task name {self.name!r} must be non-empty, without spaces, '/', '|'",
                            "use e.g. 'minilm-docstring-module'")
        if (self.corpus is None) == (self.train_file is None):
            raise SalfError(f"task {self.name}: give either a corpus or a train_file (not both)",
                            "e.g. \"corpus\": \"docstring-module\"")
        if self.train_file is not None and self.eval_file is None:
            raise SalfError(f"task {self.name}: train_file needs an eval_file", "add \"eval_file\"")
        for name in ("steps", "batch_size", "max_length", "em_limit", "generation_batch", "trace_sample"):
            if getattr(self, name) < 1:
                raise SalfError(f"task {self.name}: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("corpus_limit", "train_limit", "eval_limit", "ceiling_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SalfError(f"task {self.name}: {name} must be at least 1 (or null), got {value}")
        if not self.lr > 0 or (self.head_lr is not None and not self.head_lr > 0):
            raise SalfError(f"task {self.name}: learning rates must be positive")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SalfError(f"task {self.name}: seeds must be a non-empty list without repeats, got {self.seeds}")
        if self.head_pooling is not None and self.head_pooling not in HEAD_POOLINGS:
            raise SalfError(f"task {self.name}: unknown head_pooling {self.head_pooling!r}",
                            f"choose one of: {', '.join(HEAD_POOLINGS)} (or null: the checkpoint's own)")
        if isinstance(self.equal_compute, list) and not set(self.equal_compute) <= set(self.seeds):
            raise SalfError(f"task {self.name}: equal_compute seeds {self.equal_compute} are not all among seeds "
                            f"{self.seeds}", "list only seeds the task runs, or write true for every seed")
        if isinstance(self.baselines, dict):
            self.baselines = _construct(BaselineSettings, self.baselines, f"task {self.name} baselines")

    def equal_compute_for(self, seed: int) -> bool:
        """Whether ``seed`` gets the equal-compute runs."""
        return seed in self.equal_compute if isinstance(self.equal_compute, list) else bool(self.equal_compute)

    def recipe_fingerprint(self) -> str:
        """Hash of everything that changes a run's result (not the seed list or the ceiling/extras)."""
        d = asdict(self)
        for volatile in ("seeds", "ceiling_steps", "equal_compute"):
            d.pop(volatile)
        if d["head_pooling"] is None:  # the recipe of every task from before the field existed
            d.pop("head_pooling")
        return fingerprint(d)


@dataclass
class BenchSuite:
    """Tasks, and which lenses, estimators, policies and baselines to compare on them."""

    name: str
    tasks: list[BenchTask]
    policies: list[str] = field(default_factory=lambda: list(POLICIES_DEFAULT))
    estimators: list[str] | None = None
    """None: every registered estimator."""
    lenses: list[str] | None = None
    """None: every registered lens that fits the task's labels and model."""
    baselines: list[str] | None = None
    """None: every registered baseline."""
    threads: int | None = None
    """torch CPU threads (None: leave torch's default)."""
    keep_models: bool = False
    """Keep each run's fine-tuned weights (off: only metrics and history stay, to save disk)."""
    per_datum: bool = True
    """Also train the per-datum variant (one run per task and seed, from the default lens's trace); needs
    the default lens among the traced ones. Not part of the recipe, so turning it on reuses finished runs."""
    description: str = ""

    def __post_init__(self) -> None:
        from salf.method.gain import ESTIMATORS
        from salf.method.plan import parse_policy
        from salf.method.trace import LENSES

        self.tasks = [t if isinstance(t, BenchTask) else _construct(BenchTask, t, "task") for t in self.tasks]
        if not self.tasks:
            raise SalfError(f"suite {self.name!r} has no tasks", "add at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise SalfError(f"suite {self.name!r} repeats task names: {names}", "give every task its own name")
        for policy in self.policies:
            parse_policy(policy)
        for registry, chosen in ((ESTIMATORS, self.estimators), (LENSES, self.lenses), (BASELINES, self.baselines)):
            for name in chosen or ():
                registry.get(name)
        if self.threads is not None and self.threads < 1:
            raise SalfError(f"threads must be at least 1, got {self.threads}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "suite") -> BenchSuite:
        d = dict(d)
        included = d.pop("include", [])
        tasks = list(d.pop("tasks", []))
        for other in included:
            tasks += [asdict(t) for t in cls.load(other).tasks]
        return _construct(cls, {**d, "tasks": tasks}, where)

    @classmethod
    def load(cls, name_or_path: str | Path) -> BenchSuite:
        """A suite file, or a suite name looked up as ``bench/<name>.json``."""
        path = Path(name_or_path)
        if not path.is_file():
            candidates = [d / f"{name_or_path}.json" for d in SUITE_DIRS]
            found = [c for c in candidates if c.is_file()]
            if not found:
                known = sorted({p.stem for d in SUITE_DIRS if d.is_dir() for p in d.glob("*.json")})
                raise SalfError(f"no benchmark suite {str(name_or_path)!r}",
                                f"give a suite file, or one of: {', '.join(known) or '(none found in bench/)'}")
            path = found[0]
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SalfError(f"suite {path} is not valid JSON (line {e.lineno}: {e.msg})", "fix the file") from None
        raw.setdefault("name", path.stem)
        return cls.from_dict(raw, str(path))

    def with_seeds(self, seeds: Sequence[int]) -> BenchSuite:
        return dataclasses.replace(self, tasks=[
            dataclasses.replace(t, seeds=list(seeds), equal_compute=[s for s in t.equal_compute if s in seeds]
                                if isinstance(t.equal_compute, list) else t.equal_compute) for t in self.tasks])

    def only_tasks(self, names: Sequence[str]) -> BenchSuite:
        """The suite with just the named tasks, in the suite's order (to split it across processes)."""
        known = [t.name for t in self.tasks]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise SalfError(f"suite {self.name} has no task {', '.join(unknown) or '(none named)'}",
                            f"name some of: {', '.join(known)}")
        return dataclasses.replace(self, tasks=[t for t in self.tasks if t.name in names])


def _construct(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise SalfError(f"{where}: expected a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SalfError(f"{where}: unknown field(s) {', '.join(unknown)}", f"known fields: {', '.join(sorted(known))}")
    try:
        return cls(**d)
    except TypeError as e:
        raise SalfError(f"{where}: {e}", "check the suite file against salf.bench.suite.BenchTask / BenchSuite") from None


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-2' -> [0, 1, 2]."""
    try:
        if "-" in text.strip().lstrip("-"):
            lo, hi = text.split("-", 1)
            return list(range(int(lo), int(hi) + 1))
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SalfError(f"seeds {text!r} are not integers", "write e.g. --seeds 0,1,2 or --seeds 0-2") from None


# --------------------------------------------------------------------------------------------- models and data

ModelSource = Callable[[str, "PreparedTask"], str]
MODEL_SOURCES: Registry[ModelSource] = Registry("model source")
"""'<source>:<argument>' model names -> a local model folder ('minilm' takes no argument).

``cache_dirs`` (where fixtures are looked for) lives in ``salf.models.builtin``, which also caches converted models."""


@MODEL_SOURCES.register("builtin")
def _builtin(arg: str, prepared: PreparedTask) -> str:
    """'builtin:e5-small', 'builtin:minilm': the real models of ``salf.models.builtin``."""
    return resolve_builtin(BUILTIN_PREFIX + arg)


@MODEL_SOURCES.register("minilm")
def _minilm(arg: str, prepared: PreparedTask) -> str:
    """'minilm': the name suites used before built-ins, an alias of 'builtin:minilm'."""
    return resolve_builtin(BUILTIN_PREFIX + "minilm")


@MODEL_SOURCES.register("fixture")
def _fixture(arg: str, prepared: PreparedTask) -> str:
    for d in cache_dirs():
        if (d / arg / "model" / "config.json").is_file():
            return str((d / arg / "model").resolve())
    where = cache_dirs()[-1] / arg
    raise SalfError(f"the benchmark fixture {arg!r} is not built (looked in {', '.join(str(d) for d in cache_dirs())})",
                    f"build it once (about 45 minutes, in the background): {FIXTURE_BUILD.format(dir=where)}")


@MODEL_SOURCES.register("tiny")
def _tiny(arg: str, prepared: PreparedTask) -> str:
    """A tiny random model with a word-level tokenizer built from the task's training texts."""
    from salf.data.files import records_from_file
    from salf.models.loading import tiny_tokenizer
    from salf.models.tiny import TINY_CONFIGS, tiny_model

    if arg not in TINY_CONFIGS:
        raise SalfError(f"unknown tiny model type {arg!r}", f"choose one of: {', '.join(TINY_CONFIGS)}")
    classify = prepared.data_task == "classification"
    folder = prepared.out_dir / "models" / f"tiny-{arg}-{prepared.task.name}"
    if (folder / "config.json").is_file():
        return str(folder)
    rows = records_from_file(prepared.train_file)
    texts = [str(r.get("text", "")) + " " + str(r.get("prompt", "")) + str(r.get("completion", "")) for r in rows]
    tokenizer = tiny_tokenizer(texts)
    if classify:
        labels = sorted({str(r["label"]) for r in rows})
        model = tiny_model(arg, "classification", num_labels=len(labels), id2label=dict(enumerate(labels)),
                           label2id={n: i for i, n in enumerate(labels)})
    elif arg == "bert":
        raise SalfError("tiny:bert is an encoder and cannot do completion tasks", "use tiny:gpt2 or tiny:llama")
    else:
        model = tiny_model(arg, "causal-lm")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    return str(folder)


@dataclass
class PreparedTask:
    """A task with its data files on disk and its model resolved to a folder."""

    task: BenchTask
    out_dir: Path
    train_file: Path
    eval_file: Path
    data_task: str
    """'classification', 'completion' or 'lm', as the training file will be read."""
    model_path: str = ""
    num_layers: int = 0
    encoder: bool = False

    @classmethod
    def prepare(cls, task: BenchTask, out_dir: Path) -> PreparedTask:
        from transformers import AutoConfig

        from salf.data.files import DataConfig, detect_task, records_from_file
        from salf.models.arch import ARCHITECTURES

        train_file, eval_file = _data_files(task, out_dir)
        first = records_from_file(train_file)[0]
        data_task = detect_task(list(first), DataConfig(label_mode=task.label_mode))
        if task.label_mode == "words" and data_task == "classification":
            data_task = "completion"
        prepared = cls(task, out_dir, train_file, eval_file, data_task)
        source, sep, arg = task.model.partition(":")
        if source in MODEL_SOURCES and (sep or source == "minilm"):
            prepared.model_path = MODEL_SOURCES.get(source)(arg, prepared)
        else:
            prepared.model_path = task.model
        config = AutoConfig.from_pretrained(prepared.model_path)
        prepared.num_layers = int(config.num_hidden_layers)
        spec = ARCHITECTURES.get(config.model_type)
        prepared.encoder = bool(spec and spec.encoder)
        return prepared

    def default_lens(self, chosen: list[str] | None) -> str | None:
        """The lens ``salf plan`` uses for this task's labels, if it is among the traced ones."""
        from salf.method.trace import CLASS_LABELS, DEFAULT_LENS, TOKEN_LABELS

        lens = DEFAULT_LENS[CLASS_LABELS if self.data_task == "classification" else TOKEN_LABELS]
        return lens if lens in self.lenses(chosen) else None

    def lenses(self, chosen: list[str] | None) -> list[str]:
        """The lenses that can read this task's labels with this model."""
        from salf.method.trace import CLASS_LABELS, LENSES, TOKEN_LABELS

        kind = CLASS_LABELS if self.data_task == "classification" else TOKEN_LABELS
        fits = []
        for name in chosen or LENSES.names():
            lens = LENSES.get(name)
            if lens.label_kind == kind and not (lens.needs_head and self.encoder):
                fits.append(name)
        return fits


def _data_files(task: BenchTask, out_dir: Path) -> tuple[Path, Path]:
    if task.corpus is None:
        files = (Path(task.train_file), Path(task.eval_file))
        for f in files:
            if not f.is_file():
                raise SalfError(f"task {task.name}: data file {f} not found", "fix the path in the suite file")
        return files
    from salf.data.corpora import build_corpus

    key = task.corpus.replace("_", "-")
    folder = out_dir / "data" / f"{key}-n{task.corpus_limit or 'all'}-s{task.data_seed}"
    train, held = folder / f"{key}-train.jsonl", folder / f"{key}-eval.jsonl"
    if not (train.is_file() and held.is_file()):
        built = build_corpus(key, folder, seed=task.data_seed, limit=task.corpus_limit)
        train, held = built.train_path, built.eval_path
    return train, held


# --------------------------------------------------------------------------------------------- measuring


class PeakRSS:
    """Samples this process's resident memory in a thread while a run lasts.

    The process's own peak (``ru_maxrss``) never comes down between runs, so it cannot tell runs apart;
    this reports the peak during the run and its growth over the start. Freed memory the allocator
    keeps makes later runs' growth an underestimate; the cost model's memory is the exact comparison.
    """

    def __init__(self, interval: float = 0.02):
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Any, data: Sequence[dict], batch_size: int = 32) -> dict[str, Any]:
    """Share of completion data whose greedy generation equals the completion (stripped strings).

    The prompt is every token before the first target; generation runs (batched, left-padded) for as
    many tokens as the completion has and stops at EOS; both token lists are cut at the first EOS and
    decoded with special tokens kept (so an unknown-token target is matched only by an unknown token,
    never by an empty string), then compared stripped.
    """
    from salf.data.batch import IGNORE_INDEX

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    items = []
    for d in data:
        targets = [t for t, label in enumerate(d["labels"]) if t > 0 and label != IGNORE_INDEX]
        if targets:
            start = targets[0]
            items.append((d["input_ids"][:start], d["input_ids"][start:]))
    if not items:
        raise SalfError("no evaluation datum has a completion to generate", "check the completion data")
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    correct = 0
    examples = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(items[i][0]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            prompt = items[i][0]
            ids[r, width - len(prompt):] = torch.as_tensor(prompt)
            mask[r, width - len(prompt):] = 1
        new = max(len(items[i][1]) for i in rows)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                             min_new_tokens=0, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos)
        for r, i in enumerate(rows):
            got = tokenizer.decode(_until(out[r, width : width + len(items[i][1])].tolist(), eos)).strip()
            want = tokenizer.decode(_until(items[i][1], eos)).strip()
            correct += got == want
            if len(examples) < 5:
                examples.append({"want": want, "got": got})
    return {"exact_match": correct / len(items), "exact_match_n": len(items), "exact_match_examples": examples}


def _until(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


# --------------------------------------------------------------------------------------------- run store


class RunStore:
    """``runs.json``: every finished run, plan and baseline decision, keyed by (task, seed, variant).

    Several ``salf bench`` processes may share one ``out_dir`` (e.g. one per task with ``--tasks``, one per
    GPU): every save takes an exclusive lock on ``runs.json.lock``, reads the file as the others left it
    and writes it back with this process's own new records added, so no process drops another's runs (nor
    brings back a record removed from the file meanwhile). Each process only skips the runs it knew of when
    it started or made itself; split the work by task or seed so two processes never train the same run.
    """

    def __init__(self, path: Path, suite: BenchSuite, resume: bool):
        self.path = path
        self.suite = suite
        self.records: dict[str, dict[str, Any]] = {}
        # --no-resume starts over: the runs on disk now are dropped at the first save, not merged back.
        self._dropped: set[str] = set()
        self._mine: set[str] = set()  # keys this process added; only these override the file
        stored = self._read()
        if resume:
            self.records = stored
        else:
            self._dropped = set(stored)

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            stored = json.loads(self.path.read_text())
        except json.JSONDecodeError:
            raise SalfError(f"{self.path} is damaged (not JSON)", "move it away to start over, or rerun without resume") from None
        return {r["key"]: r for r in stored.get("runs", [])}

    @staticmethod
    def key(task: str, seed: int | None, variant: str) -> str:
        return f"{task}|seed={seed}|{variant}" if seed is not None else f"{task}|{variant}"

    def get(self, key: str, recipe: str) -> dict[str, Any] | None:
        record = self.records.get(key)
        return record if record is not None and record.get("recipe") == recipe else None

    def add(self, *records: dict[str, Any]) -> None:
        for record in records:
            self.records[record["key"]] = record
            self._mine.add(record["key"])
        self.save()

    def save(self) -> dict[str, dict[str, Any]]:
        """Write this process's records merged with the others' (under the lock); returns the union."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            union = {k: r for k, r in self._read().items() if k not in self._dropped}
            union.update((k, self.records[k]) for k in self._mine)
            write_json(self.path, {"format": BENCH_FORMAT, "suite": self.suite.name,
                                   "updated": _now(), "runs": list(union.values())})
        return union


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Progress:
    """A tqdm bar over the work (weighted: a training step is 1) and one ``progress.log`` line per unit."""

    def __init__(self, path: Path, total: float, show: bool):
        from tqdm.auto import tqdm

        self.path = path
        self.total = total
        self.done = 0.0
        self.worked = 0.0
        self.seconds = 0.0
        self.bar = tqdm(total=round(total), desc="bench", unit="step", disable=not show)

    def grow(self, weight: float) -> None:
        self.total += weight
        self.bar.total = round(self.total)
        self.bar.refresh()

    def finish(self, key: str, weight: float, seconds: float | None, status: str) -> None:
        self.done += weight
        if seconds is not None:
            self.worked += weight
            self.seconds += seconds
        self.bar.update(round(self.done) - self.bar.n)
        rate = self.seconds / self.worked if self.worked else float("nan")
        eta = (self.total - self.done) * rate
        line = (f"{_now()} [{self.done:.0f}/{self.total:.0f}] {status} {key}"
                + (f" in {seconds:.1f}s" if seconds is not None else "")
                + (f"; ETA {_duration(eta)}" if math.isfinite(eta) else ""))
        self.bar.set_postfix_str(key[-40:])
        with open(self.path, "a") as log:
            log.write(line + "\n")

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


# --------------------------------------------------------------------------------------------- one task


class TaskBench:
    """Runs every unit of one task for one seed at a time, loading the model and data only when needed."""

    def __init__(self, prepared: PreparedTask, suite: BenchSuite, store: RunStore, progress: Progress):
        self.p = prepared
        self.t = prepared.task
        self.suite = suite
        self.store = store
        self.progress = progress
        self.recipe = self.t.recipe_fingerprint()
        self.trained = 0
        self.skipped = 0

    # -- resources ----------------------------------------------------------------------------
    @cached_property
    def loaded(self):
        from salf.pipeline import load

        return load(self.p.model_path, str(self.p.train_file), label_mode=self.t.label_mode,
                    max_length=self.t.max_length, limit=self.t.train_limit, seed=self.t.data_seed,
                    head_pooling=self.t.head_pooling)

    @cached_property
    def eval_data(self):
        from salf.data.files import DataConfig, load_task_data

        data = self.loaded.data
        names = data.label_names if data.label_names is not None else None
        config = DataConfig(max_length=self.t.max_length, limit=self.t.eval_limit, seed=self.t.data_seed,
                            label_mode=self.t.label_mode)
        return load_task_data(self.p.eval_file, self.loaded.model.tokenizer, config, label_names=names)

    @cached_property
    def costs(self) -> dict[str, Any]:
        """The cost model's step cost of every boundary, timed (it is part of every plan's profiling time)."""
        from salf.method.cost import boundary_costs, profile_cost

        model = self.fresh_model(0).model
        seq = max(2, round(float(np.mean([len(d["input_ids"]) for d in self.loaded.data.data]))))
        started = time.perf_counter()
        per_k = boundary_costs(profile_cost(model, self.t.batch_size, seq))
        seconds = time.perf_counter() - started
        full = per_k[0].total
        return {"step_costs": per_k, "ratio": np.array([c.total / full for c in per_k]), "seconds": seconds,
                "seq_len": seq,
                "memory_ratio": [c.memory_bytes / per_k[0].memory_bytes for c in per_k]}

    def fresh_model(self, seed: int):
        """The pretrained model again, with its fresh head drawn from ``seed`` (the same for every boundary),
        pooling as the task says."""
        from salf.models.loading import load_model

        data = self.loaded.data
        torch.manual_seed(seed)
        lm = load_model(self.p.model_path, data.task,
                        label_names=data.label_names if data.task == "classification" else None,
                        head_pooling=self.t.head_pooling)
        # Eager attention: its matmuls are what FlopCounterMode counts on every backend (CPU sdpa counts 0).
        if hasattr(lm.model, "set_attn_implementation"):
            lm.model.set_attn_implementation("eager")
        return lm

    # -- units --------------------------------------------------------------------------------
    def _unit(self, seed: int | None, variant: str, weight: float, make: Callable[[], dict[str, Any]]) -> dict:
        key = RunStore.key(self.t.name, seed, variant)
        found = self.store.get(key, self.recipe)
        if found is not None:
            self.skipped += 1
            self.progress.finish(key, weight, None, "skip")
            return found
        started = time.perf_counter()
        body = make()
        seconds = time.perf_counter() - started
        record = {"key": key, "task": self.t.name, "seed": seed, "variant": variant, "recipe": self.recipe,
                  **body, "seconds": seconds, "finished": _now()}
        self.store.add(record)
        self.progress.finish(key, weight, seconds, body.get("status", "done"))
        return record

    def units_weight(self) -> float:
        """Progress weight of the planned work of one seed (a training step weighs 1)."""
        t, n = self.t, self.p.num_layers
        runs = (n + 1) * t.steps + sum(t.steps for b in self._baselines() if BASELINES.get(b).trains)
        runs += t.steps if self._per_datum_lens() else 0
        profiling = len(self.p.lenses(self.suite.lenses)) * self._trace_weight() + len(self._baselines())
        return runs + profiling + (t.ceiling_steps or 0)

    def _trace_weight(self) -> float:
        return max(1.0, self.t.trace_sample / (3 * self.t.batch_size))

    def _baselines(self) -> list[str]:
        return list(self.suite.baselines) if self.suite.baselines is not None else BASELINES.names()

    def _per_datum_lens(self) -> str | None:
        """The lens whose trace the per-datum variant uses (None: no per-datum variant)."""
        return self.p.default_lens(self.suite.lenses) if self.suite.per_datum else None

    @staticmethod
    def per_datum_variants(lens: str) -> tuple[str, str]:
        """(its boundaries, its run): the record names of the per-datum variant from ``lens``."""
        name = f"{lens}/{PER_DATUM_ESTIMATOR}/{PER_DATUM_POLICY}"
        return f"salf-per-datum-plan/{name}", f"salf-per-datum/{name}"

    def meta(self) -> dict:
        def make() -> dict[str, Any]:
            c, data = self.costs, self.loaded.data
            return {"kind": "meta", "data_task": data.task, "num_layers": self.p.num_layers,
                    "model_path": self.p.model_path, "model": self.t.model, "n_train": len(data.data),
                    "n_eval": len(self.eval_data.data), "label_names": data.label_names,
                    "train_file": str(self.p.train_file), "eval_file": str(self.p.eval_file),
                    "predicted_step_flops_ratio": c["ratio"].tolist(), "predicted_memory_ratio": c["memory_ratio"],
                    "cost_profile_seconds": c["seconds"],
                    "cost_seq_len": c["seq_len"], "task_config": asdict(self.t)}

        return self._unit(None, "meta", 0.0, make)

    def run_seed(self, seed: int) -> None:
        n = self.p.num_layers
        self.meta()
        oracle = {0: self._train(seed, "oracle/k=0", "oracle", FreezeSpec.from_boundary(0, n), boundary=0)}
        plans = self._plans(seed)
        baselines = self._run_baselines(seed, trained=False)
        for k in range(1, n + 1):
            oracle[k] = self._train(seed, f"oracle/k={k}", "oracle", FreezeSpec.from_boundary(k, n), boundary=k)
        # Baselines with runs of their own come after the sweep: a seed whose sweep is done scores every
        # plan and boundary baseline even if the session ends during LoRA or LISA.
        baselines += self._run_baselines(seed, trained=True)
        if self._per_datum_lens():
            self._per_datum(seed, oracle)
        if self.t.ceiling_steps:
            self._train(seed, "ceiling/full", "ceiling", FreezeSpec.full(n), boundary=0, steps=self.t.ceiling_steps)
        if self.t.equal_compute_for(seed):
            self._equal_compute(seed, oracle, [*plans, *baselines])

    def replan_seed(self, seed: int) -> None:
        """Only what decides boundaries: every lens x estimator x policy plan and every baseline that does not
        train, for a seed whose sweep has started. Trains nothing: a new estimator or policy is scored against
        the oracle runs already finished (a plan's quality is the oracle run at its boundary)."""
        if self.store.get(RunStore.key(self.t.name, seed, "oracle/k=0"), self.recipe) is None:
            return
        self.meta()
        self._plans(seed)
        self._run_baselines(seed, trained=False)

    def _train(self, seed: int, variant: str, kind: str, spec: FreezeSpec, boundary: int | None = None,
               steps: int | None = None, run: TrainVariant | None = None, extra: dict | None = None) -> dict:
        steps = steps or self.t.steps
        return self._unit(seed, variant, steps, lambda: self._do_train(seed, variant, kind, spec, boundary, steps,
                                                                       run, extra or {}))

    def _do_train(self, seed: int, variant: str, kind: str, spec: FreezeSpec, boundary: int | None, steps: int,
                  run: TrainVariant | None, extra: dict, boundaries: Sequence[int] | None = None) -> dict[str, Any]:
        from salf.training import run as training_run  # looked up per call: tests stand in for run.train
        from salf.training.config import TrainConfig, TrainingInterrupted

        t = self.t
        lm = self.fresh_model(seed)
        config = TrainConfig(
            max_steps=steps, batch_size=t.batch_size, learning_rate=(run.learning_rate if run and run.learning_rate
                                                                     else t.lr),
            head_learning_rate=t.head_lr, warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, save_steps=None,
            seed=seed, lora=bool(run and run.lora), lora_rank=run.lora_rank if run else 8, overwrite=True,
            logging_steps=max(1, steps // 10), show_progress=False)
        callbacks = list(run.callbacks()) if run else []
        run_dir = self.p.out_dir / "runs" / t.name / f"seed{seed}" / variant.replace("/", "_").replace("=", "")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        status, error = "done", None
        run_dir.mkdir(parents=True, exist_ok=True)
        # The Trainer prints its log lines when its progress bar is off: they go to the run's train.log.
        with PeakRSS() as rss, open(run_dir / "train.log", "w") as log, \
                contextlib.redirect_stdout(log):
            try:
                metrics = training_run.train(lm.model, lm.tokenizer, self.loaded.data.data, self.eval_data.data, spec,
                                       config, run_dir, task=self.loaded.data.task, callbacks=callbacks,
                                       boundaries=boundaries)
            except TrainingInterrupted:
                raise
            except SalfError as e:  # a diverged run is a result (recorded, not retried), not a crash
                metrics, status, error = {}, "failed", str(e)
        metrics.pop("model_dir", None)
        metrics["process_peak_rss_bytes"] = metrics.pop("peak_rss_bytes", None)
        metrics.update(run_peak_rss_bytes=rss.peak, run_rss_growth_bytes=rss.peak - rss.start)
        if status == "done" and self.loaded.data.task == "completion":
            started = time.perf_counter()
            metrics.update(exact_match(lm.model, lm.tokenizer, self.eval_data.data[: t.em_limit], t.generation_batch))
            metrics["exact_match_seconds"] = time.perf_counter() - started
        if not self.suite.keep_models:
            shutil.rmtree(run_dir / "model", ignore_errors=True)
        self.trained += 1
        details = dict(extra)
        if run is not None:
            details.update(run.describe(callbacks))
        del lm
        return {"kind": kind, "boundary": boundary, "status": status, "error": error, "steps": steps,
                "spec": spec.to_dict(), "metrics": metrics, "details": details}

    def _plans(self, seed: int) -> list[dict]:
        from salf.method.gain import ESTIMATORS

        estimators = self.suite.estimators or ESTIMATORS.names()
        per_datum_lens = self._per_datum_lens()
        records = []
        for lens in self.p.lenses(self.suite.lenses):
            variants = [f"salf/{lens}/{e}/{p}" for e in estimators for p in self.suite.policies]
            keys = [RunStore.key(self.t.name, seed, v) for v in variants]
            planned = all(self.store.get(k, self.recipe) for k in keys)
            # The per-datum boundaries come from this lens's trace: trace again only when they are lost
            # (a runs.json from before the per-datum variant, whose plans are all finished).
            per_datum = lens == per_datum_lens and not any(
                self.store.get(RunStore.key(self.t.name, seed, v), self.recipe) for v in self.per_datum_variants(lens))
            if planned and not per_datum:
                self.progress.finish(RunStore.key(self.t.name, seed, f"trace/{lens}"), self._trace_weight(), None, "skip")
                records += [self.store.get(k, self.recipe) for k in keys]
                self.skipped += len(keys)
                continue
            if planned:
                records += [self.store.get(k, self.recipe) for k in keys]
                self.skipped += len(keys)
            records += self._trace_and_plan(seed, lens, [] if planned else estimators, per_datum)
        return records

    def _trace_and_plan(self, seed: int, lens: str, estimators: list[str], per_datum: bool = False) -> list[dict]:
        """Trace ``lens`` once; plan with every estimator x policy, and the per-datum boundaries if asked."""
        from salf.method.gain import estimate_gains, fit_depth_law
        from salf.method.plan import make_plan
        from salf.method.trace import TraceConfig, trace_model
        from salf.pipeline import data_info, model_info

        costs = self.costs
        lm = self.fresh_model(seed)
        config = TraceConfig(lens=lens, sample_size=self.t.trace_sample, batch_size=self.t.batch_size, seed=seed,
                             show_progress=False)
        began = started = time.perf_counter()
        trace = trace_model(lm.model, self.loaded.data.data, config, lm.pad_token_id)
        trace_seconds = time.perf_counter() - started
        info_model, info_data = model_info(lm), data_info(self.loaded.data)
        out = []
        gains_of: dict[str, tuple[Any, float]] = {}
        started = time.perf_counter()
        fit = fit_depth_law(trace.mean)  # one fit per trace, shared by every estimator
        fit_seconds = time.perf_counter() - started
        for estimator in estimators:
            started = time.perf_counter()
            gains = estimate_gains(trace.mean, estimator, fit, trace.chance)  # the same for every policy
            gains_of[estimator] = gains, fit_seconds + time.perf_counter() - started
            for policy in self.suite.policies:
                variant = f"salf/{lens}/{estimator}/{policy}"
                key = RunStore.key(self.t.name, seed, variant)
                started = time.perf_counter()
                plan = make_plan(trace, gains, costs["step_costs"], policy, info_model, info_data, seed=seed)
                plan_seconds = gains_of[estimator][1] + time.perf_counter() - started
                profiling = trace_seconds + costs["seconds"] + plan_seconds
                record = {"key": key, "task": self.t.name, "seed": seed, "variant": variant, "recipe": self.recipe,
                          "kind": "plan", "boundary": plan.boundary, "status": "done", "lens": lens,
                          "estimator": estimator, "policy": policy, "profiling_seconds": profiling,
                          "trace_seconds": trace_seconds, "cost_seconds": costs["seconds"], "plan_seconds": plan_seconds,
                          "details": {"trace": plan.trace, "gains": plan.gains, "fit": plan.fit,
                                      "predicted": plan.predicted, "note": gains.note,
                                      "chance": trace.chance, "frozen_share": gains.frozen_share},
                          "seconds": profiling, "finished": _now()}
                out.append(record)
        if per_datum:
            started = time.perf_counter()
            if PER_DATUM_ESTIMATOR in gains_of:
                gains, gain_seconds = gains_of[PER_DATUM_ESTIMATOR]
            else:
                gains = estimate_gains(trace.mean, PER_DATUM_ESTIMATOR, fit, trace.chance)
                gain_seconds = fit_seconds + time.perf_counter() - started
            started = time.perf_counter()
            plan = make_plan(trace, gains, costs["step_costs"], PER_DATUM_POLICY, info_model, info_data, seed=seed,
                             per_datum=True)
            plan_seconds = gain_seconds + time.perf_counter() - started
            profiling = trace_seconds + costs["seconds"] + plan_seconds
            variant = self.per_datum_variants(lens)[0]
            out.append({"key": RunStore.key(self.t.name, seed, variant), "task": self.t.name, "seed": seed,
                        "variant": variant, "recipe": self.recipe, "kind": "per-datum-plan", "status": "done",
                        "lens": lens, "estimator": PER_DATUM_ESTIMATOR, "policy": PER_DATUM_POLICY,
                        "boundary": plan.boundary, "n_train": len(self.loaded.data.data),
                        # rows of the trace are positions in the training data (trace_model read that list)
                        "traced_indices": plan.per_datum_indices, "traced_boundaries": plan.per_datum_boundaries,
                        "profiling_seconds": profiling, "trace_seconds": trace_seconds,
                        "cost_seconds": costs["seconds"], "plan_seconds": plan_seconds,
                        "details": {"trace": plan.trace, "gains": plan.gains, "predicted": plan.predicted,
                                    "note": gains.note},
                        "seconds": profiling, "finished": _now()})
        self.store.add(*out)
        plans = [r for r in out if r["kind"] == "plan"]
        self.progress.finish(RunStore.key(self.t.name, seed, f"trace/{lens}"), self._trace_weight(),
                             time.perf_counter() - began, f"traced and planned ({len(plans)} plans"
                             + (", per-datum boundaries)" if per_datum else ")"))
        del lm
        return plans

    def _per_datum(self, seed: int, oracle: dict[int, dict]) -> dict:
        """The per-datum variant's own run: every batch trained from its data's boundary."""
        lens = self._per_datum_lens()
        assert lens is not None
        plan_variant, variant = self.per_datum_variants(lens)

        def make() -> dict[str, Any]:
            from salf.training.perdatum import datum_boundaries

            plan = self.store.get(RunStore.key(self.t.name, seed, plan_variant), self.recipe)
            if plan is None:
                raise SalfError(f"{self.t.name} seed {seed}: the per-datum boundaries of lens {lens} are missing",
                                "rerun the benchmark with resume: the trace is redone")
            n, data = self.p.num_layers, self.loaded.data.data
            if plan["n_train"] != len(data):
                raise SalfError(f"the per-datum boundaries were made for {plan['n_train']} training data, "
                                f"the task has {len(data)}", "rerun without resume")
            boundaries = datum_boundaries(plan["traced_boundaries"], plan["traced_indices"], len(data),
                                          plan["boundary"], n, fill=PER_DATUM_FILL)
            counts = np.bincount(boundaries, minlength=n + 1)
            histogram = {str(k): int(c) for k, c in enumerate(counts) if c}
            body = self._do_train(seed, variant, "per-datum", FreezeSpec.from_boundary(int(boundaries.min()), n),
                                  None, self.t.steps, None, {}, boundaries=boundaries.tolist())
            body.update(lens=lens, estimator=plan["estimator"], policy=plan["policy"], fill=PER_DATUM_FILL,
                        global_boundary=plan["boundary"], boundary_histogram=histogram,
                        mean_boundary=float(boundaries.mean()), n_traced=len(plan["traced_indices"]),
                        traced_boundary_histogram=_histogram(plan["traced_boundaries"]),
                        profiling_seconds=plan["profiling_seconds"])
            if body["status"] == "done":
                body["metrics"].update(per_datum_flops(body["metrics"], oracle, self.costs["ratio"]))
                tokens = body["metrics"]["per_datum"]["padded_tokens_per_boundary"]
                total = sum(tokens.values())
                body["mean_boundary_trained"] = sum(int(k) * v for k, v in tokens.items()) / total if total else None
            return body

        return self._unit(seed, variant, self.t.steps, make)

    def _run_baselines(self, seed: int, trained: bool) -> list[dict]:
        """The baselines that train runs of their own (``trained``), or those that only choose a boundary."""
        out = []
        for name in self._baselines():
            baseline = BASELINES.get(name)
            variant = f"baseline/{name}"
            if baseline.trains != trained:
                continue
            if baseline.trains:
                key = RunStore.key(self.t.name, seed, variant)
                if self.store.get(key, self.recipe) is None:
                    choice = baseline.decide(self._baseline_context(seed))
                    out.append(self._train(seed, variant, "baseline", choice.variant.spec, run=choice.variant,
                                           extra=choice.details))
                else:
                    out.append(self._train(seed, variant, "baseline", FreezeSpec.full(self.p.num_layers)))
                continue

            def decide(baseline=baseline) -> dict[str, Any]:
                ctx = self._baseline_context(seed)
                started = time.perf_counter()
                try:
                    choice = baseline.decide(ctx)
                except SalfError as e:  # e.g. too few classes for the variability ratio: reported, not fatal
                    return {"kind": "baseline", "boundary": None, "status": "unavailable", "error": str(e)}
                profiling = time.perf_counter() - started - ctx.load_seconds
                return {"kind": "baseline", "boundary": choice.boundary, "status": "done",
                        "profiling_seconds": profiling, "details": choice.details}

            out.append(self._unit(seed, variant, 1.0, decide))
        return out

    def _baseline_context(self, seed: int) -> BaselineContext:
        return BaselineContext(load=lambda: self.fresh_model(seed), data=self.loaded.data, num_layers=self.p.num_layers,
                               cost=self.costs["ratio"], seed=seed, batch_size=self.t.batch_size,
                               learning_rate=self.t.lr, settings=self.t.baselines)

    def _equal_compute(self, seed: int, oracle: dict[int, dict], chosen: list[dict]) -> None:
        full = oracle[0].get("metrics", {}).get("flops_per_padded_token")
        boundaries = sorted({r["boundary"] for r in chosen if r.get("boundary") not in (None, 0)})
        for k in boundaries:
            per = oracle[k].get("metrics", {}).get("flops_per_padded_token")
            if not full or not per:
                continue
            steps = max(1, round(self.t.steps * full / per))
            self.progress.grow(steps)
            self._train(seed, f"equal-compute/k={k}", "equal-compute", FreezeSpec.from_boundary(k, self.p.num_layers),
                        boundary=k, steps=steps, extra={"steps_for_full_flops": steps})


def _histogram(boundaries: Iterable[int]) -> dict[str, int]:
    counts: dict[int, int] = defaultdict(int)
    for k in boundaries:
        counts[int(k)] += 1
    return {str(k): counts[k] for k in sorted(counts)}


def per_datum_flops(metrics: dict[str, Any], oracle: dict[int, dict], predicted_ratio: Sequence[float]) -> dict:
    """The measured training FLOPs of a per-datum run (``PER_DATUM_FLOPS_METHOD``), to update its metrics.

    ``salf.training.trainer`` counts FLOPs over the first step only, which trained from one boundary; here each
    boundary's padded tokens are weighed by that boundary's measured FLOPs per padded token. The
    first-step figures stay under ``*_first_step``; ``first_step_check`` compares the run's own count
    with the oracle's at the boundary of its first step (same instrument; batch widths differ).
    """

    def measured(k: int) -> float | None:
        record = oracle.get(k) or {}
        return (record.get("metrics") or {}).get("flops_per_padded_token") if record.get("status") == "done" else None

    per_datum = metrics.get("per_datum") or {}
    tokens = {int(k): int(v) for k, v in (per_datum.get("padded_tokens_per_boundary") or {}).items()}
    out: dict[str, Any] = {
        "train_flops_first_step": metrics.get("train_flops"),
        "train_flops_first_step_method": metrics.get("train_flops_method"),
        "flops_per_padded_token_first_step": metrics.get("flops_per_padded_token"),
        "train_flops_method": PER_DATUM_FLOPS_METHOD,
    }
    first = per_datum.get("first_boundary")
    if first is not None:
        out["first_step_check"] = {"boundary": first, "this_run": metrics.get("flops_per_padded_token"),
                                   "oracle": measured(int(first))}
    by_boundary, total = {}, 0.0
    full = measured(0)
    for k, count in sorted(tokens.items()):
        per_token, source = measured(k), f"oracle/k={k}"
        if per_token is None and full:
            per_token, source = float(predicted_ratio[k]) * full, "predicted ratio x oracle/k=0"
        if per_token is None:
            return {**out, "train_flops": None, "flops_per_padded_token": None, "flops_by_boundary": None}
        by_boundary[str(k)] = {"flops_per_padded_token": per_token, "padded_tokens": count,
                               "flops": per_token * count, "source": source}
        total += per_token * count
    trained = sum(tokens.values())
    return {**out, "train_flops": total if trained else None, "flops_by_boundary": by_boundary,
            "flops_per_padded_token": total / trained if trained else None,
            "padded_tokens_agree": trained == metrics.get("padded_tokens")}


# --------------------------------------------------------------------------------------------- analysis


def pareto_frontier(costs: Sequence[float], qualities: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points on the cost-quality frontier, cheapest first.

    A point is on it when no other point is at most as costly and at least as good with one of the two
    strictly; of several identical points the first is kept. Non-finite points are ignored.
    """
    sign = 1.0 if higher_is_better else -1.0
    points = [(float(c), sign * float(q), i) for i, (c, q) in enumerate(zip(costs, qualities))
              if c is not None and q is not None and math.isfinite(c) and math.isfinite(q)]
    points.sort(key=lambda p: (p[0], -p[1], p[2]))
    best, frontier = -math.inf, []
    for _, q, i in points:
        if q > best:
            frontier.append(i)
            best = q
    return frontier


def regret(plan_cost: float, plan_quality: float, oracle_costs: Sequence[float], oracle_qualities: Sequence[float],
           higher_is_better: bool = True, rtol: float = 1e-9) -> float | None:
    """Quality of the best oracle boundary costing no more than the plan, minus the plan's quality,
    signed so that positive is worse (for a loss: the plan's loss minus the best oracle loss).

    None when every oracle boundary costs more than the plan (nothing to compare with).
    """
    if plan_cost is None or plan_quality is None:
        return None
    affordable = [float(q) for c, q in zip(oracle_costs, oracle_qualities)
                  if c is not None and q is not None and math.isfinite(q) and c <= plan_cost * (1 + rtol)]
    if not affordable:
        return None
    return max(affordable) - plan_quality if higher_is_better else plan_quality - min(affordable)


TRADEOFF_LAMBDAS = (2.0, 10.0)
"""The lambdas of the trade-off regret (``tradeoff_regret``): points of quality that the whole of full
fine-tuning's FLOPs is worth. lambda = 2: one point of accuracy is worth 50% of full fine-tuning's FLOPs;
lambda = 10: 10%. ``regret`` never charges a cheap plan for the quality it gives up (the head-only boundary
has regret 0 whatever its accuracy: nothing is cheaper); these do."""


def regret_key(lam: float) -> str:
    """Field name of the trade-off regret at ``lam`` ('regret_2', 'regret_10')."""
    return f"regret_{lam:g}"


REGRET_KEYS = tuple(regret_key(lam) for lam in TRADEOFF_LAMBDAS)


def quality_points(value: float | None, higher_is_better: bool) -> float | None:
    """A quality in points, higher better: 100 x an accuracy or exact match, -100 x a loss (for 'lm' tasks,
    whose only quality is the eval loss), so that a point means the same in every regret."""
    if value is None or not math.isfinite(float(value)):
        return None
    return 100.0 * float(value) if higher_is_better else -100.0 * float(value)


def tradeoff_regret(plan_cost: float | None, plan_points: float | None, oracle_costs: Sequence[float | None],
                    oracle_points: Sequence[float | None], lam: float) -> float | None:
    """max over oracle boundaries k of [q(k) - lam c(k)], minus [q(plan) - lam c(plan)].

    q in points (``quality_points``), c the measured FLOPs as a fraction of full fine-tuning's (same seed).
    Every boundary competes, not only the cheaper ones: 0 for the boundary with the best trade-off,
    positive for any other, negative only for an own run (LoRA, per-datum) that beats every boundary.
    None when the plan, or every boundary, lacks a cost or a quality.
    """
    if plan_cost is None or plan_points is None:
        return None
    utilities = [q - lam * c for c, q in zip(oracle_costs, oracle_points)
                 if c is not None and q is not None and math.isfinite(c) and math.isfinite(q)]
    if not utilities:
        return None
    return max(utilities) - (plan_points - lam * plan_cost)


def share_kept(plan_quality: float | None, oracle_qualities: Sequence[float | None]) -> float | None:
    """The plan's quality over the best oracle boundary's (higher-is-better metrics; None without a positive best)."""
    best = max((float(q) for q in oracle_qualities if q is not None and math.isfinite(q)), default=None)
    return plan_quality / best if plan_quality is not None and best else None


def tradeoff_fields(metrics: dict[str, Any], oracle_runs: dict[int, dict], q_name: str,
                    q_high: bool) -> dict[str, float | None]:
    """Share kept and the trade-off regret at every lambda of one run, against the oracle runs of its seed."""
    full = oracle_runs.get(0, {}).get("train_flops")
    runs = list(oracle_runs.values())
    costs = [_ratio(m.get("train_flops"), full) for m in runs]
    points = [quality_points(m.get(q_name), q_high) for m in runs]
    cost, own = _ratio(metrics.get("train_flops"), full), quality_points(metrics.get(q_name), q_high)
    return {"share_kept": share_kept(metrics.get(q_name), [m.get(q_name) for m in runs]) if q_high else None,
            **{regret_key(lam): tradeoff_regret(cost, own, costs, points, lam) for lam in TRADEOFF_LAMBDAS}}


PER_SEED_FIELDS = ("boundary", "regret", *REGRET_KEYS, "share_kept", "flops_ratio")
"""What ``analyze`` keeps of every seed of a variant (beside the mean and std over seeds)."""


def _stats(values: Iterable[float | None]) -> dict[str, Any]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def analyze(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per task: the oracle per boundary, and plans / baselines with quality, cost and regret, over seeds."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    return {task: _analyze_task(rs) for task, rs in by_task.items()}


def _analyze_task(records: list[dict]) -> dict[str, Any]:
    meta = next((r for r in records if r["variant"] == "meta"), None)
    if meta is None:
        return {}
    n, data_task = meta["num_layers"], meta["data_task"]
    q_name, q_high = QUALITY[data_task]
    seeds = sorted({r["seed"] for r in records if r["seed"] is not None})
    oracle: dict[int, dict[int, dict]] = {s: {} for s in seeds}
    for r in records:
        if r.get("kind") == "oracle" and r.get("status") == "done":
            oracle[r["seed"]][r["boundary"]] = r["metrics"]

    def point(seed: int, metrics: dict) -> dict[str, Any]:
        full = oracle[seed].get(0, {})
        ks = sorted(oracle[seed])
        costs = [oracle[seed][k].get("train_flops") for k in ks]
        cost = metrics.get("train_flops")
        quality, loss = metrics.get(q_name), metrics.get(LOSS[0])
        return {
            "quality": quality, "loss": loss,
            # share of full fine-tuning's quality kept (same seed); for higher-is-better metrics only
            "quality_ratio": _ratio(quality, full.get(q_name)) if q_high else None,
            "flops_ratio": _ratio(cost, full.get("train_flops")),
            "step_time_ratio": _ratio(metrics.get("step_seconds_median"), full.get("step_seconds_median")),
            "regret": regret(cost, quality, costs, [oracle[seed][k].get(q_name) for k in ks], q_high),
            "regret_loss": regret(cost, loss, costs, [oracle[seed][k].get(LOSS[0]) for k in ks], LOSS[1]),
            **tradeoff_fields(metrics, oracle[seed], q_name, q_high),
            "full_train_seconds": full.get("train_seconds"),
        }

    rows: dict[str, list[dict]] = {}
    for r in records:
        kind = r.get("kind")
        if kind not in ("plan", "per-datum", "baseline", "ceiling", "equal-compute") or r.get("status") != "done":
            continue
        if r.get("metrics"):  # its own run
            metrics = r["metrics"]
        elif r.get("boundary") is not None and r["boundary"] in oracle.get(r["seed"], {}):
            metrics = oracle[r["seed"]][r["boundary"]]  # the oracle run at its boundary: identical by construction
        else:
            continue
        p = point(r["seed"], metrics)
        boundary = r.get("mean_boundary") if kind == "per-datum" else r.get("boundary")
        p.update(seed=r["seed"], boundary=boundary, kind=kind,
                 profiling_seconds=r.get("profiling_seconds"), reuses_oracle=not r.get("metrics"),
                 profiling_fraction=_ratio(r.get("profiling_seconds"), p["full_train_seconds"]))
        rows.setdefault(r["variant"], []).append(p)

    unavailable = [{"variant": r["variant"], "seed": r["seed"], "status": r.get("status"), "error": r.get("error")}
                   for r in records if r.get("status") not in (None, "done")]
    fields = ("quality", "quality_ratio", "loss", "flops_ratio", "step_time_ratio", "regret", "regret_loss",
              *REGRET_KEYS, "share_kept", "profiling_seconds", "profiling_fraction", "boundary")
    variants = {}
    for variant, ps in sorted(rows.items()):
        variants[variant] = {"kind": ps[0]["kind"], "boundaries": [p["boundary"] for p in ps],
                             "seeds": [p["seed"] for p in ps], "reuses_oracle": ps[0]["reuses_oracle"],
                             **{f: _stats(p[f] for p in ps) for f in fields},
                             # per seed, so that tables over several tasks (``regret_by_model``) pool seeds
                             "per_seed": [{f: p[f] for f in ("seed", *PER_SEED_FIELDS)} for p in ps]}

    predicted = meta["predicted_step_flops_ratio"]
    per_k = []
    for k in range(n + 1):
        ms = [oracle[s][k] for s in seeds if k in oracle[s]]
        pts = [point(s, oracle[s][k]) for s in seeds if k in oracle[s]]
        per_k.append({
            "k": k, "predicted_flops_ratio": predicted[k], "predicted_memory_ratio": meta["predicted_memory_ratio"][k],
            "n": len(ms), **{f: _stats(p[f] for p in pts) for f in ("quality", "quality_ratio", "loss", "flops_ratio",
                                                                   "step_time_ratio", *REGRET_KEYS, "share_kept")},
            "train_seconds": _stats(m.get("train_seconds") for m in ms),
            "run_rss_growth_bytes": _stats(m.get("run_rss_growth_bytes") for m in ms),
        })
    mean_cost = [row["flops_ratio"]["mean"] for row in per_k]
    mean_quality = [row["quality"]["mean"] for row in per_k]
    on_frontier = set(pareto_frontier(mean_cost, mean_quality, q_high))
    for row in per_k:
        row["on_frontier"] = row["k"] in on_frontier
    return {"data_task": data_task, "num_layers": n, "quality_metric": q_name, "higher_is_better": q_high,
            "seeds": seeds, "oracle": per_k, "variants": variants, "model": meta.get("model"),
            "unavailable": unavailable, "plan_regret": _plan_regret(rows),
            "per_datum": _per_datum_comparison(records, oracle, point),
            "n_train": meta.get("n_train"), "n_eval": meta.get("n_eval"),
            "recipe": meta.get("task_config", {}), "target": _target_check(per_k, variants)}


TARGET_QUALITY, TARGET_FLOPS = 0.99, 0.60
"""The headline target: keep >= 99% of full fine-tuning's quality at <= 60% of its training FLOPs (means over seeds)."""


def _target_check(per_k: list[dict], variants: dict[str, dict]) -> dict[str, Any]:
    """Which oracle boundaries and which rows meet the headline target (None where quality has no ratio)."""

    def meets(row: dict) -> bool:
        q, c = (row.get("quality_ratio") or {}).get("mean"), (row.get("flops_ratio") or {}).get("mean")
        return q is not None and c is not None and q >= TARGET_QUALITY and c <= TARGET_FLOPS + 1e-9

    keeping = [row for row in per_k if (row.get("quality_ratio") or {}).get("mean") is not None
               and row["quality_ratio"]["mean"] >= TARGET_QUALITY]
    cheapest = min(keeping, key=lambda row: row["flops_ratio"]["mean"], default=None)
    return {"quality": TARGET_QUALITY, "flops": TARGET_FLOPS,
            "cheapest_oracle_keeping_quality": None if cheapest is None else
            {"k": cheapest["k"], "flops_ratio": cheapest["flops_ratio"]["mean"],
             "quality_ratio": cheapest["quality_ratio"]["mean"]},
            "oracle_meeting": [row["k"] for row in per_k if meets(row)],
            "variants_meeting": sorted(name for name, v in variants.items() if meets(v))}


def _per_datum_comparison(records: list[dict], oracle: dict[int, dict[int, dict]],
                          point: Callable[[int, dict], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each per-datum variant against its single-boundary plan (the oracle run at the global boundary)."""
    fields = ("quality", "loss", "flops_ratio", "step_time_ratio", "regret", "regret_loss", *REGRET_KEYS, "share_kept")
    out: dict[str, dict[str, Any]] = {}
    for r in sorted((r for r in records if r.get("kind") == "per-datum" and r.get("status") == "done"),
                    key=lambda r: (r["variant"], r["seed"])):
        seed, k = r["seed"], r.get("global_boundary")
        single = point(seed, oracle[seed][k]) if k in oracle.get(seed, {}) else {}
        entry = out.setdefault(r["variant"], {
            "lens": r.get("lens"), "estimator": r.get("estimator"), "policy": r.get("policy"),
            "single_variant": f"salf/{r.get('lens')}/{r.get('estimator')}/{r.get('policy')}", "per_seed": []})
        entry["per_seed"].append({
            "seed": seed, "global_boundary": k, "mean_boundary": r.get("mean_boundary"),
            "mean_boundary_trained": r.get("mean_boundary_trained"), "boundary_histogram": r.get("boundary_histogram"),
            "per_datum": {f: point(seed, r["metrics"])[f] for f in fields},
            "single": {f: single.get(f) for f in fields}})
    for entry in out.values():
        seeds = entry["per_seed"]
        entry["per_datum"] = {f: _stats(s["per_datum"][f] for s in seeds) for f in fields}
        entry["single"] = {f: _stats(s["single"][f] for s in seeds) for f in fields}
        entry["quality_gain"] = _stats(None if s["per_datum"]["quality"] is None or s["single"]["quality"] is None
                                       else s["per_datum"]["quality"] - s["single"]["quality"] for s in seeds)
        entry["mean_boundary"] = _stats(s["mean_boundary"] for s in seeds)
        entry["global_boundary"] = _stats(s["global_boundary"] for s in seeds)
    return out


def _plan_regret(rows: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Regret of salf plans by '<lens>/<estimator>' (rows) and policy (columns), over seeds."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, ps in rows.items():
        if ps[0]["kind"] != "plan":
            continue
        _, lens, estimator, policy = variant.split("/", 3)
        table.setdefault(f"{lens}/{estimator}", {})[policy] = {
            f: _stats(p[f] for p in ps) for f in ("regret", "regret_loss", *REGRET_KEYS)}
    return table


# --------------------------------------------------------------------------------------------- regret by model

ALL_MODELS = "all models"
"""The per-model table's key for every task of every model pooled (present when there are several models)."""
REGRET_TABLE_KINDS = ("plan", "per-datum", "baseline")
"""Rows of the per-model table: ways of choosing what to train. Ceiling and equal-compute runs train the same
boundaries on other budgets, so they stay in the per-task tables."""
REGRET_TABLE_ORDER = regret_key(max(TRADEOFF_LAMBDAS))
"""The per-model table is sorted by the trade-off regret that weighs cost most (the largest lambda: salf is
there to save compute, and this one still charges a point of quality at a tenth of full fine-tuning's FLOPs),
then by name."""


def default_plan(data_task: str) -> str:
    """The variant name of the default salf plan for a task's labels (e.g. 'salf/probe/sufficiency-uniform/unsolved')."""
    from salf.method.gain import DEFAULT_ESTIMATOR
    from salf.method.trace import CLASS_LABELS, DEFAULT_LENS, TOKEN_LABELS

    lens = DEFAULT_LENS[CLASS_LABELS if data_task == "classification" else TOKEN_LABELS]
    return f"salf/{lens}/{DEFAULT_ESTIMATOR}/{DEFAULT_POLICY}"


def _pooled_row(variant: str, entry: dict[str, Any]) -> dict[str, Any]:
    """One row of the per-model table: means over every (task, seed) of the variant."""
    seeds = entry["per_seed"]
    return {"variant": variant, "kind": entry["kind"], "default": entry["default"], "tasks": entry["tasks"],
            "n": len(seeds),
            # the plain regret in points too (x 100; for a loss task: 100 x the loss regret), like the lambda columns
            "regret_points": _stats(None if s["regret"] is None else 100.0 * s["regret"] for s in seeds),
            **{f: _stats(s[f] for s in seeds) for f in (*REGRET_KEYS, "share_kept", "flops_ratio")}}


def _table_order(row: dict[str, Any]) -> tuple[Any, ...]:
    mean = row[REGRET_TABLE_ORDER]["mean"]
    return (mean is None, mean if mean is not None else 0.0, row["variant"])


def regret_by_model(analyses: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model (a task's ``model``), every plan, per-datum variant and baseline pooled over all its tasks and
    seeds: mean regret (points), trade-off regrets, share kept and FLOPs, sorted by ``REGRET_TABLE_ORDER``.

    ``analyses``: one ``analyze`` result per result directory, so that one table may span several benchmarks.
    A per-task table answers "which boundary here"; this one answers "which way of choosing, across tasks".
    Every (task, seed) weighs the same; ``tasks`` and ``n`` say how many a row holds (a baseline unavailable
    on a task has fewer). With tasks of several models, one more table, ``ALL_MODELS``, pools them all.
    """
    pooled: dict[str, dict[str, dict[str, Any]]] = {}
    tasks: dict[str, list[str]] = {}
    for analysis in analyses:
        for name, task in analysis.items():
            if not task:
                continue
            model = str(task.get("model"))
            default = default_plan(task["data_task"])
            for group in (model, ALL_MODELS):
                tasks.setdefault(group, []).append(name)
                for variant, v in task["variants"].items():
                    if v["kind"] not in REGRET_TABLE_KINDS:
                        continue
                    entry = pooled.setdefault(group, {}).setdefault(
                        variant, {"kind": v["kind"], "default": False, "tasks": [], "per_seed": []})
                    entry["default"] = entry["default"] or variant == default
                    entry["tasks"].append(name)
                    entry["per_seed"] += v["per_seed"]
    if len(tasks) <= 2:  # one model (or none): the pooled table would repeat it
        pooled.pop(ALL_MODELS, None)
        tasks.pop(ALL_MODELS, None)
    return {model: {"tasks": tasks[model], "sort_by": REGRET_TABLE_ORDER, "lambdas": list(TRADEOFF_LAMBDAS),
                    "rows": sorted((_pooled_row(v, e) for v, e in variants.items()), key=_table_order)}
            for model, variants in pooled.items()}


def load_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/runs.json`` (a ``salf bench`` output directory)."""
    path = Path(out_dir) / "runs.json"
    if not path.is_file():
        raise SalfError(f"{path} not found", "give directories written by `salf bench --out DIR`")
    try:
        return list(json.loads(path.read_text()).get("runs", []))
    except json.JSONDecodeError:
        raise SalfError(f"{path} is damaged (not JSON)") from None


def combined_regret(dirs: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """``regret_by_model`` over the finished seeds of several benchmark output directories at once."""
    return regret_by_model(analyze(complete_records(load_runs(d))) for d in dirs)


# --------------------------------------------------------------------------------------------- reports


def _fmt(stat: dict[str, Any] | None, digits: int = 3, pct: bool = False, spread: bool = True) -> str:
    """``mean ± std`` of a ``_stats`` dict (the std only with ``spread`` and more than one value)."""
    if not stat or stat.get("mean") is None:
        return "-"
    scale, suffix = (100.0, "%") if pct else (1.0, "")
    text = f"{stat['mean'] * scale:.{digits}f}{suffix}"
    if spread and stat.get("n", 0) > 1:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _boundaries_text(v: dict[str, Any]) -> str:
    if v["kind"] == "per-datum":  # the mean boundary of the training data, per seed
        return "per datum, mean " + ",".join(f"{b:.2f}" for b in v["boundaries"])
    return ",".join(str(b) for b in v["boundaries"])


def _target_lines(task: dict[str, Any]) -> str:
    t = task.get("target") or {}
    if not t or task["quality_metric"] is None or not task["higher_is_better"]:
        return ""
    goal = f"at least {t['quality']:.0%} of full fine-tuning's quality at no more than {t['flops']:.0%} of its FLOPs"
    cheapest = t["cheapest_oracle_keeping_quality"]
    keep = ("no boundary but full fine-tuning keeps it" if cheapest is None or cheapest["k"] == 0 else
            f"the cheapest boundary keeping {t['quality']:.0%} is k={cheapest['k']} "
            f"({cheapest['quality_ratio']:.1%} of full at {cheapest['flops_ratio']:.3f} FLOPs)")
    oracle = ", ".join(f"k={k}" for k in t["oracle_meeting"]) or "none"
    rows = ", ".join(f"`{v}`" for v in t["variants_meeting"]) or "none"
    return (f"**Target** ({goal}, means over seeds): {keep}; oracle boundaries meeting it: {oracle}; "
            f"plans and baselines meeting it: {rows}.")


LAMBDA_HEADERS = tuple(f"regret λ={lam:g} (points)" for lam in TRADEOFF_LAMBDAS)
TRADEOFF_HEADERS = (*LAMBDA_HEADERS, "share of best kept")


def _tradeoff_cells(v: dict[str, Any]) -> list[str]:
    """The trade-off regrets (points) and the share of the best boundary's quality kept, as table cells."""
    return [*(_fmt(v.get(key), 2) for key in REGRET_KEYS), _fmt(v.get("share_kept"), 1, pct=True)]


def _variant_rows(task: dict[str, Any], kinds: tuple[str, ...]) -> list[list[Any]]:
    rows = []
    for name, v in task["variants"].items():
        if v["kind"] not in kinds:
            continue
        rows.append([name, _boundaries_text(v), _fmt(v["quality"]), _fmt(v.get("quality_ratio")), _fmt(v["loss"]),
                     _fmt(v["flops_ratio"]), _fmt(v["step_time_ratio"]), _fmt(v["regret"]), _fmt(v["regret_loss"]),
                     *_tradeoff_cells(v), _fmt(v["profiling_seconds"], 1), _fmt(v["profiling_fraction"], 1, pct=True),
                     "oracle run" if v["reuses_oracle"] else "own run"])
    return rows


VARIANT_HEADERS = ("variant", "boundary per seed", "quality", "quality x full", "eval loss", "FLOPs x full", "step time x full",
                   "regret (quality)", "regret (loss)", *TRADEOFF_HEADERS, "profiling s", "profiling / full train",
                   "quality from")


def _per_datum_section(comparison: dict[str, dict[str, Any]]) -> list[str]:
    parts = ["### Per-datum vs single boundary", "",
             "Per datum: every traced datum trained from its own boundary (its own deviation trace, the same "
             "policy), every other datum from the plan's global boundary; one run of its own with the oracle "
             "recipe, steps and seed, batches grouped by boundary. Single boundary: the plan from the same "
             "trace, estimator and policy (the oracle run at its boundary). FLOPs of the per-datum run: "
             "each boundary's measured FLOPs per padded token (its oracle run) times the padded tokens trained "
             "there; step time is the median over its steps, which mix boundaries.", ""]
    rows = []
    for variant, e in comparison.items():
        seeds = e["per_seed"]
        single_k = ",".join(str(s["global_boundary"]) for s in seeds)
        histogram = "; ".join(", ".join(f"k={k}: {n}" for k, n in (s["boundary_histogram"] or {}).items())
                              for s in seeds)
        for name, point, boundary, data in ((e["single_variant"], e["single"], single_k, f"all at k={single_k}"),
                                            (variant, e["per_datum"], _fmt(e["mean_boundary"], 2), histogram)):
            rows.append([name, boundary, _fmt(point["quality"]), _fmt(point["loss"]), _fmt(point["flops_ratio"]),
                         _fmt(point["step_time_ratio"]), _fmt(point["regret"]), *_tradeoff_cells(point), data])
    parts += [_md_table(["variant", "mean boundary", "quality", "eval loss", "FLOPs x full", "step time x full",
                         "regret (quality)", *TRADEOFF_HEADERS, "training data per boundary"], rows), ""]
    parts += [f"- `{variant}`: quality per datum minus single boundary {_fmt(e['quality_gain'])} "
              f"over {len(e['per_seed'])} seed(s)" for variant, e in comparison.items()]
    return [*parts, ""]


TRADEOFF_TEXT = (
    "**Trade-off regret and share kept.** The plain regret (the best oracle boundary costing no more than the row, "
    "minus the row) never charges a cheap row for the quality it gives up (the head-only boundary has regret 0 "
    "whatever its accuracy: nothing is cheaper). Regret λ = max over oracle boundaries k of "
    "[q(k) - λ c(k)] minus [q(row) - λ c(row)], with q in points (100 x accuracy or exact match; -100 x eval loss "
    "for language-modelling tasks) and c the measured FLOPs as a fraction of full fine-tuning's (same seed): "
    + ", ".join(f"λ = {lam:g} values one point at {1 / lam:.0%} of full fine-tuning's FLOPs" for lam in TRADEOFF_LAMBDAS)
    + ". 0 is the boundary with the best trade-off, positive is worse (in points). Share of best kept = the row's "
    "quality over the best boundary's (higher-is-better metrics). Per seed, then mean ± std over seeds.")


def regret_table_markdown(table: dict[str, dict[str, Any]]) -> list[str]:
    """The per-model table (``regret_by_model``) as a results.md section."""
    if not table:
        return []
    parts = ["## Regret by model: every way of choosing, over all tasks and seeds", "",
             f"Every salf plan (lens/estimator/policy), per-datum variant and baseline, mean over all the model's tasks "
             f"and seeds (each (task, seed) weighs the same), sorted by {REGRET_TABLE_ORDER.replace('regret_', 'regret λ=')}. "
             "All regrets in points (the plain regret x 100). **Bold**: the default plan (the default lens for the "
             "labels, the default estimator and policy). 'tasks' / 'runs': how many tasks and (task, seed) pairs a row "
             "holds.", ""]
    for model, entry in table.items():
        rows = [[i, f"**{r['variant']}** (default)" if r["default"] else r["variant"], r["kind"], len(r["tasks"]),
                 r["n"], _fmt(r["regret_points"], 2, spread=False), *(_fmt(r[key], 2, spread=False) for key in REGRET_KEYS),
                 _fmt(r["share_kept"], 1, pct=True, spread=False), _fmt(r["flops_ratio"], 3, spread=False)]
                for i, r in enumerate(entry["rows"], 1)]
        parts += [f"### Model `{model}` ({len(entry['tasks'])} task(s): {', '.join(entry['tasks'])})", "",
                  _md_table(["#", "variant", "kind", "tasks", "runs", "regret (points)", *LAMBDA_HEADERS,
                             "share of best kept", "FLOPs x full"], rows), ""]
    return parts


def render_markdown(suite: BenchSuite, analysis: dict[str, Any], out_dir: Path) -> str:
    parts = [f"# salf bench: suite `{suite.name}`", "",
             f"{suite.description}".strip(), "",
             f"Generated {_now()} on {os.cpu_count()} CPU core(s), torch {torch.__version__}, "
             f"{torch.get_num_threads()} torch thread(s). Records: `{out_dir / 'runs.json'}`; figure: `frontier.png`.",
             "",
             "**How to read this.** Every salf plan and every boundary baseline is scored with the oracle run at "
             "its boundary: the same recipe, seed and data, so that run is exactly what training the plan would "
             "give (identical by construction; nothing is retrained). LoRA, LISA, per-datum, ceiling and equal-compute "
             "rows are runs of their own. Cost is the measured training FLOPs (FlopCounterMode) relative to full fine-tuning "
             "(k=0) of the same seed. Regret = quality of the best oracle boundary whose measured FLOPs are at most the "
             "row's, minus the row's quality (for the loss: the row's loss minus the best oracle loss); positive is "
             "worse, 0 means on the frontier, negative (own runs only) means better than every affordable boundary; "
             "'-' when every boundary costs more. Mean ± std over seeds (std with n-1). Step times are wall-clock on a "
             "shared machine and noisier than FLOPs; memory is the cost model's prediction (measured RSS growth in "
             "runs.json is a lower bound once the allocator keeps freed memory).", "",
             TRADEOFF_TEXT, "", *regret_table_markdown(regret_by_model([analysis]))]
    for name, task in analysis.items():
        if not task:
            continue
        q = task["quality_metric"]
        recipe = task["recipe"]
        parts += [f"## {name}", "",
                  f"Model `{task['model']}`, {task['num_layers']} blocks, {task['data_task']} "
                  f"({task['n_train']} train / {task['n_eval']} eval rows); quality = `{q}` "
                  f"({'higher' if task['higher_is_better'] else 'lower'} is better); seeds {task['seeds']}; "
                  f"{recipe.get('steps')} steps, batch {recipe.get('batch_size')}, lr {recipe.get('lr')}, "
                  f"head lr {recipe.get('head_lr')}, max length {recipe.get('max_length')}.", "",
                  "### Oracle sweep (k = first trained block; k = L trains the head only: the frozen-features floor)", ""]
        rows = [[row["k"], _fmt(row["quality"]), _fmt(row.get("quality_ratio")), _fmt(row["loss"]),
                 f"{row['predicted_flops_ratio']:.3f}",
                 _fmt(row["flops_ratio"]), _fmt(row["step_time_ratio"]), f"{row['predicted_memory_ratio']:.3f}",
                 _fmt(row["train_seconds"], 1), "yes" if row["on_frontier"] else "",
                 *(_fmt(row.get(key), 2) for key in REGRET_KEYS)] for row in task["oracle"]]
        parts += [_md_table(["k", q, f"{q} x full", "eval loss", "predicted step FLOPs x full", "measured FLOPs x full",
                             "measured step time x full", "predicted memory x full", "train s", "on frontier",
                             *LAMBDA_HEADERS], rows), ""]
        parts += _target_lines(task), ""
        if task["plan_regret"]:
            policies = sorted({p for row in task["plan_regret"].values() for p in row})
            rows = [[name, *(" / ".join([_fmt(row[p]["regret"]), _fmt(row[p]["regret_loss"]),
                                         *(_fmt(row[p].get(key), 2) for key in REGRET_KEYS)]) if p in row else "-"
                             for p in policies)] for name, row in sorted(task["plan_regret"].items())]
            lambdas = " / ".join(f"λ={lam:g}" for lam in TRADEOFF_LAMBDAS)
            parts += [f"### Regret of salf plans by lens/estimator and policy (quality / loss / trade-off {lambdas} "
                      "in points; 0 = on the frontier, or the best trade-off)", "",
                      _md_table(["lens/estimator", *policies], rows), ""]
        for title, kinds in (("salf plans", ("plan", "per-datum")), ("Baselines", ("baseline",)),
                             ("Ceiling and equal compute", ("ceiling", "equal-compute"))):
            rows = _variant_rows(task, kinds)
            if rows:
                parts += [f"### {title}", "", _md_table(VARIANT_HEADERS, rows), ""]
            if title == "salf plans" and task.get("per_datum"):
                parts += _per_datum_section(task["per_datum"])
        if task["unavailable"]:
            parts += ["### Not available", "", *(f"- `{u['variant']}` seed {u['seed']}: {u['status']}: "
                                                 f"{(u['error'] or '').splitlines()[0]}" for u in task["unavailable"]), ""]
    return "\n".join(parts) + "\n"


def frontier_png(analysis: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [(n, t) for n, t in analysis.items() if t and t.get("seeds")]  # a task with no finished seed has nothing to draw
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(7.5 * max(1, len(tasks)), 5.5), squeeze=False)
    markers = {"knee": "*", "budget=0.5": "s", "coverage=0.9": "D", "unsolved": "h"}
    for ax, (name, task) in zip(axes[0], tasks):
        ks = task["oracle"]
        xs = [r["flops_ratio"]["mean"] for r in ks]
        ys = [r["quality"]["mean"] for r in ks]
        err = [r["quality"]["std"] or 0.0 for r in ks]
        good = [i for i in range(len(ks)) if xs[i] is not None and ys[i] is not None]
        ax.errorbar([xs[i] for i in good], [ys[i] for i in good], yerr=[err[i] for i in good], fmt="o", color="0.55",
                    label="oracle boundary k", zorder=2)
        for i in good:
            ax.annotate(f"k={ks[i]['k']}", (xs[i], ys[i]), fontsize=7, xytext=(3, -10), textcoords="offset points")
        front = [i for i in range(len(ks)) if ks[i]["on_frontier"]]
        front.sort(key=lambda i: xs[i])
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="0.3", lw=1.2, label="oracle frontier")
        colors: dict[str, str] = {}
        for j, (variant, v) in enumerate(sorted(task["variants"].items())):
            x, y = v["flops_ratio"]["mean"], v["quality"]["mean"]
            if x is None or y is None:
                continue
            jitter = 0.004 * ((j % 7) - 3)
            if v["kind"] == "plan":
                _, lens, estimator, policy = variant.split("/", 3)
                color = colors.setdefault(f"{lens}/{estimator}", f"C{len(colors) % 10}")
                ax.plot(x + jitter, y, markers.get(policy, "P"), color=color, ms=8, alpha=0.85, zorder=3,
                        label=f"salf {lens}/{estimator}" if policy == DEFAULT_POLICY else None)
            elif v["kind"] == "per-datum":
                ax.plot(x, y, "P", color="crimson", ms=9, zorder=5, label=f"salf per datum ({variant.split('/', 1)[1]})")
            elif v["kind"] == "ceiling":
                # a line, not a point: its 3x cost would squash the equal-step region into a corner
                ax.axhline(y, color="0.5", ls="--", lw=1, label=f"ceiling: full fine-tuning, {x:.1f}x the FLOPs")
            elif v["kind"] == "equal-compute":
                ax.plot(x, y, "v", color="tab:purple", ms=7, zorder=4)
                ax.annotate(f"{variant.split('/', 1)[1]}, full FLOPs", (x, y), fontsize=6, xytext=(3, 4),
                            textcoords="offset points", color="tab:purple")
            else:
                ax.plot(x, y, "x" if v["reuses_oracle"] else "^", color="k", ms=7, zorder=4)
                ax.annotate(variant.split("/", 1)[1], (x, y), fontsize=6, xytext=(3, 4), textcoords="offset points")
        ax.set_xlabel("measured training FLOPs / full fine-tuning")
        ax.set_ylabel(task["quality_metric"] + ("" if task["higher_is_better"] else " (lower is better)"))
        ax.set_title(f"{name} ({len(task['seeds'])} seed(s))\nmarkers: * knee, ■ budget=0.5, ◆ coverage=0.9, hexagon unsolved, "
                     "+ per datum; x/▲ baselines; ▼ equal compute", fontsize=9)
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@dataclass
class BenchResult:
    """What ``run_bench`` did and found."""

    suite: BenchSuite
    out_dir: Path
    analysis: dict[str, Any]
    trained: int
    """Training runs done by this call (0 when everything was already in runs.json)."""
    skipped: int
    """Units found finished in runs.json and not repeated."""
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)

    def render(self) -> str:
        from salf.table import render_table

        out = []
        for name, task in self.analysis.items():
            if not task:
                continue
            rows = []
            for variant, v in task["variants"].items():
                rows.append([variant, _boundaries_text(v), v["quality"]["mean"], v["flops_ratio"]["mean"],
                             v["regret"]["mean"], v["regret_loss"]["mean"], *(v[key]["mean"] for key in REGRET_KEYS)])
            title = f"{name}: quality = {task['quality_metric']}, cost = measured FLOPs x full, mean over {len(task['seeds'])} seed(s)"
            out.append(render_table(["variant", "k", "quality", "cost", "regret", "regret (loss)",
                                     *(f"regret λ={lam:g}" for lam in TRADEOFF_LAMBDAS)], rows, title))
        out.append(f"\n{self.trained} training run(s) now, {self.skipped} unit(s) reused from runs.json, "
                   f"{_duration(self.seconds)}; " + ", ".join(f"{k}: {v}" for k, v in self.paths.items()))
        return "\n\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite.name, "out_dir": str(self.out_dir), "trained": self.trained,
                "skipped": self.skipped, "seconds": self.seconds, "analysis": self.analysis,
                "regret_by_model": regret_by_model([self.analysis]),
                "paths": {k: str(v) for k, v in self.paths.items()}}


def write_reports(suite: BenchSuite, records: Iterable[dict], out_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """results.md, frontier.png and summary.json (``{"regret_by_model": ..., "tasks": analysis}``)."""
    analysis = analyze(records)
    summary = {"regret_by_model": regret_by_model([analysis]), "tasks": analysis}
    paths = {"runs": out_dir / "runs.json",
             "results": write_atomic(out_dir / "results.md", render_markdown(suite, analysis, out_dir)),
             "frontier": write_atomic(out_dir / "frontier.png", frontier_png(analysis)),
             "summary": write_json(out_dir / "summary.json", summary),
             "progress": out_dir / "progress.log"}
    return analysis, paths


# --------------------------------------------------------------------------------------------- entry points


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-load progress bars or info lines from transformers during hours of runs (restored after)."""
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    ds_bars = ds_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            ds_logging.enable_progress_bar()


def complete_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of every (task, seed) whose oracle sweep finished (all boundaries 0..L), plus task records.

    A benchmark stopped mid-seed leaves a partial sweep, which would make regret and the frontier lie.
    """
    records = list(records)
    layers = {r["task"]: r["num_layers"] for r in records if r.get("kind") == "meta"}
    oracle: dict[tuple[str, Any], set[str]] = defaultdict(set)
    for r in records:
        if r.get("variant", "").startswith("oracle/"):
            oracle[(r["task"], r["seed"])].add(r["variant"])
    done = {key for key, variants in oracle.items() if len(variants) >= layers.get(key[0], 0) + 1}
    return [r for r in records if r.get("seed") is None or (r["task"], r["seed"]) in done]


def report_bench(suite: BenchSuite, out_dir: str | Path) -> BenchResult:
    """Write the reports of the finished seeds in ``out_dir/runs.json`` without training anything."""
    started = time.perf_counter()
    out = Path(out_dir)
    store = RunStore(out / "runs.json", suite, resume=True)
    if not store.records:
        raise SalfError(f"{out / 'runs.json'} holds no runs", f"run `salf bench --suite {suite.name} --out {out}` first")
    analysis, paths = write_reports(suite, complete_records(store.records.values()), out)
    return BenchResult(suite, out, analysis, 0, len(store.records), time.perf_counter() - started, paths)


def run_bench(suite: BenchSuite, out_dir: str | Path, resume: bool = True, show_progress: bool = True,
              report_suite: BenchSuite | None = None, replan: bool = False) -> BenchResult:
    """Run (or resume) ``suite`` into ``out_dir``; finished runs in ``out_dir/runs.json`` are not repeated.

    ``replan``: train nothing; plan every started seed again with every registered lens, estimator, policy
    and boundary baseline missing from ``runs.json`` (``TaskBench.replan_seed``).

    ``report_suite`` (default ``suite``): the suite the reports cover, e.g. the whole suite when this
    process runs only some of its tasks.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if suite.threads:
        torch.set_num_threads(suite.threads)
    store = RunStore(out / "runs.json", suite, resume)
    if not resume:
        (out / "progress.log").unlink(missing_ok=True)
    with _quiet_transformers():
        prepared = [PreparedTask.prepare(t, out) for t in suite.tasks]
        progress = Progress(out / "progress.log", 0.0, show_progress)
        benches = [TaskBench(p, suite, store, progress) for p in prepared]
        progress.grow(sum(b.units_weight() * len(b.t.seeds) for b in benches))
        # The Trainer runs a full garbage collection after every run (accelerate's free_memory); with torch,
        # transformers and the data loaded that scans some 500 000 objects (about a second). Freezing
        # them leaves it only what the run made.
        gc.freeze()
        try:
            for b in benches:
                for seed in b.t.seeds:
                    (b.replan_seed if replan else b.run_seed)(seed)
                for name in ("loaded", "eval_data", "costs"):
                    b.__dict__.pop(name, None)
                gc.collect()
        finally:
            gc.unfreeze()
            torch.set_num_threads(threads)
            progress.close()
            records = store.save()
    # Complete seeds only: another process sharing out_dir may be mid-seed.
    analysis, paths = write_reports(report_suite or suite, complete_records(records.values()), out)
    return BenchResult(suite, out, analysis, sum(b.trained for b in benches), sum(b.skipped for b in benches),
                       time.perf_counter() - started, paths)


def bench(suite: str = "smoke", out: str | None = None, seeds: str | None = None, resume: bool = True,
          no_progress: bool = False, threads: int | None = None, report_only: bool = False, tasks: str | None = None,
          replan: bool = False, **_: Any) -> BenchResult:
    """``salf bench --suite NAME [--out DIR] [--seeds 0,1,2] [--tasks A,B] [--threads N] [--no-resume] [--report-only]
    [--replan]``.

    ``suite``: a name in ``bench/`` (smoke, minilm, causal, full) or a suite file; ``out`` defaults to
    ``bench_out/<suite>``; ``seeds`` replaces every task's seeds; ``tasks`` runs only the named tasks
    (processes running different tasks may share ``out``); ``threads`` the suite's torch threads. The
    reports always cover the whole suite: every finished seed in ``out/runs.json``.
    """
    loaded = BenchSuite.load(suite)
    if seeds:
        loaded = loaded.with_seeds(parse_seeds(seeds))
    report_suite = loaded
    if tasks:
        loaded = loaded.only_tasks([n.strip() for n in tasks.split(",") if n.strip()])
    if threads is not None:
        loaded = dataclasses.replace(loaded, threads=threads)
    out = out or f"bench_out/{loaded.name}"
    if report_only:
        return report_bench(report_suite, out)
    return run_bench(loaded, out, resume=resume, show_progress=not no_progress, report_suite=report_suite,
                     replan=replan)


@dataclass
class RegretTable:
    """``salf bench-table``: the per-model regret table over one or more benchmark output directories."""

    dirs: list[str]
    table: dict[str, dict[str, Any]]
    path: Path | None = None
    """The markdown file written (``--out``), if any."""

    def render(self) -> str:
        from salf.table import render_table

        out = []
        for model, entry in self.table.items():
            rows = [[("* " if r["default"] else "") + r["variant"], len(r["tasks"]), r["n"], r["regret_points"]["mean"],
                     *(r[key]["mean"] for key in REGRET_KEYS), r["share_kept"]["mean"], r["flops_ratio"]["mean"]]
                    for r in entry["rows"]]
            title = (f"model {model}: {len(entry['tasks'])} task(s), means over tasks and seeds, regrets in points, "
                     "* = default plan")
            out.append(render_table(["variant", "tasks", "runs", "regret", *(f"regret λ={lam:g}" for lam in TRADEOFF_LAMBDAS),
                                     "share kept", "FLOPs x full"], rows, title))
        if self.path is not None:
            out.append(f"written: {self.path}")
        return "\n\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"dirs": self.dirs, "regret_by_model": self.table, "path": None if self.path is None else str(self.path)}


def bench_table(dirs: Sequence[str], out: str | None = None, **_: Any) -> RegretTable:
    """``salf bench-table DIR [DIR ...] [--out FILE.md]``: the per-model regret table over benchmark output
    directories (each with a runs.json); finished seeds only; nothing is trained or rewritten in them."""
    table = combined_regret(dirs)
    if not table:
        raise SalfError(f"no finished plan or baseline in {', '.join(dirs)}", "run `salf bench --out DIR` first")
    path = None
    if out:
        text = "\n".join([f"# salf bench: regret by model over {', '.join(f'`{d}`' for d in dirs)}", "",
                           TRADEOFF_TEXT, "", *regret_table_markdown(table)])
        path = write_atomic(Path(out), text + "\n")
    return RegretTable(list(dirs), table, path)
