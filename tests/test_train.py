"""train() and SalfCallback on tiny models: frozen weights stay put, the plan is cheaper, runs resume."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ragged_lm_data as lm_data
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from salf.data.batch import Collator
from salf.errors import SalfError
from salf.method.freeze import FreezeSpec
from salf.models.arch import find_parts
from salf.models.tiny import tiny_model
from salf.training.callback import SalfCallback
from salf.training.config import TrainConfig, TrainingInterrupted
from salf.training.inputs import RunExtras, TrainingData
from salf.training.run import train

L = 4


def class_data(n: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        label = i % 3
        ids = (
            torch.randint(3, 40, (10,), generator=g) + 40 * label
        ).tolist()  # learnable: tokens encode the class
        data.append({"input_ids": ids, "labels": label})
    return data


def config(**kw) -> TrainConfig:
    base = dict(max_steps=4, batch_size=4, learning_rate=1e-2, save_steps=None, logging_steps=50, seed=0)
    return TrainConfig(**{**base, **kw})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Capture(TrainerCallback):
    """Keeps the optimizer and model the Trainer used, for inspection after train()."""

    def on_train_end(self, args, state, control, optimizer=None, model=None, **kwargs):
        self.optimizer = optimizer
        self.model = model


@pytest.mark.matrix
def test_boundary_run_keeps_frozen_weights_and_optimizer_state(tmp_path):
    model = tiny_model("gpt2")
    parts = find_parts(model)
    before = snapshot(model)
    capture = Capture()
    plan = {"boundary": 2, "policy": "test"}
    metrics = train(model, 0, TrainingData(lm_data(), lm_data(4, seed=1)), FreezeSpec.from_boundary(2, L), config(), tmp_path / "run", RunExtras(plan_dict=plan, callbacks=[capture]))
    trainable = {n for n in before if parts.group_of(n) in ("block:2", "block:3", "norm", "head")}
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    # Only trainable parameters reach AdamW, so frozen ones get no optimizer state.
    opt_params = [p for g in capture.optimizer.param_groups for p in g["params"]]
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in opt_params} == trainable
    assert {by_id[id(p)] for p in capture.optimizer.state} == trainable

    out = tmp_path / "run"
    saved = load_file(out / "model" / "model.safetensors")
    assert torch.equal(saved["transformer.h.3.mlp.c_fc.weight"], model.transformer.h[3].mlp.c_fc.weight)
    assert json.loads((out / "plan.json").read_text()) == plan
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["steps"] == metrics["steps"] == 4
    for key in (
        "eval_loss",
        "train_loss",
        "train_seconds",
        "train_flops",
        "step_seconds_median",
        "peak_rss_bytes",
    ):
        assert on_disk[key] is not None and on_disk[key] > 0, key
    assert metrics["trainable_params"] == sum(model.get_parameter(n).numel() for n in trainable)
    assert metrics["total_params"] == sum(p.numel() for p in model.parameters())
    assert metrics["boundary"] == 2 and metrics["spec"]["trainable_blocks"] == [2, 3]
    assert metrics["train_flops"] == pytest.approx(
        metrics["flops_per_padded_token"] * metrics["padded_tokens"]
    )
    assert metrics["padded_tokens"] == 4 * 4 * 16  # 4 steps of 4 sequences padded to 16
    assert "FlopCounterMode" in metrics["train_flops_method"]
    assert metrics["step_seconds_count"] == 3  # step 1 was FLOP-measured
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4] and all(h["loss"] > 0 for h in history)
    assert not hasattr(model, "_salf_freeze")  # hooks removed after the run


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier timings on a shared machine
    yield
    torch.set_num_threads(before)


# Not in the version matrix (@pytest.mark.matrix): a timing test, which says nothing about library versions.
@pytest.mark.timing
def test_half_boundary_steps_are_faster_than_full(tmp_path, one_thread):
    # gpt2, 8 blocks of width 256, sequences of 64: boundary 4 skips half the backward pass (FLOPs 2/3
    # of full). Runs alternate (full, half, full, half). Load from other processes only ever adds time,
    # so the fastest timed step of each setting is the robust estimate; the medians must agree too.
    data = lm_data(8, seq=64)
    medians: dict[int, list[float]] = {0: [], 4: []}
    steps: dict[int, list[dict]] = {0: [], 4: []}
    flops: dict[int, float] = {}
    for run, k in enumerate((0, 4, 0, 4)):
        model = tiny_model("gpt2", n_embd=256, n_layer=8, n_head=4)
        metrics = train(model, 0, data, FreezeSpec.from_boundary(k, 8), config(max_steps=6, batch_size=4, learning_rate=1e-4, timing_warmup_steps=2), tmp_path / f"run{run}")
        assert metrics["step_seconds_count"] == 4
        medians[k].append(metrics["step_seconds_median"])
        flops[k] = metrics["flops_per_padded_token"]
        history = json.loads((tmp_path / f"run{run}" / "history.json").read_text())
        # The steps the median uses: after the FLOP-counted step and the warm-up.
        steps[k] += [h for h in history if h["step"] > 2]
    assert flops[4] / flops[0] == pytest.approx(2 / 3, abs=0.03)  # forward + half the backward
    best = {k: min(h["seconds"] for h in steps[k]) for k in steps}
    best_cpu = {k: min(h["cpu_seconds"] for h in steps[k]) for k in steps}
    ratio = best[4] / best[0]
    cpu_ratio = best_cpu[4] / best_cpu[0]
    median_ratio = min(medians[4]) / min(medians[0])
    print(f"step time L/2 vs full: best {ratio:.2f}, cpu {cpu_ratio:.2f}, median {median_ratio:.2f}")
    assert cpu_ratio < 0.8  # expected about 0.6 (FLOPs 2/3, optimizer half)
    assert ratio < 0.9
    assert median_ratio < 1.0


class SignalAt(TrainerCallback):
    """Sends the process SIGINT while step ``step`` runs, as Ctrl-C would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.matrix
def test_interrupt_then_resume_matches_straight_run(tmp_path):
    cfg = config(max_steps=6, save_steps=100, lr_scheduler="linear", warmup_ratio=0.2)
    spec = FreezeSpec.from_boundary(1, L)
    straight = tiny_model("gpt2")
    train(straight, 0, lm_data(), spec, cfg, tmp_path / "straight")

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="step 3") as info:
        train(tiny_model("gpt2"), 0, lm_data(), spec, cfg, tmp_path / "split", RunExtras(callbacks=[SignalAt(3)]))
    assert signal.getsignal(signal.SIGINT) is handler  # our handler is gone again
    assert info.value.checkpoint.endswith("checkpoint-3") and Path(info.value.checkpoint).is_dir()

    with pytest.raises(SalfError, match="not empty"):
        train(tiny_model("gpt2"), 0, lm_data(), spec, cfg, tmp_path / "split")
    resumed = tiny_model("gpt2")  # a fresh copy of the base model, as a new process would load it
    metrics = train(resumed, 0, lm_data(), spec, config(**{**vars(cfg), "resume": True}), tmp_path / "split")
    assert metrics["steps"] == 6 and metrics["resumed_from"].endswith("checkpoint-3")
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    history = json.loads((tmp_path / "split" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]


class PoisonAt(TrainerCallback):
    """Makes the loss NaN from step ``step`` on by poisoning a trainable weight."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.transformer.ln_f.weight.fill_(float("nan"))


def completion_data() -> list[dict]:
    """``lm_data`` with the first half of every row's positions masked: the trainer projects only the rest."""
    return [{**d, "labels": [-100] * (len(d["labels"]) // 2) + d["labels"][len(d["labels"]) // 2:]} for d in lm_data()]


@pytest.mark.matrix
@pytest.mark.parametrize("make_data", [lm_data, completion_data], ids=["text", "completion"])
def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path, make_data):
    out = tmp_path / "run"
    with pytest.raises(SalfError, match=r"at step 3.*checkpoint-2"):
        train(tiny_model("gpt2"), 0, make_data(), FreezeSpec.from_boundary(2, L), config(max_steps=6, save_steps=1), out, RunExtras(callbacks=[PoisonAt(3)]))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]  # the diverged step was not saved
    kept = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["step"] == 3 and history[-1]["loss"] is None  # NaN written as null
    # every step before it has its loss, also where the loss is computed outside the model (labelled positions)
    assert [h["step"] for h in history[:-1]] == [1, 2] and all(math.isfinite(h["loss"]) for h in history[:-1])
    assert not (out / "metrics.json").exists()


@pytest.mark.matrix
def test_lora_adapters_only_on_planned_blocks(tmp_path):
    model = tiny_model("gpt2", "classification", num_labels=3)
    score_before = model.score.weight.detach().clone()
    base_before = model.transformer.h[3].attn.c_attn.weight.detach().clone()
    capture = Capture()
    data = class_data()
    metrics = train(model, 0, TrainingData(data, data[:6], "classification"), FreezeSpec.from_boundary(2, L), config(max_steps=3, lora=True, lora_rank=4, gradient_checkpointing=True, learning_rate=1e-3), tmp_path / "run", RunExtras(callbacks=[capture]))
    lora_blocks = {
        int(name.split(".h.")[1].split(".")[0])
        for name, _ in capture.model.named_parameters()
        if "lora_" in name
    }
    assert lora_blocks == {2, 3}
    trainable = {n for n, p in capture.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score.modules_to_save" in n for n in trainable)
    assert any("score.modules_to_save" in n for n in trainable)  # the fresh head is trained fully
    lora_b = {n: p for n, p in capture.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # zero-initialised, then trained
    assert torch.equal(model.transformer.h[3].attn.c_attn.base_layer.weight, base_before)
    assert not torch.equal(model.score.modules_to_save["default"].weight, score_before)
    adapter = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [2, 3]
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()
    assert 0 <= metrics["eval_accuracy"] <= 1 and 0 <= metrics["eval_macro_f1"] <= 1
    assert metrics["lora"] and metrics["trainable_params"] < metrics["total_params"] / 4


@pytest.mark.matrix
def test_completion_metrics_score_each_completion_token_from_the_position_before_it():
    from types import SimpleNamespace

    from salf.training.eval_metrics import completion_metrics

    labels = np.array([[-100, -100, 5, 6], [-100, 7, 8, -100], [-100, -100, -100, -100]])
    top = np.array([[0, 5, 6, 0], [7, 9, 0, 0], [1, 1, 1, 1]])  # row 0 right twice; row 1 right, then wrong
    metrics = completion_metrics(SimpleNamespace(predictions=top, label_ids=labels))
    assert metrics == {"token_accuracy": 0.75, "exact_match": 0.5}  # the row without a completion is not counted


@pytest.mark.matrix
def test_merged_lora_model_is_saved_with_its_tokenizer(tmp_path):
    """model-merged is a whole model a user loads on its own, so the tokenizer goes there too."""
    from peft import LoraConfig, get_peft_model

    from salf.training.trainer import _save_model

    saved = []

    class Tokenizer:
        def save_pretrained(self, folder):
            saved.append(Path(folder))

    model = get_peft_model(tiny_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"]))
    _save_model(model, Tokenizer(), tmp_path / "model", config(lora=True, lora_save_merged=True))
    assert saved == [tmp_path / "model", tmp_path / "model-merged"]
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "model-merged" / "model.safetensors").is_file()


@pytest.mark.matrix
def test_fresh_head_gets_its_own_learning_rate(tmp_path):
    capture = Capture()
    model = tiny_model("bert", "classification", num_labels=3)
    metrics = train(model, 0, TrainingData(class_data(), class_data(6, seed=1), "classification"), FreezeSpec.from_boundary(3, L), config(max_steps=2, learning_rate=1e-4, head_learning_rate=5e-3), tmp_path / "run", RunExtras(callbacks=[capture]))
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["initial_lr"] for g in capture.optimizer.param_groups for p in g["params"]}
    assert lrs["classifier.weight"] == lrs["bert.pooler.dense.weight"] == 5e-3
    assert lrs["bert.encoder.layer.3.attention.self.query.weight"] == 1e-4
    assert not any(n.startswith(("bert.embeddings", "bert.encoder.layer.2.")) for n in lrs)
    assert metrics["eval_accuracy"] is not None and metrics["eval_macro_f1"] is not None


@pytest.mark.matrix
@pytest.mark.parametrize("late", [False, True])
def test_salf_callback_in_a_users_trainer(tmp_path, late):
    model = tiny_model("gpt2")
    before = snapshot(model)
    callback = SalfCallback(FreezeSpec.from_boundary(3, L))
    trainer = _user_trainer(tmp_path, model, 3, None if late else [callback], learning_rate=1e-2)
    if late:  # added after the Trainer was built: the plan is applied when training begins
        trainer.add_callback(callback)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("transformer.h.3.", "transformer.ln_f.")) for n in changed)
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(opt_params) == sum(1 for p in model.parameters() if p.requires_grad) == len(changed)
    assert all(p.requires_grad for p in trainer.optimizer.state)
    assert [h["step"] for h in callback.history] == [1, 2, 3]
    assert callback.flops_per_padded_token > 0 and callback.step_seconds_median > 0
    assert any("trainable_fraction" in entry for entry in trainer.state.log_history)


@pytest.mark.matrix
def test_salf_callback_raises_on_nan_in_a_users_trainer(tmp_path):
    model = tiny_model("gpt2")
    callback = SalfCallback(FreezeSpec.from_boundary(2, L), flop_sample_steps=0)
    trainer = _user_trainer(tmp_path, model, 5, [callback, PoisonAt(2)])
    with pytest.raises(SalfError, match="at step 2.*no checkpoint was saved"):
        trainer.train()
    assert trainer.state.global_step == 2  # stopped at once
    assert callback.flops_per_padded_token is None and callback.sampled_flops == 0


@pytest.mark.matrix
def test_refuses_non_empty_out_dir_and_bad_settings(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    model = tiny_model("gpt2")
    with pytest.raises(SalfError, match="not empty"):
        train(model, 0, lm_data(), None, config(), out)
    with pytest.raises(SalfError, match="nothing to resume"):
        train(model, 0, lm_data(), None, config(resume=True), out)
    with pytest.raises(SalfError, match="pick one"):
        config(resume=True, overwrite=True)
    with pytest.raises(SalfError, match="warmup_ratio"):
        config(warmup_ratio=1.5)
    with pytest.raises(SalfError, match="lr_scheduler"):
        config(lr_scheduler="zigzag")
    with pytest.raises(SalfError, match="needs a list of token labels"):
        train(model, 0, class_data(), None, config(), tmp_path / "other")
    with pytest.raises(SalfError, match="LoRA needs at least one trainable block"):
        train(model, 0, lm_data(), FreezeSpec.from_boundary(L, L), config(lora=True), tmp_path / "other")
    metrics = train(model, 0, lm_data(), None, config(max_steps=1, overwrite=True), out)
    assert metrics["steps"] == 1 and metrics["boundary"] == 0
    assert metrics["trainable_params"] == metrics["total_params"]  # no spec: full fine-tuning
    assert (out / "notes.txt").read_text() == "keep me"  # overwrite replaces salf's outputs only


def _user_trainer(tmp_path, model, max_steps: int, callbacks, **args) -> Trainer:
    """A Trainer built the way a user would, without salf.training.run."""
    training_args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, report_to="none",
        remove_unused_columns=False, save_strategy="no", disable_tqdm=True, **args,
    )
    return Trainer(model=model, args=training_args, data_collator=Collator(0), train_dataset=lm_data(),
                   callbacks=callbacks)


@pytest.mark.matrix
@pytest.mark.parametrize("ratio, total, steps", [(0.1, 200, 20), (0.05, 150, 8), (0.0, 100, 0)])
def test_warmup_is_the_configured_share_of_the_run(tmp_path, ratio, total, steps):
    """On every transformers version: 4.x reads the share from ``warmup_ratio`` (a float in ``warmup_steps`` was
    an int count there, so warm-up vanished), 5.x from a float below 1 in ``warmup_steps``."""
    from salf.training.trainer import _training_arguments

    args = _training_arguments(TrainConfig(warmup_ratio=ratio, max_steps=total), tmp_path, "lm", has_eval=False)
    assert args.get_warmup_steps(total) == steps
