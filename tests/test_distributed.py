"""A plan trains under DDP (2 CPU processes, gloo) exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from salf.errors import SalfError
from salf.training.config import TrainConfig
from salf.training.distributed import is_main_process, rank_and_world, reduce_step
from salf.training.outputs import prepare_out_dir as _prepare_out_dir
from salf.training.perdatum import BoundaryBatchSampler
from salf.training.selfcheck import SelfCheck, compare, run_forked, selfcheck

WORLD = 2
# run_forked forks CPU processes; a machine with a GPU would put both ranks on it (use the torchrun test there).
cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="fork-based CPU DDP check; see the torchrun test"
)


def weight_hashes(out: Path) -> set[str]:
    return {json.loads((out / f"weights-rank{r}.json").read_text())["sha256"] for r in range(WORLD)}


def run_both(tmp_path: Path, check: SelfCheck, single_check: SelfCheck | None = None) -> tuple[dict, dict]:
    single = selfcheck(tmp_path / "single", single_check or check)
    run_forked(selfcheck, WORLD, tmp_path / "multi", check)
    multi = json.loads((tmp_path / "multi" / "selfcheck.json").read_text())
    return single, multi


@cpu_only
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    check = SelfCheck(global_batch=4, steps=4, boundary=2, find_unused_parameters=False)
    single, multi = run_both(tmp_path, check)
    assert single["world_size"] == 1 and multi["world_size"] == WORLD
    worst = compare(single["losses"], multi["losses"], rtol=1e-4)
    print(f"\nDDP x{WORLD} vs 1 process, loss curves: worst relative difference {worst:.1e}")
    assert multi["tokens"] == single["tokens"] == [4 * 12] * 4  # global token counts
    assert multi["trainable_params"] == single["trainable_params"]
    assert len(weight_hashes(tmp_path / "multi")) == 1  # DDP kept the ranks' weights identical
    # only the main process wrote the run's files, and the frozen prefix kept its pretrained weights
    assert (tmp_path / "multi" / "run" / "metrics.json").is_file()
    assert json.loads((tmp_path / "multi" / "run" / "metrics.json").read_text())["boundary"] == 2


@cpu_only
def test_two_processes_train_from_one_shared_prefix_cache(tmp_path):
    plain = SelfCheck(global_batch=4, steps=3, boundary=2)
    single, multi = run_both(
        tmp_path, SelfCheck(global_batch=4, steps=3, boundary=2, prefix_cache=True), plain
    )
    worst = compare(single["losses"], multi["losses"], rtol=1e-4)
    print(f"\nDDP x{WORLD} from a prefix cache vs 1 process without: worst relative difference {worst:.1e}")
    assert (tmp_path / "multi" / "cache" / "manifest.json").is_file()
    assert [p.name for p in (tmp_path / "multi").iterdir() if p.name.startswith(".")] == []
    assert len(weight_hashes(tmp_path / "multi")) == 1


@cpu_only
def test_per_datum_boundaries_under_ddp_keep_the_ranks_in_step(tmp_path):
    check = SelfCheck(global_batch=4, steps=4, boundary=1, per_datum=True, find_unused_parameters=True)
    run_forked(selfcheck, WORLD, tmp_path / "multi", check)
    multi = json.loads((tmp_path / "multi" / "selfcheck.json").read_text())
    assert len(multi["losses"]) == 4 and all(torch.isfinite(torch.tensor(multi["losses"])))
    assert len(weight_hashes(tmp_path / "multi")) == 1
    # batch i of the epoch goes to rank i % 2: some steps train boundary 1 on one rank and 2 on the other
    batches = BoundaryBatchSampler([1 + i % 2 for i in range(16)], 2, seed=0).batches(0)
    ks = [1 + b[0] % 2 for b in batches]
    assert any(ks[2 * j] != ks[2 * j + 1] for j in range(4))
    for r in range(WORLD):
        seen = json.loads((tmp_path / "multi" / f"weights-rank{r}.json").read_text())["forwards_per_boundary"]
        assert seen == {str(k): n for k, n in sorted(Counter(ks[r::WORLD]).items())}
    with pytest.raises(SalfError, match="find_unused_parameters=True"):
        SelfCheck(per_datum=True, find_unused_parameters=False)


def test_rank_helpers_without_a_process_group(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world() == (1, 2) and not is_main_process()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_and_world() == (0, 1) and is_main_process()
    assert reduce_step(torch.tensor(2.5), 7, loss_scale=3.0) == (2.5, 7)  # local values: nothing to reduce
    # a non-main rank neither refuses nor cleans a non-empty output directory (rank 0 does both)
    (tmp_path / "old.txt").write_text("x")
    assert _prepare_out_dir(tmp_path, TrainConfig(save_steps=None), main=False) is None
    with pytest.raises(SalfError, match="not empty"):
        _prepare_out_dir(tmp_path, TrainConfig(save_steps=None), main=True)
    with pytest.raises(SalfError, match="differs"):
        compare([1.0, 2.0], [1.0, 2.1])


@pytest.mark.slow
def test_torchrun_selfcheck_matches_one_process(tmp_path):
    """The real launcher: ``torchrun --nproc_per_node 2 -m salf.training.selfcheck selfcheck`` (slow: 3 interpreters)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }  # gloo on the CPU, also on a machine with one GPU
    base = [sys.executable, "-m", "salf.training.selfcheck"]
    subprocess.run([*base, "selfcheck", "--out", str(tmp_path / "single")], check=True, env=env, timeout=300)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={WORLD}",
            "-m",
            "salf.training.selfcheck",
            "selfcheck",
            "--out",
            str(tmp_path / "multi"),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    done = subprocess.run(
        [*base, "compare", str(tmp_path / "single"), str(tmp_path / "multi")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "multi" / "selfcheck.json").read_text())["world_size"] == WORLD
