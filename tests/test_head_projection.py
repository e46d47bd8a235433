"""Training projects only the labelled positions through a causal LM's head (``TrainConfig.project_labelled_only``).

The loss and the gradients equal the model's own full-projection loss; evaluation, plain text and classifiers
keep the full projection; a real training step costs what the cost model predicts for the positions it projects.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from salf.data.batch import IGNORE_INDEX, collate
from salf.method.cost import boundary_costs
from salf.method.cost_counting import labelled_positions, loss_on_positions, projected_forward
from salf.method.cost_profile import CostShape, labelled_positions_estimate, profile_cost
from salf.models.tiny import tiny_model
from salf.training.config import TrainConfig
from salf.training.hf_trainer import SalfTrainer, _takes_logits_to_keep
from salf.training.inputs import TrainingData
from salf.training.run import train

# The version matrix (scripts/version_matrix.sh) runs these on the lowest allowed and the newest dependencies.
pytestmark = pytest.mark.matrix

CAUSAL = ["llama", "gpt2"]  # gpt2's head is tied to its embeddings


def completion_data(prompts=(5, 3, 4, 6), completion: int = 2, seed: int = 0) -> list[dict]:
    """Prompt + completion datums whose completions sit at different positions (so right padding differs)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for n in prompts:
        ids = torch.randint(3, 120, (n + completion,), generator=g).tolist()
        data.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n + ids[n:]})
    return data


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, loss_of):
    model.zero_grad()
    loss = loss_of()
    loss.backward()
    return loss.detach(), _grads(model)


def test_labelled_positions_are_the_union_of_the_rows_shifted_by_one():
    batch = collate(completion_data(), pad_token_id=0)
    # completions start at tokens 5, 3, 4, 6 (two each): positions 4..5, 2..3, 3..4, 5..6 predict them
    assert labelled_positions(batch["labels"]).tolist() == [2, 3, 4, 5, 6]
    assert batch["input_ids"].shape[1] == 8  # padded length; 7 of 8 positions would be shiftable


@pytest.mark.parametrize("model_type", CAUSAL)
def test_projected_loss_and_gradients_equal_the_full_projection(model_type):
    model = tiny_model(model_type).train()
    batch = collate(completion_data(), pad_token_id=0)
    keep = labelled_positions(batch["labels"])
    full, full_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    out = None

    def projected():
        nonlocal out
        out = projected_forward(model, batch, keep)
        return out.loss

    loss, grads = _loss_and_grads(model, projected)
    assert out.logits.shape[1] == len(keep) < batch["input_ids"].shape[1]
    assert loss == pytest.approx(full.item(), rel=1e-6)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Gradient accumulation: the Trainer passes the labelled tokens of all accumulated batches
    items = torch.tensor(3 * int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
    with torch.no_grad():
        own = model(**batch, num_items_in_batch=items).loss
        summed = loss_on_positions(model(**{k: v for k, v in batch.items() if k != "labels"},
                                         logits_to_keep=keep).logits, batch["labels"], keep, items)
    assert summed.item() == pytest.approx(own.item(), rel=1e-6) and own.item() == pytest.approx(full.item() / 3, rel=1e-6)


def _trainer(tmp_path, model, project: bool = True) -> SalfTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, label_names=["labels"])
    return SalfTrainer(model=model, args=args, head_learning_rate=1e-3, project_labelled_only=project)


def _projected_width(trainer, model, batch) -> tuple[int, float]:
    """Logit positions the trainer's loss projected, and that loss."""
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    return outputs.logits.shape[1], loss.item()


def test_the_trainer_projects_labelled_positions_in_training_only(tmp_path):
    model = tiny_model("llama").train()
    batch = collate(completion_data(), pad_token_id=0)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        own = model(**batch).loss.item()
        trainer = _trainer(tmp_path, model)
        assert _projected_width(trainer, model, batch) == (5, pytest.approx(own, rel=1e-6))
        items = torch.tensor(10)
        loss = trainer.compute_loss(model, batch, num_items_in_batch=items)
        assert loss.item() == pytest.approx(model(**batch, num_items_in_batch=items).loss.item(), rel=1e-6)
        assert _projected_width(_trainer(tmp_path, model, project=False), model, batch)[0] == width
        text = collate([{"input_ids": d["input_ids"], "labels": d["input_ids"]} for d in completion_data()], 0)
        assert _projected_width(trainer, model, text)[0] == width  # every position labelled: nothing to save
        model.eval()  # evaluation's metrics read the top token at every position
        assert _projected_width(trainer, model, batch)[0] == width


def test_classifiers_and_lora_wrappers(tmp_path):
    from peft import get_peft_model

    from salf.method.cost_lora import lora_config_for

    classifier = tiny_model("llama", "classification", num_labels=2).train()
    assert not _takes_logits_to_keep(classifier)
    batch = {"input_ids": torch.randint(3, 100, (2, 6)), "labels": torch.tensor([0, 1])}
    with torch.no_grad():
        assert _trainer(tmp_path, classifier)._projected_positions(classifier, batch) is None
    base = tiny_model("llama")
    lora = get_peft_model(base, lora_config_for(base, 4, [2, 3])).train()
    assert _takes_logits_to_keep(lora)  # peft passes logits_to_keep on to the causal LM inside
    batch = collate(completion_data(), pad_token_id=0)
    with torch.no_grad():
        assert _projected_width(_trainer(tmp_path, lora), lora, batch)[0] == 5


def _measured_step(tmp_path, model_type: str, project: bool, data: list[dict]) -> float:
    """FLOPs of one real training step on all of ``data`` in one batch, as the run's callback measured them."""
    config = TrainConfig(max_steps=1, batch_size=len(data), save_steps=None, save_model=False, seed=0,
                         project_labelled_only=project)
    metrics = train(tiny_model(model_type), 0, TrainingData(data, None, "completion"), None, config, tmp_path / f"{model_type}-{project}")
    return metrics["flops_per_padded_token"] * metrics["padded_tokens"]


@pytest.mark.parametrize("model_type", CAUSAL)
def test_a_real_training_step_costs_what_the_cost_model_predicts(tmp_path, model_type):
    data = completion_data(prompts=(9, 3, 6, 12))
    batch = collate(data, pad_token_id=0)
    size, width = batch["input_ids"].shape
    kept = len(labelled_positions(batch["labels"]))
    assert kept == 8 < width - 1  # four rows, two completion tokens each, no shared position
    model = tiny_model(model_type)
    projected = boundary_costs(profile_cost(model, CostShape(size, width, projected_positions=kept)))[0].total
    full = boundary_costs(profile_cost(model, CostShape(size, width)))[0].total
    measured = _measured_step(tmp_path, model_type, True, data)
    assert measured == pytest.approx(projected, rel=1e-9)  # the rule asks for a few percent; it is exact
    assert _measured_step(tmp_path, model_type, False, data) == pytest.approx(full, rel=1e-9)
    assert projected < full


def test_the_planners_estimate_of_projected_positions():
    data = completion_data(prompts=(9, 3, 6, 12))  # two labelled positions per datum
    assert labelled_positions_estimate(data, batch_size=4, seq_len=14) == 8
    assert labelled_positions_estimate(data, batch_size=8, seq_len=14) is None  # 16 >= all 13 shiftable
    text = [{"input_ids": d["input_ids"], "labels": d["input_ids"]} for d in data]
    assert labelled_positions_estimate(text, batch_size=1, seq_len=8) is None
    assert labelled_positions_estimate([{"input_ids": [3, 4], "labels": 1}], 4, 8) is None  # class labels
