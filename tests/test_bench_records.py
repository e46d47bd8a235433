"""Typed benchmark records (``salf.bench.records``): every committed ``runs.json`` loads and writes back as it was."""

import json
from pathlib import Path

import pytest

from salf.bench.records import (
    BaselineDecision,
    MetaRecord,
    PerDatumPlan,
    PerDatumRun,
    PlanRecord,
    Record,
    SearchedRun,
    TrainedRun,
    UntiedPlan,
    Variant,
    baseline_variant,
    boundary_variant,
    is_oracle,
    oracle_variant,
    record_from_dict,
    run_metrics,
    salf_variant,
)
from salf.bench.store import complete_records, load_records

RESULTS = sorted((Path(__file__).resolve().parents[1] / "bench" / "results").glob("*/runs.json"))


def test_there_are_committed_results_to_check():
    assert len(RESULTS) >= 5


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.parent.name)
def test_every_committed_record_round_trips_with_its_keys_in_order(path):
    runs = json.loads(path.read_text())["runs"]
    for d in runs:
        record = record_from_dict(d)
        assert type(record) is not Record, d["kind"]  # every kind written so far has its own class
        assert not record.extra, (d["kind"], sorted(record.extra))  # and every key a field
        again = record.to_dict()
        assert again == d
        assert list(again) == list(d)  # the same order: runs.json is rewritten byte for byte
    loaded = load_records(path.parent)
    assert [r.to_dict() for r in loaded] == runs
    assert complete_records(loaded)  # analysis input: typed records all the way


def test_each_kind_has_its_class():
    classes = {}
    for path in RESULTS:
        for d in json.loads(path.read_text())["runs"]:
            classes.setdefault(d["kind"], set()).add(type(record_from_dict(d)))
    expected = {"meta": {MetaRecord}, "oracle": {TrainedRun}, "plan": {PlanRecord}, "per-datum-plan": {PerDatumPlan},
                "per-datum": {PerDatumRun}, "baseline": {BaselineDecision, TrainedRun}, "ceiling": {TrainedRun},
                "equal-compute": {TrainedRun}, "oracle-searched": {SearchedRun}, "oracle-untied": {TrainedRun},
                "salf-untied": {UntiedPlan}}
    assert classes == {k: v for k, v in expected.items() if k in classes}


def test_records_of_other_versions_keep_what_they_have_and_what_this_one_does_not_know():
    old = {"key": "t|meta", "task": "t", "seed": None, "variant": "meta", "recipe": "r", "kind": "meta",
           "num_layers": 4, "data_task": "classification", "someday": [1, 2], "seconds": 1.0, "finished": "x"}
    meta = record_from_dict(old)
    assert isinstance(meta, MetaRecord) and meta.num_layers == 4 and meta.train_fingerprint is None
    assert "train_fingerprint" in meta.absent and meta.extra == {"someday": [1, 2]}
    assert meta.to_dict() == old  # absent fields stay absent, unknown keys come back
    unknown = {"key": "k", "kind": "from-the-future", "payload": {"a": 1}}
    record = record_from_dict(unknown)
    assert type(record) is Record and record.to_dict() == unknown


def test_a_baseline_is_a_decision_unless_it_trained():
    decision = record_from_dict({"key": "k", "kind": "baseline", "boundary": 3, "status": "done",
                                 "profiling_seconds": 0.5, "details": {"why": "x"}})
    unavailable = record_from_dict({"key": "k", "kind": "baseline", "boundary": None, "status": "unavailable",
                                    "error": "no"})
    trained = record_from_dict({"key": "k", "kind": "baseline", "boundary": None, "status": "done", "error": None,
                                "steps": 5, "spec": {}, "metrics": {"train_flops": 1.0}, "details": {}})
    assert isinstance(decision, BaselineDecision) and decision.done and run_metrics(decision) == {}
    assert isinstance(unavailable, BaselineDecision) and not unavailable.done and unavailable.error == "no"
    assert isinstance(trained, TrainedRun) and run_metrics(trained) == {"train_flops": 1.0}


def test_variant_names_are_built_and_parsed_in_one_place():
    assert oracle_variant(3) == "oracle/k=3" and boundary_variant("equal-compute", 12) == "equal-compute/k=12"
    assert salf_variant("probe", "headroom", "budget=0.4") == "salf/probe/headroom/budget=0.4"
    assert baseline_variant("lora") == "baseline/lora"
    v = Variant.parse("salf/probe/headroom/budget=0.4")
    assert (v.family, v.parts, v.boundary) == ("salf", ("probe", "headroom", "budget=0.4"), None)
    assert str(v) == "salf/probe/headroom/budget=0.4"
    assert Variant.parse("oracle/k=7").boundary == 7 and Variant.parse("meta") == Variant("meta")
    assert str(Variant.parse("meta")) == "meta"
    assert is_oracle("oracle/k=0") and not is_oracle("oracle-untied/k=1") and not is_oracle("oracle-searched/k=1")
