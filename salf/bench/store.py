"""The result store: ``runs.json`` in the output directory, every run and plan keyed by (task, seed,
variant) and the task's recipe fingerprint, rewritten atomically after each; a finished run is never repeated.
"""

from __future__ import annotations

import fcntl
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from salf.bench.progress import now
from salf.bench.records import MetaRecord, Record, is_oracle, oracle_variant, record_from_dict
from salf.bench.suite import BENCH_FORMAT, BenchSuite
from salf.errors import SalfError
from salf.fileio import write_json


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
        self.records: dict[str, Record] = {}
        # --no-resume starts over: the runs on disk now are dropped at the first save, not merged back.
        self._dropped: set[str] = set()
        self._mine: set[str] = set()  # keys this process added; only these override the file
        stored = self._read()
        if resume:
            self.records = stored
        else:
            self._dropped = set(stored)

    def _read(self) -> dict[str, Record]:
        if not self.path.is_file():
            return {}
        try:
            stored = json.loads(self.path.read_text())
        except json.JSONDecodeError:
            raise SalfError(f"{self.path} is damaged (not JSON)", "move it away to start over, or rerun without resume") from None
        return {r["key"]: record_from_dict(r) for r in stored.get("runs", [])}

    @staticmethod
    def key(task: str, seed: int | None, variant: str) -> str:
        return f"{task}|seed={seed}|{variant}" if seed is not None else f"{task}|{variant}"

    def get(self, key: str, recipe: str) -> Record | None:
        record = self.records.get(key)
        return record if record is not None and record.recipe == recipe else None

    def add(self, *records: Record) -> None:
        for record in records:
            self.records[record.key] = record
            self._mine.add(record.key)
        self.save()

    def save(self) -> dict[str, Record]:
        """Write this process's records merged with the others' (under the lock); returns the union."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            union = {k: r for k, r in self._read().items() if k not in self._dropped}
            union.update((k, self.records[k]) for k in self._mine)
            write_json(self.path, {"format": BENCH_FORMAT, "suite": self.suite.name,
                                   "updated": now(), "runs": [r.to_dict() for r in union.values()]})
        return union


def load_records(out_dir: str | Path) -> list[Record]:
    """The records of ``out_dir/runs.json`` (a ``salf bench`` output directory), typed."""
    path = Path(out_dir) / "runs.json"
    if not path.is_file():
        raise SalfError(f"{path} not found", "give directories written by `salf bench --out DIR`")
    try:
        runs = json.loads(path.read_text()).get("runs", [])
    except json.JSONDecodeError:
        raise SalfError(f"{path} is damaged (not JSON)") from None
    return [record_from_dict(r) for r in runs]


def sweep_boundaries(meta: MetaRecord) -> set[int]:
    """The boundaries a task's oracle sweep must have trained: 0..L, or every ``oracle_stride``-th and L."""
    n = meta.num_layers
    stride = int(meta.task_config.get("oracle_stride", 1))
    return {*range(0, n + 1, stride), n}


def complete_records(records: Iterable[Record]) -> list[Record]:
    """The records of every (task, seed) whose oracle sweep finished (``sweep_boundaries``), plus task records.

    A benchmark stopped mid-seed leaves a partial sweep, which would make regret and the frontier lie. (A plan's
    own boundary off the stride grid is trained too, before the grid; it is not needed for the sweep to count.)
    """
    records = list(records)
    required = {r.task: {oracle_variant(k) for k in sweep_boundaries(r)} for r in records if isinstance(r, MetaRecord)}
    oracle: dict[tuple[str | None, int | None], set[str]] = defaultdict(set)
    for r in records:
        if is_oracle(r.variant):  # a diverged run is a result too
            oracle[(r.task, r.seed)].add(r.variant)
    done = {key for key, variants in oracle.items() if key[0] in required and required[key[0]] <= variants}
    return [r for r in records if r.seed is None or (r.task, r.seed) in done]


__all__ = ["RunStore", "complete_records", "load_records", "sweep_boundaries"]
