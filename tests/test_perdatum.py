"""Per-datum boundaries: batches share one boundary, and each step trains (and costs) what its batch asks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback

from salf.errors import SalfError
from salf.method.freeze import FreezeSpec, applied_report
from salf.method.plan import per_datum_boundaries
from salf.method.trace import Trace
from salf.models.arch import find_parts
from salf.models.tiny import tiny_model
from salf.training.config import TrainConfig
from salf.training.inputs import RunExtras
from salf.training.perdatum import (
    BoundaryBatchSampler,
    PerDatumCollator,
    attach_per_datum,
    base_spec,
    boundaries_from_plan,
    datum_boundaries,
)
from salf.training.run import train

L = 4


@settings(max_examples=60, deadline=None)
@given(
    boundaries=st.lists(st.integers(0, 6), min_size=1, max_size=60),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 5),
)
def test_sampler_batches_share_one_boundary_and_cover_every_datum_once(boundaries, batch_size, seed, epoch):
    sampler = BoundaryBatchSampler(boundaries, batch_size, seed=seed)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(boundaries)))  # every datum exactly once
    per_boundary: dict[int, list[int]] = {}
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({boundaries[i] for i in batch}) == 1  # one boundary per batch
        per_boundary.setdefault(boundaries[batch[0]], []).append(len(batch))
    for k, sizes in per_boundary.items():
        n = boundaries.count(k)
        assert len(sizes) == math.ceil(n / batch_size)  # only the remainder batch is short
        assert sorted(sizes)[1:] == [batch_size] * (len(sizes) - 1)
    again = BoundaryBatchSampler(boundaries, batch_size, seed=seed)
    again.set_epoch(epoch)
    assert list(again) == batches  # deterministic in seed and epoch


def test_sampler_reshuffles_by_epoch_and_seed_and_counts_epochs_itself():
    boundaries = [i % 3 for i in range(60)]
    sampler = BoundaryBatchSampler(boundaries, 4, seed=1)
    first, second = list(sampler), list(sampler)  # no set_epoch: each iteration is the next epoch
    assert first != second and first == sampler.batches(0) and second == sampler.batches(1)
    assert BoundaryBatchSampler(boundaries, 4, seed=2).batches(0) != first
    ordered = BoundaryBatchSampler(boundaries, 4, shuffle=False).batches(0)
    assert ordered[0] == [0, 3, 6, 9] and [i for b in ordered for i in b][:20] == list(range(0, 60, 3))
    with pytest.raises(SalfError):
        BoundaryBatchSampler([], 4)
    with pytest.raises(SalfError):
        BoundaryBatchSampler([1, 2], 0)


def test_datum_boundaries_fill_untraced_data_globally_or_from_the_nearest_traced_datum():
    data = [
        {"input_ids": [5, 6, 7]},
        {"input_ids": [50, 51]},
        {"input_ids": [5, 6, 7, 7]},
        {"input_ids": [50, 51, 51]},
        {"input_ids": [90]},
    ]
    out = datum_boundaries([1, 3], [0, 1], 5, default=2, num_layers=4)
    assert out.tolist() == [1, 3, 2, 2, 2]
    near = datum_boundaries([1, 3], [0, 1], 5, default=2, num_layers=4, fill="nearest", data=data)
    assert near.tolist()[:4] == [1, 3, 1, 3]  # 2 looks like 0, 3 like 1
    assert near[4] == 1  # nothing alike: a tie, resolved to the smaller boundary (trains more)
    with pytest.raises(SalfError, match="training data"):
        datum_boundaries([1, 3], [0, 1], 5, default=2, num_layers=4, fill="nearest")
    with pytest.raises(SalfError, match="names datum 7"):
        datum_boundaries([1, 3], [0, 7], 5, default=2, num_layers=4)
    with pytest.raises(SalfError, match="outside 0..4"):
        datum_boundaries([1, 5], [0, 1], 5, default=2, num_layers=4)


def test_boundaries_from_a_plan_follow_the_trace_indices():
    # datum 3 falls only in the last block, datum 1 steadily in every block: their boundaries differ.
    per_datum = np.array([[5.0, 5.0, 5.0, 5.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    trace = Trace(
        lens="logit-lens",
        pooling="targets",
        num_layers=4,
        per_datum=per_datum,
        indices=np.array([3, 1]),
        n_tokens=10,
        seconds=0.0,
    )
    cost = np.array([1.0, 0.8, 0.6, 0.45, 0.3])
    per = per_datum_boundaries(trace, cost, "coverage=0.9")
    assert per == [3, 0]
    plan = SimpleNamespace(per_datum_boundaries=per, boundary=2, num_layers=4)
    out = boundaries_from_plan(plan, trace, 5)
    assert out.tolist() == [2, 0, 2, 3, 2]
    with pytest.raises(SalfError, match="no per-datum"):
        boundaries_from_plan(SimpleNamespace(per_datum_boundaries=None), trace, 5)


def test_base_spec_is_the_smallest_boundary_and_refuses_conflicts():
    assert base_spec([3, 1, 2], 3, L, None) == FreezeSpec.from_boundary(1, L)
    with pytest.raises(SalfError, match="3 per-datum boundaries for 4"):
        base_spec([3, 1, 2], 4, L, None)
    with pytest.raises(SalfError, match="smallest boundary"):
        base_spec([3, 1, 2], 3, L, FreezeSpec.from_boundary(2, L))
    with pytest.raises(SalfError, match="prefix cache"):
        base_spec([3, 1, 2], 3, L, None, prefix_cache="/tmp/x")


def test_collator_and_switcher_move_the_plan_with_the_batch():
    model = tiny_model("llama")
    collator = PerDatumCollator(0, [2, 3, 3])
    batch = collator(
        [
            {"input_ids": [4, 5], "labels": [4, 5], "salf_index": 1},
            {"input_ids": [6], "labels": [6], "salf_index": 2},
        ]
    )
    assert batch["salf_boundary"].tolist() == [3, 3]
    plain = collator([{"input_ids": [4, 5], "labels": [4, 5]}])  # evaluation: no index, no boundary
    assert "salf_boundary" not in plain
    switcher = attach_per_datum(model)
    parts = find_parts(model)
    model(**batch)
    report = applied_report(model)
    assert report.spec == FreezeSpec.from_boundary(3, L) and report.prefix_blocks == 3
    assert not any(p.requires_grad for p in parts.blocks[2].parameters())
    model(**plain)  # no boundary: the plan stays
    assert applied_report(model) is report and switcher.switches == 1
    switcher.remove()
    assert applied_report(model) is None and all(p.requires_grad for p in model.parameters())


class StepProbe(TrainerCallback):
    """Per step: the boundary the batch trained from, FLOPs, and which blocks' weights moved."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.mode.__exit__(None, None, None)
        parts = find_parts(model)
        moved = {}
        for name, p in model.named_parameters():
            group = parts.group_of(name)
            changed = not torch.equal(p.detach(), self.before[name])
            moved[group] = moved.get(group, False) or changed
        report = applied_report(model)
        self.steps.append(
            {"boundary": report.prefix_blocks, "flops": self.mode.get_total_flops(), "moved": moved}
        )


def test_each_step_trains_from_its_batch_boundary_and_costs_less_when_higher(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": (ids := torch.randint(3, 120, (12,), generator=g).tolist()), "labels": ids}
        for _ in range(12)
    ]
    boundaries = [1, 2, 3] * 4  # four data per boundary: one full batch each
    probe = StepProbe()
    model = tiny_model("gpt2")
    config = TrainConfig(
        max_steps=6, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, save_steps=None, seed=0, flop_sample_steps=0
    )
    metrics = train(model, 0, data, None, config, tmp_path / "run", RunExtras(callbacks=[probe], boundaries=boundaries))
    assert len(probe.steps) == 6
    order = [s["boundary"] for s in probe.steps]
    assert sorted(order) == [1, 1, 2, 2, 3, 3]  # two epochs, 3 batches each
    # a step above boundary 1 after a boundary-1 step: block 1 has AdamW state yet must not move
    assert any(k > 1 and 1 in order[:i] for i, k in enumerate(order))
    for step in probe.steps:
        k = step["boundary"]
        assert not step["moved"]["embeddings"]
        for i in range(L):
            assert step["moved"][f"block:{i}"] == (i >= k), (k, i, step["moved"])
        assert step["moved"]["norm"]  # (gpt2's head is tied to the frozen embeddings)
    flops = {k: {s["flops"] for s in probe.steps if s["boundary"] == k} for k in (1, 2, 3)}
    assert all(len(v) == 1 for v in flops.values())  # same boundary, same shapes: same count
    f1, f2, f3 = (flops[k].pop() for k in (1, 2, 3))
    assert f1 > f2 > f3
    print(
        f"\nper-datum step FLOPs (gpt2 tiny, batch 4 x 12 tokens): k=1 {f1:.3g}, k=2 {f2:.3g}, k=3 {f3:.3g} "
        f"(ratios {f2 / f1:.3f}, {f3 / f1:.3f})"
    )
    info = metrics["per_datum"]
    assert info["data_per_boundary"] == {"1": 4, "2": 4, "3": 4}
    assert info["forwards_per_boundary"] == {"1": 2, "2": 2, "3": 2}
    assert info["padded_tokens_per_boundary"] == {"1": 2 * 4 * 12, "2": 2 * 4 * 12, "3": 2 * 4 * 12}
    assert sum(info["padded_tokens_per_boundary"].values()) == metrics["padded_tokens"]
    assert info["first_boundary"] == order[0]
    assert metrics["boundary"] == 1 and metrics["spec"] == FreezeSpec.from_boundary(1, L).to_dict()
    # afterwards the caller's model carries no plan and every parameter is trainable again
    assert applied_report(model) is None and all(p.requires_grad for p in model.parameters())
