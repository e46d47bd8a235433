"""A plan trains under FSDP (FSDP1 with use_orig_params, FSDP2) through salf's own loop, on 2 CPU processes.

salf's path is the one users run: ``salf.training.run.train`` -> ``Trainer`` -> accelerate's FSDP
``prepare`` (per-block wrapping from the ``TRANSFORMER_BASED_WRAP`` policy), with the environment
``accelerate launch --config_file`` sets for an FSDP config. Processes are forked (``run_forked``, gloo).

accelerate 1.16 turns FSDP on only for accelerator devices: on a CPU-only machine its ``AcceleratorState``
keeps ``MULTI_CPU`` (DDP) and drops the FSDP plugin, so an FSDP config silently trains with DDP
(docs/DISTRIBUTED.md). ``_fsdp_on_cpu`` promotes the state of the forked test processes to ``FSDP`` on the
device ``cpu`` (FSDP1 refuses accelerate's ``cpu:0`` against its compute device ``cpu``); everything after
that is accelerate's, the Trainer's and torch's own FSDP code.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from salf.data.batch import IGNORE_INDEX
from salf.fileio import write_json
from salf.method.cost_counting import labelled_positions, measure_step_flops
from salf.method.freeze import FreezeSpec, apply_plan
from salf.models.tiny import tiny_model
from salf.training.selfcheck import run_forked

WORLD = 2
LAYERS, BOUNDARY, STEPS, BATCH, SEQ = 4, 2, 3, 2, 12

# What `accelerate launch --config_file` exports for an FSDP config with per-block wrapping
# (accelerate.utils.launch.prepare_multi_gpu_env); FSDP1 needs use_orig_params for frozen parameters.
FSDP_ENV = {
    1: {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "1",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
        "FSDP_USE_ORIG_PARAMS": "true",
        "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    },
    2: {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
        "FSDP_RESHARD_AFTER_FORWARD": "true",
        "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    },
}

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="forked CPU processes (gloo)")


def _fsdp_on_cpu() -> None:
    """Let accelerate's FSDP run on CPU processes (test shim, see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            cpu = torch.device("cpu")
            # AcceleratorState copies PartialState's attributes on every construction: promote both.
            PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=cpu)
            self.distributed_type, self.device, self.fsdp_plugin = DistributedType.FSDP, cpu, fsdp_plugin

    AcceleratorState.__init__ = init


def fsdp_data() -> list[dict]:
    """``BATCH x WORLD x STEPS`` rows whose first half is an unlabelled prompt (so salf's loop projects only
    the labelled positions through the head, ``logits_to_keep``)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(BATCH * WORLD * STEPS):
        ids = torch.randint(3, 120, (SEQ,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (SEQ // 2) + ids[SEQ // 2:]})
    return rows


def _local_numel(t: torch.Tensor) -> int:
    return t.to_local().numel() if hasattr(t, "to_local") else t.numel()


def fsdp_worker(out: Path, version: int, promote: bool = True) -> None:
    """One rank: train the plan under FSDP ``version`` with salf's loop; write what the rank saw.
    ``promote=False``: accelerate as it is, which on CPU drops FSDP."""
    import logging

    from transformers import TrainerCallback

    from salf.training.config import TrainConfig
    from salf.training.inputs import RunExtras
    from salf.training.run import train

    os.environ.update(FSDP_ENV[version])
    if promote:
        _fsdp_on_cpu()
    warnings: list[str] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("salf.training").addHandler(catcher)
    rank = int(os.environ["RANK"])
    model = tiny_model("llama", "causal-lm", seed=0, num_hidden_layers=LAYERS)
    names = {id(p): n for n, p in model.named_parameters()}  # original names: FSDP2 swaps in DTensors
    grad_seen: dict[int, list[bool]] = {i: [] for i in range(LAYERS)}

    def record(i):
        def hook(module, args, output):
            out_t = output[0] if isinstance(output, tuple) else output  # (no evaluation: training forwards only)
            grad_seen[i].append(torch.is_grad_enabled() or out_t.requires_grad)
        return hook

    for i, block in enumerate(model.model.layers):  # on the blocks themselves, inside FSDP's wrapping
        block.register_forward_hook(record(i))

    class Probe(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            params = dict(model.named_parameters())
            clean = {n.replace("_fsdp_wrapped_module.", ""): p for n, p in params.items()}
            by_id = {id(p): n for n, p in clean.items()}
            in_state = [(by_id[id(p)], p) for p in optimizer.state]
            self.result = {
                "wrapped": type(model).__name__,
                "block_type": type(getattr(model, "module", model).model.layers[0] if not
                                   hasattr(model, "_fsdp_wrapped_module") else
                                   model._fsdp_wrapped_module.model.layers[0]).__name__,
                "param_type": type(next(iter(params.values()))).__name__,
                "state_names": sorted(n for n, _ in in_state),
                "state_requires_grad": all(p.requires_grad for _, p in in_state),
                "state_numel": sum(_local_numel(optimizer.state[p]["exp_avg"]) for _, p in in_state),
                "frozen_with_grad": sorted(n for n, p in clean.items() if not p.requires_grad and p.grad is not None),
                "trainable_names": sorted(n for n, p in clean.items() if p.requires_grad),
            }

    probe = Probe()
    config = TrainConfig(max_steps=STEPS, batch_size=BATCH, learning_rate=1e-2, save_steps=None, logging_steps=1,
                         seed=0, flop_sample_steps=1, timing_warmup_steps=0, overwrite=True)
    spec = FreezeSpec.from_boundary(BOUNDARY, LAYERS)
    metrics = train(model, 0, fsdp_data(), spec, config, out / "run", RunExtras(callbacks=[probe]))
    write_json(out / f"rank{rank}.json", {
        **probe.result,
        "grad_seen": {str(i): seen for i, seen in grad_seen.items()},
        "metrics": {k: metrics[k] for k in ("trainable_params", "flops_per_padded_token", "boundary", "steps",
                                            "train_loss")},
        "original_names": len(names),
        "warnings": warnings,
    })


@cpu_only
@pytest.mark.parametrize("version", [1, 2], ids=["fsdp1-use_orig_params", "fsdp2-fully_shard"])
def test_plan_trains_under_fsdp(tmp_path, version):
    run_forked(fsdp_worker, WORLD, tmp_path, version, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == STEPS and [h["tokens"] for h in history] == [WORLD * BATCH * SEQ] * STEPS
    assert all(r["metrics"]["steps"] == STEPS and math.isfinite(r["metrics"]["train_loss"]) for r in ranks)

    # the model really was sharded: FSDP1 wrappers (flat parameters behind the original ones) / FSDP2 DTensors
    wrapped = {1: ("FullyShardedDataParallel", "FullyShardedDataParallel", "Parameter"),
               2: ("FSDPLlamaForCausalLM", "FSDPLlamaDecoderLayer", "DTensor")}[version]
    for r in ranks:
        assert (r["wrapped"], r["block_type"], r["param_type"]) == wrapped

    # the reference: the same plan on the same model in one process, no FSDP
    reference = tiny_model("llama", "causal-lm", seed=0, num_hidden_layers=LAYERS)
    initial = {n: p.detach().clone() for n, p in reference.state_dict().items()}
    batch = {k: torch.tensor([d[k] for d in fsdp_data()[:BATCH]]) for k in ("input_ids", "labels")}
    keep = labelled_positions(batch["labels"])
    full = measure_step_flops(reference, batch, logits_to_keep=keep)  # full fine-tuning, before the plan
    report = apply_plan(reference, FreezeSpec.from_boundary(BOUNDARY, LAYERS))
    trainable = sorted(n for n, p in reference.named_parameters() if p.requires_grad)
    assert report.prefix_blocks == BOUNDARY and ranks[0]["metrics"]["boundary"] == BOUNDARY

    # backward stops at the boundary: the frozen blocks ran without autograd on every rank and step (no
    # graph, so no backward and no backward gather reaches them); the trainable ones built a graph
    for r in ranks:
        for i in range(LAYERS):
            seen = r["grad_seen"][str(i)]
            assert len(seen) == STEPS and all(s == (i >= BOUNDARY) for s in seen), (i, seen)
        assert r["frozen_with_grad"] == []
        assert r["trainable_names"] == trainable
    # ... and the FLOPs salf measured on each rank's first sharded step are the plan's: forward everywhere,
    # backward of blocks >= BOUNDARY and the head only (equal to the unsharded step; full training costs more)
    planned = measure_step_flops(reference, batch, logits_to_keep=keep)
    assert planned.total < full.total
    for r in ranks:
        assert r["metrics"]["flops_per_padded_token"] * BATCH * SEQ == planned.total

    # the optimizer holds state for trainable parameters only; each rank for its own shards, which together
    # are exactly the trainable parameters
    for r in ranks:
        assert r["state_requires_grad"] and set(r["state_names"]) <= set(trainable)
    assert set().union(*(r["state_names"] for r in ranks)) == set(trainable)
    assert sum(r["state_numel"] for r in ranks) == report.trainable_params == ranks[0]["metrics"]["trainable_params"]

    # the saved model (gathered from the shards) reloads: frozen weights bit-identical, trained ones changed
    from transformers import AutoModelForCausalLM

    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").state_dict()
    assert set(saved) <= set(reloaded) and set(initial) == set(reloaded)
    for name, before in initial.items():
        after = reloaded[name]
        if name in trainable:
            assert not torch.equal(after, before), f"{name} was trained but did not change"
        else:
            assert torch.equal(after, before), f"{name} is frozen but changed"
    assert any(n.startswith(f"model.layers.{BOUNDARY}.") for n in trainable)


@cpu_only
def test_fsdp_config_on_cpu_trains_with_ddp_and_salf_says_so(tmp_path):
    """Without the shim, accelerate on CPU ignores the FSDP environment and trains with DDP, unsharded (what
    ``accelerate launch --config_file fsdp.yaml`` does on a machine without a GPU); salf warns."""
    run_forked(fsdp_worker, WORLD, tmp_path, 2, False, timeout=300)
    for r in range(WORLD):
        seen = json.loads((tmp_path / f"rank{r}.json").read_text())
        # the Trainer's model stays unwrapped (DDP wraps it only in model_wrapped), nothing is sharded, and
        # every rank holds the optimizer state of all trainable parameters
        assert (seen["wrapped"], seen["block_type"], seen["param_type"]) == (
            "LlamaForCausalLM", "LlamaDecoderLayer", "Parameter")
        assert seen["state_numel"] == seen["metrics"]["trainable_params"]
        assert any("FSDP was requested" in w and "MULTI_CPU" in w for w in seen["warnings"]), seen["warnings"]
