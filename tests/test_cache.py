"""The frozen-prefix activation cache: same training, less compute, never a stale cache."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from helpers import ragged_lm_data as lm_data

import salf.training.cache_store as cache_mod
from salf.data.batch import collate
from salf.errors import SalfError
from salf.method.freeze import FreezeSpec, apply_plan
from salf.models.arch import find_parts
from salf.models.loading import tiny_tokenizer
from salf.models.tiny import tiny_model
from salf.training.cache import attach_prefix_cache
from salf.training.cache_keys import CacheKeys, data_fingerprint
from salf.training.cache_store import CacheBuild, PrefixCache, build_prefix_cache
from salf.training.config import TrainConfig
from salf.training.inputs import TrainingData
from salf.training.run import train

L = 4


def class_data(n: int = 8, seed: int = 0) -> list[dict]:
    return [{"input_ids": d["input_ids"], "labels": i % 2} for i, d in enumerate(lm_data(n, seed=seed))]


def make(model_type: str, **overrides) -> torch.nn.Module:
    if model_type == "bert":
        return tiny_model("bert", "classification", num_labels=2, **overrides)
    return tiny_model(model_type, **overrides)


def config(**kw) -> TrainConfig:
    base = dict(
        max_steps=4,
        batch_size=4,
        learning_rate=1e-2,
        save_steps=None,
        logging_steps=50,
        seed=0,
        flop_sample_steps=0,
    )
    return TrainConfig(**{**base, **kw})


def losses(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "history.json").read_text())]


class CallCounter:
    """Counts forward calls of one module (a submodule of a prefix block that a cached run must skip)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


def first_child(block: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in block.children() if any(True for _ in m.parameters()))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_training_from_the_cache_gives_the_same_losses(tmp_path, model_type):
    task = "classification" if model_type == "bert" else "lm"
    data = class_data() if task == "classification" else lm_data()
    boundary = 2
    runs = {}
    for cached in (False, True):
        model = make(model_type)
        counter = CallCounter(first_child(find_parts(model).blocks[1]))
        cfg = config(prefix_cache=str(tmp_path / "cache") if cached else None)
        metrics = train(model, 0, TrainingData(data, None, task), FreezeSpec.from_boundary(boundary, L), cfg, tmp_path / f"run-{cached}")
        runs[cached] = (losses(tmp_path / f"run-{cached}"), counter.calls, metrics)
    plain, cached = runs[False][0], runs[True][0]
    assert len(plain) == len(cached) == 4
    assert max(abs(a - b) for a, b in zip(plain, cached)) <= 1e-5, (plain, cached)
    assert runs[False][1] == 4  # the real prefix ran every step...
    assert runs[True][1] == 2  # ...but from the cache only while building it (8 data, batches of 4)
    info = runs[True][2]["prefix_cache"]
    assert info["boundary"] == boundary and info["cached_forwards"] == 4 and not info["reused"]
    assert info["n_tokens"] == sum(len(d["input_ids"]) for d in data)
    print(
        f"\n{model_type}: cached vs plain losses, max abs diff {max(abs(a - b) for a, b in zip(plain, cached)):.2e}"
    )


def prefix_output(model, datum: dict, boundary: int) -> torch.Tensor:
    """Reference: the input of block ``boundary`` for one datum alone, via output_hidden_states."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([datum["input_ids"]]), output_hidden_states=True)
    return out.hidden_states[boundary][0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_holds_each_datum_prefix_output_without_padding(tmp_path, dtype):
    model = make("llama")
    data = lm_data(7)
    cache = build_prefix_cache(
        model,
        data,
        3,
        tmp_path / "c",
        build=CacheBuild(dtype=dtype, batch_size=3, shard_bytes=40 * 32 * 2),
        show_progress=False,
    )
    assert len(cache) == 7 and cache.hidden_size == 32 and cache.dtype == cache_mod.DTYPES[dtype]
    assert len(cache.shards) > 1  # small shards: data spread over several files
    assert cache.n_tokens == sum(len(d["input_ids"]) for d in data)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["keys"]["boundary"] == 3 and manifest["keys"]["data"] == data_fingerprint(data)
    stored = sum(os.path.getsize(tmp_path / "c" / s) for s in cache.shards)
    itemsize = 4 if dtype == "float32" else 2
    assert stored < cache.n_tokens * 32 * itemsize + 200 * len(cache.shards)  # no padding stored
    tol = 1e-5 if dtype == "float32" else 2e-2
    for i, datum in enumerate(data):
        got = cache.get(i).float()
        assert got.shape == (len(datum["input_ids"]), 32)
        torch.testing.assert_close(got, prefix_output(model, datum, 3), atol=tol, rtol=tol)
    batch = cache.batch([0, 2], width=16)
    assert batch.shape == (2, 16, 32) and torch.all(batch[1, len(data[2]["input_ids"]) :] == 0)
    assert not list(tmp_path.glob(".c.*"))  # no temporary directory left behind


def test_existing_cache_is_reused_and_a_stale_one_refused(tmp_path):
    model = make("gpt2")
    data = lm_data()
    out = tmp_path / "c"
    first = build_prefix_cache(model, data, 2, out, show_progress=False)
    assert not first.reused
    assert build_prefix_cache(model, data, 2, out, show_progress=False).reused

    # weights of the trained suffix do not matter...
    with torch.no_grad():
        find_parts(model).blocks[3].mlp.c_fc.weight.add_(1.0)
    assert build_prefix_cache(model, data, 2, out, show_progress=False).reused

    changed = [dict(d) for d in data]
    changed[3] = {"input_ids": [5, *changed[3]["input_ids"][1:]], "labels": changed[3]["labels"]}
    cases = {
        "data": (model, changed, 2, {}),
        "boundary": (model, data, 3, {}),
        "dtype": (model, data, 2, {"build": CacheBuild(dtype="bfloat16")}),
        "tokenizer": (model, data, 2, {"tokenizer": tiny_tokenizer(["a b c"])}),
        "model.config": (make("gpt2", n_head=2), data, 2, {}),
    }
    for key, (m, d, k, kw) in cases.items():
        with pytest.raises(SalfError, match=rf"stale: .*{key}") as err:
            build_prefix_cache(m, d, k, out, show_progress=False, **kw)
        assert "rebuild" in err.value.fix

    # ...but the weights of the prefix do
    with torch.no_grad():
        find_parts(model).blocks[1].mlp.c_fc.weight.mul_(1.01)
    with pytest.raises(SalfError, match="model.prefix_weights"):
        build_prefix_cache(model, data, 2, out, show_progress=False)
    rebuilt = build_prefix_cache(model, data, 2, out, build=CacheBuild(rebuild=True), show_progress=False)
    assert not rebuilt.reused
    torch.testing.assert_close(rebuilt.get(0), prefix_output(model, data[0], 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # the old cache and the build dir are gone

    # training refuses a stale cache too, instead of silently reusing it
    with pytest.raises(SalfError, match="stale"):
        train(make("gpt2"), 0, data, FreezeSpec.from_boundary(2, L), config(prefix_cache=str(out)), tmp_path / "run")


def test_a_directory_that_is_not_a_cache_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SalfError, match="not a salf prefix cache"):
        build_prefix_cache(make("gpt2"), lm_data(), 2, out, build=CacheBuild(rebuild=True), show_progress=False)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(SalfError, match="no manifest.json"):
        PrefixCache.open(out)


def test_not_enough_disk_space_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(SalfError) as err:
        build_prefix_cache(make("gpt2"), lm_data(), 2, tmp_path / "c", show_progress=False)
    assert "needs" in err.value.problem and "0.00 GiB is free" in err.value.problem
    assert "bfloat16" in err.value.fix
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(tensors, path):
        raise OSError("disk on fire")

    monkeypatch.setattr(cache_mod, "save_file", broken)
    with pytest.raises(OSError, match="disk on fire"):
        build_prefix_cache(make("gpt2"), lm_data(), 2, tmp_path / "c", show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_boundary_zero_and_a_trainable_prefix_are_refused(tmp_path):
    model = make("gpt2")
    with pytest.raises(SalfError, match="boundary in 1..4"):
        build_prefix_cache(model, lm_data(), 0, tmp_path / "c", show_progress=False)
    with pytest.raises(SalfError, match="at least 1"):
        CacheKeys(model={}, boundary=0, data="x", tokenizer=None, dtype="float32")
    apply_plan(model, FreezeSpec.from_boundary(1, L))
    with pytest.raises(SalfError, match="is trainable"):
        attach_prefix_cache(model, 2)


def test_attachment_runs_the_real_prefix_without_cached_states_and_comes_off(tmp_path):
    model = make("llama")
    data = lm_data(4)
    batch = collate(data, 0)
    with torch.no_grad():
        before = model(**batch).logits
    blocks = find_parts(model).blocks
    report = apply_plan(model, FreezeSpec.from_boundary(2, L))
    attachment = attach_prefix_cache(model, 2)
    assert "forward" in blocks[0].__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)  # evaluation: no salf_prefix, real prefix
        wrong = torch.zeros(4, batch["input_ids"].shape[1] + 1, 32)
        with pytest.raises(SalfError, match="shape"):
            model(**batch, salf_prefix=wrong)
        # the cached states really replace the prefix: zeros in, something else out
        zeros = torch.zeros(4, batch["input_ids"].shape[1], 32)
        assert not torch.allclose(model(**batch, salf_prefix=zeros).logits, before)
    attachment.remove()
    report.remove()
    assert "forward" not in blocks[0].__dict__ and "forward" not in blocks[1].__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)


@pytest.mark.timing
def test_epoch_two_steps_are_faster_from_the_cache(tmp_path):
    """gpt2 width 256, 8 blocks, boundary 6: the cache removes 6 of 8 blocks' forward from every step."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": (ids := torch.randint(3, 120, (64,), generator=g).tolist()), "labels": ids}
        for _ in range(16)
    ]
    overrides = dict(n_embd=256, n_layer=8, n_head=4)
    steps_per_epoch = 4
    timings = {}
    for cached in (False, True):
        model = tiny_model("gpt2", **overrides)
        cfg = config(
            max_steps=None,
            epochs=2,
            batch_size=4,
            timing_warmup_steps=0,
            prefix_cache=str(tmp_path / "cache") if cached else None,
        )
        train(model, 0, data, FreezeSpec.from_boundary(6, 8), cfg, tmp_path / f"run-{cached}")
        history = json.loads((tmp_path / f"run-{cached}" / "history.json").read_text())
        assert len(history) == 2 * steps_per_epoch
        epoch2 = history[steps_per_epoch:]
        timings[cached] = (
            statistics.median(h["seconds"] for h in epoch2),
            statistics.median(h["cpu_seconds"] for h in epoch2),
        )
    wall = timings[True][0] / timings[False][0]
    cpu = timings[True][1] / timings[False][1]
    print(
        f"\nepoch-2 median step time, cached / uncached: wall {timings[True][0] * 1e3:.1f} / "
        f"{timings[False][0] * 1e3:.1f} ms = {wall:.2f}; cpu {cpu:.2f}"
    )
    assert wall < 1.0 and cpu < 1.0


def test_a_cache_another_process_finished_first_is_kept(tmp_path):
    model = make("gpt2")
    data = lm_data()
    out = tmp_path / "c"
    first = build_prefix_cache(model, data, 2, out, show_progress=False)
    shard = out / first.shards[0]
    inode = shard.stat().st_ino
    ours = tmp_path / ".c.building-x"
    shutil.copytree(out, ours)
    cache_mod._replace_dir(ours, out, first.keys, replace_existing=False)  # lost the race: keep theirs
    assert shard.stat().st_ino == inode and not ours.exists()
    other = CacheKeys(
        model=first.keys.model, boundary=3, data=first.keys.data, tokenizer=None, dtype="float32"
    )
    shutil.copytree(out, ours)
    with pytest.raises(SalfError, match="stale: boundary"):
        cache_mod._replace_dir(ours, out, other, replace_existing=False)
