"""Typed benchmark records: one frozen dataclass per kind of record in ``runs.json`` (the task's meta record, a
trained run, a plan, a baseline's decision, ...), built from the file's dicts by ``record_from_dict`` and written
back by ``to_dict`` only where the store saves them; and the variant names (``oracle/k=K``,
``salf/LENS/ESTIMATOR/POLICY``, ``baseline/NAME``, ...) built and parsed in one place (``Variant``).

Records written by earlier versions load as they are: a field of this version the record lacks is remembered as
absent (and not written back), a key this version does not know is kept in ``extra`` (and written back), so
``to_dict(record_from_dict(d)) == d`` with the keys in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

# -- variant names ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A record's variant name split at its first '/': ``family`` ("oracle", "salf", "baseline", ...) and
    ``rest`` ("k=3", "LENS/ESTIMATOR/POLICY", "NAME"); ``str(v)`` is the name again."""

    family: str
    rest: str = ""

    def __str__(self) -> str:
        return f"{self.family}/{self.rest}" if self.rest else self.family

    @classmethod
    def parse(cls, name: str) -> Variant:
        family, _, rest = name.partition("/")
        return cls(family, rest)

    @property
    def boundary(self) -> int | None:
        """K of a ``FAMILY/k=K`` name (oracle, equal-compute, the sweeps' runs), else None."""
        return int(self.rest[2:]) if self.rest.startswith("k=") and self.rest[2:].isdigit() else None

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.rest.split("/")) if self.rest else ()


def boundary_variant(family: str, k: int) -> str:
    """``FAMILY/k=K``: the run of one boundary (``oracle/k=3``, ``equal-compute/k=3``, ``oracle-untied/k=3``)."""
    return str(Variant(family, f"k={k}"))


def oracle_variant(k: int) -> str:
    return boundary_variant("oracle", k)


def plan_name(lens: str, estimator: str, policy: str) -> str:
    """``LENS/ESTIMATOR/POLICY``: a plan's name under a variant family."""
    return f"{lens}/{estimator}/{policy}"


def salf_variant(lens: str, estimator: str, policy: str) -> str:
    """``salf/LENS/ESTIMATOR/POLICY``: a salf plan."""
    return str(Variant("salf", plan_name(lens, estimator, policy)))


def baseline_variant(name: str) -> str:
    return str(Variant("baseline", name))


def is_oracle(variant: str) -> bool:
    return Variant.parse(variant).family == "oracle"


# -- records ---------------------------------------------------------------------------------------------

_HEAD = ("key", "task", "seed", "variant", "recipe", "kind")
_TAIL = ("seconds", "finished")
_BOOK = ("extra", "absent")


@dataclass(frozen=True, kw_only=True)
class Record:
    """What every record has: its store key, (task, seed, variant), the recipe fingerprint it was made under,
    its kind, and how long it took / when it finished. A record of a kind this version does not know loads as
    a plain ``Record`` (its other keys in ``extra``)."""

    KINDS: ClassVar[tuple[str, ...]] = ()

    key: str
    task: str | None = None
    seed: int | None = None
    variant: str = ""
    recipe: str | None = None
    kind: str | None = None
    seconds: float | None = None
    finished: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys this version does not know (written back as they were)."""
    absent: frozenset[str] = frozenset()
    """Fields of this class the record did not have (records of earlier versions; not written back)."""

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in _BOOK]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        names = cls._names()
        return cls(**{n: d[n] for n in names if n in d}, extra={k: v for k, v in d.items() if k not in names},
                   absent=frozenset(n for n in names if n not in d))

    def to_dict(self) -> dict[str, Any]:
        body = [n for n in self._names() if n not in _HEAD and n not in _TAIL]
        out = {n: getattr(self, n) for n in (*_HEAD, *body) if n not in self.absent}
        out.update(self.extra)
        out.update((n, getattr(self, n)) for n in _TAIL if n not in self.absent)
        return out

    @property
    def done(self) -> bool:
        return getattr(self, "status", None) == "done"

    @property
    def parsed_variant(self) -> Variant:
        return Variant.parse(self.variant)


@dataclass(frozen=True, kw_only=True)
class MetaRecord(Record):
    """A task's facts (one per task, seed None): the model, the data, the predicted costs per boundary."""

    KINDS: ClassVar[tuple[str, ...]] = ("meta",)

    data_task: str = ""
    default_cell: str = ""  # the data's row of salf.config.plan.DEFAULT_CELLS; "" in records older than the split
    num_layers: int = 0
    model_path: str | None = None
    model: str | None = None
    n_train: int | None = None
    n_eval: int | None = None
    label_names: list[str] | None = None
    train_file: str | None = None
    eval_file: str | None = None
    predicted_step_flops_ratio: list[float] = field(default_factory=list)
    predicted_memory_ratio: list[float] = field(default_factory=list)
    cost_profile_seconds: float | None = None
    cost_seq_len: int | None = None
    task_config: dict[str, Any] = field(default_factory=dict)
    train_fingerprint: str | None = None
    eval_fingerprint: str | None = None


@dataclass(frozen=True, kw_only=True)
class TrainedRun(Record):
    """A training run (oracle, ceiling, equal-compute, a baseline that trains, the untied-head sweep):
    its freeze spec, steps and metrics; ``details`` is what the run's variant adds (free-form)."""

    KINDS: ClassVar[tuple[str, ...]] = ("oracle", "ceiling", "equal-compute", "oracle-untied", "baseline")

    boundary: int | None = None
    status: str | None = None
    error: str | None = None
    steps: int | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class PerDatumRun(TrainedRun):
    """The per-datum variant's run: every batch trained from its data's boundary."""

    KINDS: ClassVar[tuple[str, ...]] = ("per-datum",)

    lens: str | None = None
    estimator: str | None = None
    policy: str | None = None
    fill: str | None = None
    global_boundary: int | None = None
    boundary_histogram: dict[str, int] | None = None
    mean_boundary: float | None = None
    n_traced: int | None = None
    traced_boundary_histogram: dict[str, int] | None = None
    profiling_seconds: float | None = None
    mean_boundary_trained: float | None = None


@dataclass(frozen=True, kw_only=True)
class SearchedRun(TrainedRun):
    """A run at a learning rate searched for its boundary (``salf.bench.sweeps``)."""

    KINDS: ClassVar[tuple[str, ...]] = ("oracle-searched",)

    learning_rate: float | None = None
    head_learning_rate: float | None = None
    lr_factor: float | None = None
    lr_search: dict[str, Any] | None = None
    search_steps: int | None = None
    search_step_share: float | None = None
    search_flops: float | None = None
    search_seconds: float | None = None


@dataclass(frozen=True, kw_only=True)
class PlanRecord(Record):
    """A salf plan (trains nothing: its quality is the oracle run at its boundary); ``details`` holds the
    plan's trace, gains and prediction."""

    KINDS: ClassVar[tuple[str, ...]] = ("plan",)

    boundary: int | None = None
    status: str | None = None
    lens: str | None = None
    estimator: str | None = None
    policy: str | None = None
    profiling_seconds: float | None = None
    trace_seconds: float | None = None
    cost_seconds: float | None = None
    plan_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class PerDatumPlan(Record):
    """The per-datum boundaries of one lens: the traced data's boundaries and the global one."""

    KINDS: ClassVar[tuple[str, ...]] = ("per-datum-plan",)

    status: str | None = None
    lens: str | None = None
    estimator: str | None = None
    policy: str | None = None
    boundary: int | None = None
    n_train: int | None = None
    traced_indices: list[int] = field(default_factory=list)
    traced_boundaries: list[int] = field(default_factory=list)
    profiling_seconds: float | None = None
    trace_seconds: float | None = None
    cost_seconds: float | None = None
    plan_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BaselineDecision(Record):
    """A baseline that only chooses a boundary (or could not: status "unavailable" and its error);
    ``details`` is what the baseline reports about its choice (free-form, one shape per baseline)."""

    KINDS: ClassVar[tuple[str, ...]] = ("baseline",)

    boundary: int | None = None
    status: str | None = None
    error: str | None = None
    profiling_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class UntiedPlan(Record):
    """The default plan's trace and gains costed with the head untied (``salf.bench.sweeps``)."""

    KINDS: ClassVar[tuple[str, ...]] = ("salf-untied",)

    boundary: int | None = None
    status: str | None = None
    lens: str | None = None
    estimator: str | None = None
    policy: str | None = None
    head: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    tied_variant: str | None = None
    tied_boundary: int | None = None
    profiling_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


_BY_KIND: dict[str, type[Record]] = {k: cls for cls in (MetaRecord, TrainedRun, PerDatumRun, SearchedRun, PlanRecord,
                                                        PerDatumPlan, UntiedPlan) for k in cls.KINDS}


def run_metrics(record: Record | None) -> dict[str, Any]:
    """A trained run's metrics ({} for a record that trained nothing, or none)."""
    return record.metrics if isinstance(record, TrainedRun) else {}


def record_class(d: Mapping[str, Any]) -> type[Record]:
    """The class of a stored record: by its kind, and for a baseline by whether it trained (a run of its own)."""
    kind = d.get("kind")
    if kind == "baseline" and not any(k in d for k in ("spec", "steps", "metrics")):
        return BaselineDecision
    return _BY_KIND.get(kind, Record) if isinstance(kind, str) else Record


def record_from_dict(d: Mapping[str, Any]) -> Record:
    return record_class(d).from_dict(d)


__all__ = [
    "BaselineDecision", "MetaRecord", "PerDatumPlan", "PerDatumRun", "PlanRecord", "Record", "SearchedRun",
    "TrainedRun", "UntiedPlan", "Variant", "baseline_variant", "boundary_variant", "is_oracle", "oracle_variant",
    "plan_name", "record_class", "record_from_dict", "run_metrics", "salf_variant",
]
