"""examples/trl_sft.py: ``SalfCallback`` in TRL's ``SFTTrainer`` on a tiny causal model.

- the frozen prefix (embeddings and blocks below the boundary) is bit-identical after training, the trained
  blocks moved, and backpropagation stopped at the boundary;
- the FLOPs the plan saves under TRL, measured by the callback, equal those it saves in salf's own training
  loop on the same batch shape with the same gradient checkpointing (TRL's default). The totals themselves
  differ by the LM head alone: TRL's ``SFTTrainer`` patches in a fused head that projects only the positions
  with a next-token label, where a plain forward projects every position.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from helpers import WORDS  # noqa: E402

from salf.method.freeze import FreezeSpec  # noqa: E402
from salf.models.loading import tiny_tokenizer  # noqa: E402
from salf.models.tiny import tiny_model  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_sft.py"
SEQ, BATCH, LAYERS = 16, 4, 4


def load_example():
    spec = importlib.util.spec_from_file_location("trl_sft_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(n: int = 8) -> list[list[int]]:
    """Equal-length sequences: no padding, so every batch has the same shape in both trainers."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 120, (SEQ,), generator=g).tolist() for _ in range(n)]


def run_trl(example, boundary: int, steps: int, out: Path):
    from datasets import Dataset

    model = tiny_model("llama", num_hidden_layers=LAYERS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokenizer = tiny_tokenizer(WORDS * 2, model_max_length=128)
    dataset = Dataset.from_list([{"input_ids": ids} for ids in rows()])
    _, callback = example.sft_with_plan(
        model, tokenizer, dataset, FreezeSpec.from_boundary(boundary, LAYERS), str(out), max_steps=steps,
        per_device_train_batch_size=BATCH, learning_rate=1e-2, use_cpu=True, disable_tqdm=True, seed=0)
    return model, before, callback


def salf_step_flops(boundary: int, out: Path) -> int:
    """One step of salf's own training loop (``salf.training.run.train``) with gradient checkpointing."""
    from salf.training.config import TrainConfig
    from salf.training.inputs import TrainingData
    from salf.training.run import train

    data = [{"input_ids": ids, "labels": ids} for ids in rows()]
    config = TrainConfig(max_steps=1, batch_size=BATCH, learning_rate=1e-2, save_steps=None, gradient_checkpointing=True)
    metrics = train(tiny_model("llama", num_hidden_layers=LAYERS), 0, TrainingData(data, None, "lm"), FreezeSpec.from_boundary(boundary, LAYERS), config, out)
    per_token = metrics["flops_per_padded_token"]
    assert metrics.get("padded_tokens", BATCH * SEQ) >= BATCH * SEQ
    return round(per_token * BATCH * SEQ)


def test_sft_trainer_with_a_plan(tmp_path: Path):
    example = load_example()
    boundary = 2
    model, before, callback = run_trl(example, boundary, steps=2, out=tmp_path / "trl")

    frozen = [n for n in before if n.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1."))]
    trained = [n for n in before if n.startswith(("model.layers.2.", "model.layers.3.", "model.norm."))]
    params = dict(model.named_parameters())
    assert frozen and trained
    for name in frozen:
        assert torch.equal(params[name].detach(), before[name]), f"{name} changed"
        assert not params[name].requires_grad
    assert all(not torch.equal(params[n].detach(), before[n]) for n in trained if n.endswith("proj.weight"))
    assert callback.report.prefix_blocks == boundary
    assert len(callback.history) == 2

    # FLOPs: what the plan saves in TRL (full fine-tuning minus the plan) = what it saves in salf's own loop
    trl_plan = callback.sampled_flops
    trl_full = run_trl(example, 0, steps=1, out=tmp_path / "trl-full")[2].sampled_flops
    salf_plan = salf_step_flops(boundary, tmp_path / "salf")
    salf_full = salf_step_flops(0, tmp_path / "salf-full")
    assert trl_plan < trl_full and salf_plan < salf_full
    assert trl_full - trl_plan == salf_full - salf_plan


def test_messages_train_in_trl_with_the_loss_on_assistant_tokens_only(tmp_path: Path):
    """A conversation file through ``sft_dataset``: TRL's batches label exactly salf's targets (the assistant turns,
    found from a chat template without TRL's generation markers), and a plan trains on them."""
    import json

    from test_chat import TEMPLATE, chat_rows

    from salf.data.encode import load_task_data

    example = load_example()
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(8)))
    tokenizer = tiny_tokenizer(WORDS * 2, model_max_length=128)
    tokenizer.chat_template = TEMPLATE
    dataset = example.sft_dataset(str(data), tokenizer)
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    trainer, callback = example.sft_with_plan(
        model, tokenizer, dataset, FreezeSpec.from_boundary(2, LAYERS), str(tmp_path / "trl"), max_steps=1,
        per_device_train_batch_size=BATCH, learning_rate=1e-2, use_cpu=True, disable_tqdm=True, seed=0)
    assert len(callback.history) == 1
    salf_labels = {tuple(d["input_ids"]): d["labels"] for d in load_task_data(data, tokenizer).data}
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        n = len(next(k for k in salf_labels if list(k) == ids[: len(k)]))
        assert labels[:n] == salf_labels[tuple(ids[:n])] and set(labels[n:]) <= {-100}
