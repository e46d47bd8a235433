"""Task preparation: where a task's model comes from (``MODEL_SOURCES``: builtin, minilm, fixture, tiny)
and its train/eval files (built-in corpora written once into the output directory).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from salf.bench.suite import BenchTask
from salf.errors import SalfError
from salf.models.builtin import BUILTIN_PREFIX, cache_dirs, resolve_builtin
from salf.registry import Registry

FIXTURE_BUILD = "python -m salf.data.fixtures --out {dir} --steps 800 --layers 6 --threads 1"


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


COMMITTED_FIXTURES = Path(__file__).resolve().parents[2] / "bench" / "fixtures"
"""The fixtures committed with the repository (a checkout's ``bench/fixtures``), looked in after the caches, so
that every clone benchmarks the same pretrained weights without an hour of pretraining."""


@MODEL_SOURCES.register("fixture")
def _fixture(arg: str, prepared: PreparedTask) -> str:
    """'fixture:gpt-debian': a model pretrained here (``salf.data.fixtures``), from a cache or the repository."""
    places = [*cache_dirs(), COMMITTED_FIXTURES]
    for d in places:
        if (d / arg / "model" / "config.json").is_file():
            return str((d / arg / "model").resolve())
    where = cache_dirs()[-1] / arg
    raise SalfError(f"the benchmark fixture {arg!r} is not built (looked in {', '.join(str(d) for d in places)})",
                    f"build it once (about 40 minutes, in the background): {FIXTURE_BUILD.format(dir=where)}")


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

        from salf.data.files import records_from_file
        from salf.data.tasks import DataConfig, detect_task
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

    def lenses(self, chosen: list[str] | None) -> list[str]:
        """The lenses that can read this task's labels with this model."""
        from salf.method.lenses import CLASS_LABELS, LENSES, TOKEN_LABELS

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


__all__ = ["FIXTURE_BUILD", "MODEL_SOURCES", "ModelSource", "PreparedTask"]
