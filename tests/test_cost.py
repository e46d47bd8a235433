"""The cost model against real training steps of tiny models of every architecture.

The acceptance criterion: for every architecture and every boundary, the FLOPs that ``step_cost``
predicts from a meta-device profile equal what ``FlopCounterMode`` counts on a real CPU step with the
same ``requires_grad`` pattern (the spec allows 5%; they agree exactly, and so do the bytes saved for
backward). Profiles are cached per model so each is measured once.
"""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from salf.errors import SalfError
from salf.fileio import to_json
from salf.method.cost import LORA_MODES, MODES, CostProfile, StepCost, boundary_costs, head_key, step_cost
from salf.method.cost_counting import labelled_positions, measure_step_flops
from salf.method.cost_lora import lora_config_for
from salf.method.cost_profile import CostShape, profile_cost
from salf.models.arch import find_parts
from salf.models.tiny import CAUSAL_TYPES, TINY_CONFIGS, tiny_config, tiny_model

B, T = 2, 8
CASES = [(t, "causal-lm") for t in CAUSAL_TYPES] + [("bert", "classification"), ("llama", "classification")]
assert {t for t, _ in CASES} == set(TINY_CONFIGS)


def _model(model_type: str, task: str):
    if task == "classification":
        return tiny_model(model_type, task, num_labels=2).train()
    return tiny_model(model_type).train()


@functools.cache
def _cached(model_type: str, task: str):
    model = _model(model_type, task)
    return model, find_parts(model), profile_cost(model, CostShape(B, T))


@functools.cache
def _lora_profile(model_type: str, task: str, rank: int = 4) -> CostProfile:
    return profile_cost(_cached(model_type, task)[0], CostShape(B, T), lora_rank=rank)


def _batch(task: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (B, T), generator=g)
    labels = torch.randint(0, 2, (B,), generator=g) if task == "classification" else ids
    return {"input_ids": ids, "labels": labels}


def _plan_predicate(parts, blocks, train_embeddings, train_head):
    blocks = set(blocks)

    def trainable(name: str) -> bool:
        group = parts.group_of(name)
        if group.startswith("block:"):
            return int(group.split(":")[1]) in blocks
        if group in ("head", "norm"):
            return train_head
        return train_embeddings  # embeddings (and a tied output projection)

    return trainable


def _assert_agrees(predicted: StepCost, measured, what: str) -> None:
    assert abs(predicted.total - measured.total) <= 0.05 * measured.total, what  # the spec's tolerance
    assert (predicted.forward, predicted.backward) == (measured.forward, measured.backward), what
    assert predicted.activation_bytes == measured.activation_bytes, what


@pytest.mark.parametrize("model_type,task", CASES)
def test_every_boundary_matches_a_real_step(model_type, task):
    model, parts, profile = _cached(model_type, task)
    assert profile.attn_implementation == "eager"
    costs = boundary_costs(profile)
    assert len(costs) == parts.num_layers + 1
    batch = _batch(task)
    for k, predicted in enumerate(costs):
        trainable = _plan_predicate(parts, range(k, parts.num_layers), k == 0, True)
        measured = measure_step_flops(model, batch, trainable)
        _assert_agrees(predicted, measured, f"{model_type} k={k}")
        real_trainable = sum(p.numel() for n, p in model.named_parameters() if trainable(n))
        assert predicted.trainable_params == real_trainable
        assert predicted.grad_bytes == real_trainable * 4  # fp32 tiny models
        assert predicted.optimizer_bytes == real_trainable * 8  # AdamW: two fp32 states
    assert costs[0].total_params == sum(p.numel() for p in model.parameters())
    assert costs[0].param_bytes == 4 * costs[0].total_params


def test_a_mean_pooling_head_matches_a_real_step():
    """A classifier whose head reads the token mean (salf.models.pooling): the meta-device copy pools as the config
    records, so FLOPs and saved bytes still agree exactly at every boundary."""
    from salf.method.cost_profile import build_model
    from salf.models.pooling import MaskedMeanPooler, use_mean_pooling

    model = use_mean_pooling(_model("bert", "classification"))
    assert isinstance(build_model(model.config, "classification", 2, torch.float32, "eager").bert.pooler,
                      MaskedMeanPooler)
    parts = find_parts(model)
    batch = _batch("classification")
    for k, predicted in enumerate(boundary_costs(profile_cost(model, CostShape(B, T)))):
        trainable = _plan_predicate(parts, range(k, parts.num_layers), k == 0, True)
        _assert_agrees(predicted, measure_step_flops(model, batch, trainable), f"mean-pooling bert k={k}")


@pytest.mark.parametrize("model_type,task", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "classification")])
def test_any_plan_matches_a_real_step(model_type, task):
    """Non-contiguous block sets, frozen or trained head and embeddings (GPT-2's head is tied)."""
    model, parts, profile = _cached(model_type, task)
    batch = _batch(task, seed=1)
    rng = random.Random(model_type)
    plans = [({1, 3}, False, True), ({0, 2}, False, False), (set(), True, False)]
    plans.append((set(rng.sample(range(4), rng.randint(1, 3))), rng.random() < 0.5, rng.random() < 0.5))
    for blocks, emb, head in plans:
        measured = measure_step_flops(model, batch, _plan_predicate(parts, blocks, emb, head))
        _assert_agrees(step_cost(profile, blocks, emb, head), measured, f"{model_type} {blocks} emb={emb} head={head}")


@pytest.mark.parametrize("model_type,task", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "classification")])
def test_lora_matches_a_real_peft_step(model_type, task):
    from peft import get_peft_model

    profile = _lora_profile(model_type, task)
    head = task == "classification"  # a classifier trains its head (modules_to_save); an LM's stays frozen
    costs = boundary_costs(profile, train_head=head)
    batch = _batch(task, seed=2)
    for k in (0, 2, 3):
        base = _model(model_type, task)
        model = get_peft_model(base, lora_config_for(base, 4, range(k, 4)))
        measured = measure_step_flops(model, batch)  # peft's own requires_grad pattern
        _assert_agrees(costs[k], measured, f"{model_type} LoRA k={k}")
        assert costs[k].trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = _model(model_type, task)
    model = get_peft_model(base, lora_config_for(base, 4, [1, 3]))
    _assert_agrees(step_cost(profile, [1, 3], train_head=head), measure_step_flops(model, batch), "LoRA {1, 3}")


def _completion_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A causal-LM batch labelled at a few completion positions, different in each row."""
    batch = _batch("causal-lm", seed)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, 5:7], labels[1, 6:8] = batch["input_ids"][0, 5:7], batch["input_ids"][1, 6:8]
    return {**batch, "labels": labels}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_labelled_only_projection_matches_a_real_step(model_type):
    """Training on completions projects only the labelled positions through the head (gpt2's is tied): a
    profile made with that many projected positions agrees exactly with the real step, at every boundary,
    for other plans and with LoRA; the head's share of the step shrinks with the positions."""
    from peft import get_peft_model

    model, parts, full_profile = _cached(model_type, "causal-lm")
    batch = _completion_batch()
    keep = labelled_positions(batch["labels"])
    assert keep.tolist() == [4, 5, 6]
    profile = profile_cost(model, CostShape(B, T, projected_positions=len(keep)))
    assert profile.forward_head == full_profile.forward_head * len(keep) / T  # the head's products scale
    assert profile.forward_blocks == full_profile.forward_blocks
    for k, predicted in enumerate(boundary_costs(profile)):
        trainable = _plan_predicate(parts, range(k, parts.num_layers), k == 0, True)
        _assert_agrees(predicted, measure_step_flops(model, batch, trainable, logits_to_keep=keep), f"{model_type} k={k}")
        assert predicted.total < boundary_costs(full_profile)[k].total
    measured = measure_step_flops(model, batch, _plan_predicate(parts, {1, 3}, False, False), logits_to_keep=keep)
    _assert_agrees(step_cost(profile, {1, 3}, False, False), measured, f"{model_type} {{1, 3}} frozen head")
    lora_profile = profile_cost(model, CostShape(B, T, projected_positions=len(keep)), lora_rank=4)
    base = _model(model_type, "causal-lm")
    lora = get_peft_model(base, lora_config_for(base, 4, range(2, 4)))
    _assert_agrees(boundary_costs(lora_profile, train_head=False)[2], measure_step_flops(lora, batch, logits_to_keep=keep),
                   f"{model_type} LoRA k=2")


def test_lowest_block_variant_is_measured_not_assumed():
    """The lowest trainable block still computes the input gradients its own weights need. GPT-2 is
    pre-LN: ln_1's weights sit below c_attn, so all of the block's input gradients are still needed.
    BERT is post-LN: Q/K/V read the block input directly, so exactly their input gradients are skipped."""
    hidden = 32
    for model_type, task in [("gpt2", "causal-lm"), ("bert", "classification")]:
        p = _cached(model_type, task)[2]
        for j in range(p.num_layers):
            still_needed = p.backward_blocks["lowest"][j] - p.weight_grad_blocks[j]
            skipped = p.backward_blocks["input"][j] - still_needed
            assert skipped == (0 if model_type == "gpt2" else 3 * 2 * B * T * hidden * hidden)


def test_profile_leaves_the_real_model_untouched():
    model = tiny_model("llama")
    model.model.layers[0].requires_grad_(False)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    profile_cost(model, CostShape(1, 4))
    for n, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n
        assert p.grad is None


@pytest.mark.parametrize("model_type,task,lora", [("gemma2", "causal-lm", False), ("bert", "classification", True)])
def test_replicated_profile_equals_full_depth(model_type, task, lora):
    """Measuring one block of each kind and copying it must give the full-depth profile exactly
    (gemma2 alternates sliding and full attention layers: two kinds, and ties its head)."""
    model = _cached(model_type, task)[0]
    replicated = _lora_profile(model_type, task) if lora else _cached(model_type, task)[2]
    assert replicated.profiled_blocks == (2 if model_type == "gemma2" else 1)
    full = profile_cost(model, CostShape(B, T), lora_rank=replicated.lora_rank, replicate=False)
    assert full.profiled_blocks == 0
    assert {**replicated.to_dict(), "profiled_blocks": 0} == full.to_dict()


def test_sdpa_is_profiled_as_the_fused_gpu_kernel():
    """An sdpa profile counts attention as FlopCounterMode does for the fused kernels on a GPU: the
    forward as eager attention, the backward with one more product per block (the kernel recomputes
    the scores), and no T x T probabilities saved. On CPU, FlopCounterMode counts sdpa as zero."""
    eager, parts, eager_profile = _cached("llama", "causal-lm")
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").train()
    sdpa_profile = profile_cost(sdpa, CostShape(B, T))
    assert sdpa_profile.attn_implementation == "sdpa"
    heads, head_dim = 4, 8
    scores = 2 * B * heads * T * T * head_dim  # one T x T product of one block
    fused, plain = boundary_costs(sdpa_profile), boundary_costs(eager_profile)
    for k in range(5):
        assert fused[k].forward == plain[k].forward
        assert fused[k].backward - plain[k].backward == (4 - k) * scores  # blocks with a backward pass
        assert fused[k].activation_bytes < plain[k].activation_bytes or k == 4
    batch = _batch("causal-lm")
    everything = _plan_predicate(parts, range(4), True, True)
    on_cpu = measure_step_flops(sdpa, batch, everything)
    with_eager = measure_step_flops(eager, batch, everything)
    assert with_eager.total == plain[0].total
    assert with_eager.total - on_cpu.total == 4 * 3 * 2 * scores  # per block: 2 products forward, 4 backward


def test_masked_fused_attention_costs_the_same_flops():
    """With a mask (here a sliding window shorter than the batch) sdpa takes the memory-efficient
    kernel: the same FLOP formulas, plus the additive mask it keeps for backward."""
    windowed = boundary_costs(profile_cost(tiny_config("mistral", sliding_window=4), CostShape(B, T), attn_implementation="sdpa"))
    plain = boundary_costs(profile_cost(tiny_config("mistral"), CostShape(B, T), attn_implementation="sdpa"))
    for w, p in zip(windowed, plain):
        assert (w.forward, w.backward) == (p.forward, p.backward)
        assert w.activation_bytes >= p.activation_bytes
    assert windowed[0].activation_bytes > plain[0].activation_bytes


def test_measure_counts_as_the_public_flop_counter():
    model, parts, _ = _cached("opt", "causal-lm")
    trainable = _plan_predicate(parts, [2, 3], False, True)
    lean = measure_step_flops(model, _batch("causal-lm"), trainable)
    public = measure_step_flops(model, _batch("causal-lm"), trainable, module_tracking=True)
    assert lean == public and lean.backward > 0


def test_costs_fall_with_the_boundary():
    for model_type, task in CASES:
        costs = boundary_costs(_cached(model_type, task)[2])
        for a, b in zip(costs, costs[1:]):
            assert b.total < a.total and b.backward < a.backward and b.forward == a.forward, model_type
            assert b.trainable_params < a.trainable_params and b.activation_bytes < a.activation_bytes
            assert b.optimizer_bytes < a.optimizer_bytes and b.ratio_to(costs[0]) < a.ratio_to(costs[0])


def test_backward_splits_into_input_and_weight_gradients():
    p = _cached("llama", "causal-lm")[2]
    frozen_above = step_cost(p, [0])  # blocks 1..3 pay input gradients only
    assert frozen_above.backward_input == pytest.approx(
        sum(p.backward_blocks["input"][1:]) + p.backward_blocks["lowest"][0] - p.weight_grad_blocks[0]
        + p.backward_head[head_key(True, False, False)])
    assert frozen_above.backward_weight == pytest.approx(
        p.weight_grad_blocks[0] + p.backward_head[head_key(True, True, False)] - p.backward_head[head_key(True, False, False)])
    # Training block 3 as well adds exactly its weight gradients.
    assert step_cost(p, [0, 3]).backward - frozen_above.backward == pytest.approx(p.weight_grad_blocks[3])


def test_optimizer_choice_changes_only_optimizer_state():
    p = _cached("llama", "causal-lm")[2]
    adam, sgd, momentum = (step_cost(p, [2, 3], optimizer=o) for o in ("adamw", "sgd", "sgd-momentum"))
    assert sgd.optimizer_bytes == 0 and momentum.optimizer_bytes * 2 == adam.optimizer_bytes
    assert (adam.total, adam.grad_bytes, adam.activation_bytes) == (sgd.total, sgd.grad_bytes, sgd.activation_bytes)


def test_lora_trains_adapters_not_blocks():
    p = _lora_profile("llama", "causal-lm")
    full = step_cost(p, [3], train_head=False)
    plain = step_cost(_cached("llama", "causal-lm")[2], [3], train_head=False)
    assert full.trainable_params == p.lora_params[3] < plain.trainable_params
    assert full.forward == plain.forward + p.lora_forward[3]
    assert p.lora_dtype_bytes == 4 and set(LORA_MODES) <= set(p.backward_blocks)


def test_profile_round_trips_through_json():
    p = _lora_profile("llama", "causal-lm")
    again = CostProfile.from_dict(json.loads(to_json(p.to_dict())))
    assert again == p
    assert boundary_costs(again)[1] == boundary_costs(p)[1]
    assert json.loads(to_json(boundary_costs(p)[1].to_dict()))["total"] == boundary_costs(p)[1].total


def test_profile_of_a_config_uses_its_dtype_and_task():
    config = tiny_config("qwen2")
    p16 = profile_cost(config, CostShape(B, T), dtype=torch.bfloat16)
    p32 = _cached("qwen2", "causal-lm")[2]
    assert p16.dtype_bytes == 2 and p16.task == "causal-lm"
    assert p16.forward_blocks == p32.forward_blocks and p16.backward_blocks == p32.backward_blocks
    assert step_cost(p16, [3]).param_bytes * 2 == step_cost(p32, [3]).param_bytes
    assert 0 < step_cost(p16, [3]).activation_bytes < step_cost(p32, [3]).activation_bytes


def test_mistakes_raise_salf_errors():
    p = _cached("llama", "causal-lm")[2]
    with pytest.raises(SalfError, match="out of range"):
        step_cost(p, [4])
    with pytest.raises(SalfError, match="optimizer"):
        step_cost(p, [1], optimizer="lion")
    with pytest.raises(SalfError, match="task"):
        profile_cost(tiny_config("llama"), CostShape(1, 4), task="seq2seq")
    with pytest.raises(SalfError, match="learned positions"):
        profile_cost(tiny_config("gpt2"), CostShape(1, 4096))
    with pytest.raises(SalfError, match="projected_positions"):
        profile_cost(tiny_config("llama"), CostShape(1, 4, projected_positions=5))
    with pytest.raises(SalfError, match="projected_positions"):
        profile_cost(tiny_config("bert"), CostShape(1, 4, projected_positions=2), task="classification")
    with pytest.raises(SalfError, match="unknown fields"):
        CostProfile.from_dict({**p.to_dict(), "flops": 1})
    with pytest.raises(SalfError, match="at least one block"):
        lora_config_for(tiny_model("llama"), 4, [])
    with pytest.raises(ValueError, match="entries"):
        CostProfile.from_dict({**p.to_dict(), "forward_blocks": p.forward_blocks[:2]})
    with pytest.raises(ValueError, match="modes"):
        CostProfile.from_dict({**p.to_dict(), "backward_blocks": {m: p.backward_blocks[m] for m in MODES[:2]}})


def test_lora_on_planned_blocks_saves_what_the_cost_model_predicts():
    """LoRA placed only at and above the boundary (the planned blocks) against LoRA on every block:
    the measured saving of a real peft step equals the predicted one."""
    from peft import get_peft_model

    costs = boundary_costs(_lora_profile("llama", "causal-lm"), train_head=False)
    batch = _batch("causal-lm", seed=3)
    measured = {}
    for k in (0, 2):
        base = _model("llama", "causal-lm")
        measured[k] = measure_step_flops(get_peft_model(base, lora_config_for(base, 4, range(k, 4))), batch).total
    assert measured[2] < measured[0]
    assert measured[2] / measured[0] == pytest.approx(costs[2].total / costs[0].total, rel=1e-6)
