"""Benchmark suites: a suite (JSON under ``bench/``) is a list of tasks; a task is a model, data, a
training recipe and seeds. ``BenchSuite.load`` reads and checks one; every other ``salf.bench`` module
takes the parsed ``BenchSuite`` / ``BenchTask``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from salf.bench.baselines import BASELINES, BaselineSettings
from salf.config.data import OLD_LABEL_MODES
from salf.errors import SalfError
from salf.fileio import fingerprint
from salf.models.heads import HEAD_MODES
from salf.models.pooling import HEAD_POOLINGS
from salf.training.lrsearch import LRSearchConfig

BENCH_FORMAT = 1


POLICIES_DEFAULT = ("knee", "budget=0.5", "coverage=0.9", "unsolved", "unsolved=0.75")


PER_DATUM_ESTIMATOR, PER_DATUM_POLICY = "headroom", "knee"
"""Estimator and policy of the per-datum variant's global boundary (each datum's own boundary comes from its
own observed drops, ``salf.method.plan.per_datum_boundaries``); fixed, so that its finished runs stay valid when
the defaults of ``salf plan`` change."""


PER_DATUM_FILL = "global"
"""Boundary of the data the trace did not read (``salf.training.perdatum.datum_boundaries``)."""


SUITE_DIRS = (Path("bench"), Path(__file__).resolve().parents[2] / "bench")
"""Where suite names are looked up (``<dir>/<name>.json``): the working directory's ``bench/``, then the repo's."""


QUALITY: dict[str, tuple[str, bool]] = {
    "classification": ("eval_accuracy", True),
    "completion": ("exact_match", True),
    "lm": ("eval_loss", False),
}
"""The quality metric of each data task, and whether higher is better."""


LOSS = ("eval_loss", False)


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
    label_mode: str = "classifier"
    """Classification by a classification head ('classifier'; 'head' is its older spelling), or by label 'words'
    (completion data, for causal LMs)."""
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
    oracle_stride: int = 1
    """Sweep the oracle at every ``oracle_stride``-th boundary (0, s, 2s, ... and the last), plus every
    boundary a plan or a baseline picks, so each plan is still scored by a run at its own boundary. 1: every
    boundary. For deep models on a CPU (SmolLM2's 30 blocks), 3 keeps the sweep affordable."""
    equal_compute: bool | list[int] = False
    """Also train every planned boundary for as many steps as fit in the full run's measured FLOPs: ``true``
    for every seed, or a list of the seeds that get these runs (each costs about one full run per boundary)."""
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    lr_search: bool | dict[str, Any] | LRSearchConfig | None = None
    """Also train every oracle boundary at its own searched rate (``oracle-searched/k=K``,
    ``salf.bench.sweeps``): ``true`` for ``salf.training.lrsearch.LRSearchConfig``'s defaults, or its fields,
    e.g. ``{"budget": 0.15}``. The shared-rate sweep and every regret table stay as they are."""
    head_modes: list[str] = field(default_factory=lambda: ["tied"])
    """Head modes to sweep (``salf.models.heads.HEAD_MODES``): 'tied' is the model as it is (the main
    sweep); 'untie' adds an oracle sweep with a tied output head untied (``oracle-untied/k=K``, k > 0) and
    salf's default plan costed and trained untied. 'untie' on a model without a tied head is an error."""

    def __post_init__(self) -> None:
        self.label_mode = OLD_LABEL_MODES.get(self.label_mode, self.label_mode)
        if not self.name or any(c in self.name for c in "/|\\ "):
            raise SalfError(f"task name {self.name!r} must be non-empty, without spaces, '/', '|'",
                            "use e.g. 'minilm-docstring-module'")
        if (self.corpus is None) == (self.train_file is None):
            raise SalfError(f"task {self.name}: give either a corpus or a train_file (not both)",
                            "e.g. \"corpus\": \"docstring-module\"")
        if self.train_file is not None and self.eval_file is None:
            raise SalfError(f"task {self.name}: train_file needs an eval_file", "add \"eval_file\"")
        for name in ("steps", "batch_size", "max_length", "em_limit", "generation_batch", "trace_sample",
                     "oracle_stride"):
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
        if self.lr_search is True:
            self.lr_search = LRSearchConfig()
        elif self.lr_search is False:
            self.lr_search = None
        elif isinstance(self.lr_search, dict):
            fields = dict(self.lr_search)
            if "factors" in fields:
                fields["factors"] = tuple(fields["factors"])
            self.lr_search = _construct(LRSearchConfig, fields, f"task {self.name} lr_search")
        elif self.lr_search is not None and not isinstance(self.lr_search, LRSearchConfig):
            raise SalfError(f"task {self.name}: lr_search must be true, false or an object, got {self.lr_search!r}",
                            'e.g. "lr_search": {"budget": 0.15}')
        modes = list(self.head_modes) if isinstance(self.head_modes, (list, tuple)) else None
        if not modes or len(set(modes)) != len(modes) or "tied" not in modes \
                or any(m not in HEAD_MODES for m in modes):
            raise SalfError(f"task {self.name}: head_modes must list 'tied' and optionally 'untie', without "
                            f"repeats, got {self.head_modes!r}", f'e.g. "head_modes": {json.dumps(list(HEAD_MODES))}')
        self.head_modes = modes

    def equal_compute_for(self, seed: int) -> bool:
        """Whether ``seed`` gets the equal-compute runs."""
        return seed in self.equal_compute if isinstance(self.equal_compute, list) else bool(self.equal_compute)

    def recipe_fingerprint(self) -> str:
        """Hash of everything that changes a run's result (not the seed list or the ceiling/extras)."""
        d = asdict(self)
        # extras that add runs of their own (their records carry their own settings), never change these
        for volatile in ("seeds", "ceiling_steps", "equal_compute", "lr_search", "head_modes", "oracle_stride"):
            d.pop(volatile)
        if d["label_mode"] == "classifier":  # spelt 'head' when the committed records were made: same recipe
            d["label_mode"] = "head"
        if d["head_pooling"] is None:  # the recipe of every task from before the field existed
            d.pop("head_pooling")
        return fingerprint(d)


TARGET_QUALITY, TARGET_FLOPS = 0.99, 0.60
"""The headline target: keep >= 99% of full fine-tuning's quality at <= 60% of its training FLOPs (means over seeds);
a suite may set its own FLOPs share (``BenchSuite.target_flops``)."""


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
    target_flops: float = TARGET_FLOPS
    """The headline target in the reports: keep >= 99% of full fine-tuning's quality at no more than this share of its
    FLOPs. Reports only, not part of any recipe: changing it re-reads the finished runs."""
    description: str = ""

    def __post_init__(self) -> None:
        from salf.method.gain import ESTIMATORS
        from salf.method.lenses import LENSES
        from salf.method.plan import parse_policy

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
        if not 0 < self.target_flops <= 1:
            raise SalfError(f"suite {self.name!r}: target_flops must be in (0, 1], got {self.target_flops}",
                            "give the target's share of full fine-tuning's FLOPs, e.g. 0.6")

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


__all__ = ["BENCH_FORMAT", "BenchSuite", "BenchTask", "LOSS", "PER_DATUM_ESTIMATOR", "PER_DATUM_FILL", "PER_DATUM_POLICY", "POLICIES_DEFAULT", "QUALITY", "SUITE_DIRS", "TARGET_FLOPS", "TARGET_QUALITY", "parse_seeds"]
