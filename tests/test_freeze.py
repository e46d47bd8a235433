"""apply_plan: requires_grad by group, a no-grad eval-mode prefix, and a backward that really stops."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from salf.errors import SalfError
from salf.method.freeze import FreezeSpec, applied_report, apply_plan
from salf.models.arch import find_parts
from salf.models.tiny import tiny_model

# The version matrix (scripts/version_matrix.sh) runs these on the lowest allowed and the newest dependencies.
pytestmark = pytest.mark.matrix

L = 4


def _ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (batch, seq), generator=g)


def _grads(model) -> dict[str, bool]:
    return {n: p.grad is not None for n, p in model.named_parameters()}


def test_spec_constructors_and_validation():
    assert FreezeSpec.full(4) == FreezeSpec((0, 1, 2, 3), embeddings=True)
    spec = FreezeSpec.from_boundary(2, 4)
    assert spec.trainable_blocks == (2, 3) and not spec.embeddings and spec.norm and spec.head
    assert spec.lowest == 2
    assert FreezeSpec.from_boundary(4, 4).lowest is None  # head (and norm) only
    assert FreezeSpec.from_dict(spec.to_dict()) == spec
    assert FreezeSpec.full(4).is_full(4) and not spec.is_full(4)
    with pytest.raises(SalfError, match="sorted"):
        FreezeSpec((3, 1), embeddings=False)
    with pytest.raises(SalfError, match="sorted"):
        FreezeSpec((1, 1), embeddings=False)
    with pytest.raises(SalfError, match="negative"):
        FreezeSpec((-1,), embeddings=False)
    with pytest.raises(SalfError, match="outside"):
        FreezeSpec.from_boundary(5, 4)
    with pytest.raises(SalfError, match="not a freeze spec"):
        FreezeSpec.from_dict({"embeddings": True})


def test_requires_grad_by_group_and_counts():
    model = tiny_model("gpt2")
    parts = find_parts(model)
    report = apply_plan(model, FreezeSpec.from_boundary(2, L))
    for name, p in model.named_parameters():
        group = parts.group_of(name)
        want = group in ("block:2", "block:3", "norm", "head")
        assert p.requires_grad == want, name
    # GPT-2's lm_head is tied to wte: one parameter, listed under the embeddings, so it is frozen too.
    assert model.lm_head.weight is model.transformer.wte.weight and not model.lm_head.weight.requires_grad
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert sum(t for t, _ in report.groups.values()) == report.trainable_params
    assert report.groups["block:1"] == (0, report.groups["block:1"][1]) and report.groups["block:1"][1] > 0
    assert report.prefix_blocks == 2 and 0 < report.trainable_fraction < 1
    assert "transformer.h.1" in report.no_grad_modules and "transformer.h.2" not in report.no_grad_modules
    assert applied_report(model) is report

    full = apply_plan(model, FreezeSpec.full(L))  # replaces the previous plan
    assert report.removed and applied_report(model) is full
    assert full.trainable_params == full.total_params and full.prefix_blocks == 0
    assert model.lm_head.weight.requires_grad  # tied head trained with the embeddings
    with pytest.raises(SalfError, match="has 4 blocks"):
        apply_plan(model, FreezeSpec((2, 4), embeddings=False))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_stops_at_the_boundary(checkpointing):
    model = tiny_model("gpt2")
    # What Trainer + gradient checkpointing and PEFT do: make the embedding output require grad.
    model.enable_input_require_grads()
    if checkpointing:
        # transformers 5.x calls it activation_checkpointing_enable, 4.x gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    apply_plan(model, FreezeSpec.from_boundary(2, L))
    seen = []
    model.transformer.h[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    running = ["embeddings"]
    for i, block in enumerate(model.transformer.h):
        block.register_forward_pre_hook(lambda m, args, i=i: running.__setitem__(0, i))
        block.register_forward_hook(lambda m, args, out: running.__setitem__(0, None))
    saved_in: set = set()  # where the forward stores activations for the backward
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_in.add(running[0]) or t, lambda t: t):
        out = model(input_ids=_ids(), labels=_ids(), output_hidden_states=True)
    # None: between two blocks. Before transformers 5.24 the checkpoint wraps a block's __call__, outside its hooks:
    # what it stores (block 2's and 3's inputs) is stored before their pre-hooks run, and the blocks' own saves go
    # to the checkpoint's hooks, not these; from 5.24 on it wraps forward, inside the hooks.
    if None in saved_in:
        assert saved_in <= {None, 2, 3}  # the frozen prefix stores nothing
    else:
        assert saved_in == {2, 3}  # the frozen prefix stores nothing
    hs = out.hidden_states  # hs[0] embeddings output, hs[l] output of block l-1
    for h in hs[:3]:  # the prefix: embeddings, block 0, block 1
        assert not h.requires_grad and h.grad_fn is None
    assert hs[3].grad_fn is not None
    assert seen == [False]  # the lowest trainable block gets an input that needs no input-grad
    assert torch.is_grad_enabled()
    out.loss.backward()
    for name, has_grad in _grads(model).items():
        frozen = not any(f"h.{i}." in name for i in (2, 3)) and "ln_f" not in name
        assert has_grad != frozen, name


def _backward_flops(model) -> int:
    model.train()
    out = model(input_ids=_ids(4, 32), labels=_ids(4, 32))
    with FlopCounterMode(display=False) as counter:
        out.loss.backward()
    return counter.get_total_flops()


def test_no_grad_prefix_saves_backward_flops():
    naive = tiny_model("gpt2")
    naive.enable_input_require_grads()
    parts = find_parts(naive)
    for name, p in naive.named_parameters():  # freezing by requires_grad alone
        p.requires_grad_(parts.group_of(name) in ("block:2", "block:3", "norm", "head"))
    planned = tiny_model("gpt2")
    planned.enable_input_require_grads()
    apply_plan(planned, FreezeSpec.from_boundary(2, L))
    full = tiny_model("gpt2")
    naive_flops, plan_flops, full_flops = (
        _backward_flops(naive),
        _backward_flops(planned),
        _backward_flops(full),
    )
    assert plan_flops < naive_flops < full_flops
    # Backward cost is proportional to the trainable blocks (2 of 4) plus the head: blocks 0-1 cost nothing,
    # whereas freezing by requires_grad alone still pays their input-gradients (about a quarter of full).
    assert plan_flops <= 0.5 * full_flops
    assert naive_flops - plan_flops >= 0.2 * full_flops


def test_frozen_layers_run_in_eval_mode_under_train():
    model = tiny_model("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    apply_plan(model, FreezeSpec.from_boundary(2, L))
    model.train()  # what Trainer does before every step
    ids = _ids()
    with torch.no_grad():
        a = model(input_ids=ids, output_hidden_states=True).hidden_states
        b = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(a[2], b[2])  # prefix output deterministic: dropout off
    assert not torch.equal(a[4], b[4])  # trainable blocks keep their dropout
    assert not model.transformer.h[0].training and not model.transformer.drop.training
    assert model.transformer.h[2].training


def test_non_contiguous_plan_keeps_gradient_flow_through_frozen_blocks():
    model = tiny_model("gpt2", resid_pdrop=0.5)
    report = apply_plan(model, FreezeSpec((1, 3), embeddings=False))
    assert report.prefix_blocks == 1
    model.train()
    out = model(input_ids=_ids(), labels=_ids(), output_hidden_states=True)
    assert out.hidden_states[1].grad_fn is None  # block 0 in the no-grad prefix
    assert out.hidden_states[3].grad_fn is not None  # block 2 frozen but differentiable
    assert not model.transformer.h[2].training  # ... and without dropout
    out.loss.backward()
    grads = _grads(model)
    assert grads["transformer.h.1.attn.c_attn.weight"]  # reached through frozen block 2
    assert not grads["transformer.h.2.attn.c_attn.weight"]
    assert not grads["transformer.h.0.attn.c_attn.weight"] and not grads["transformer.wte.weight"]


def test_remove_restores_the_model():
    model = tiny_model("gpt2")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    report = apply_plan(model, FreezeSpec.from_boundary(3, L))
    report.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert applied_report(model) is None
    assert not model.transformer.h[0]._forward_pre_hooks and not model.transformer.h[2]._forward_hooks
    out = model(input_ids=_ids(), output_hidden_states=True)
    assert out.hidden_states[1].grad_fn is not None


def test_grad_mode_restored_when_forward_fails():
    model = tiny_model("gpt2")
    apply_plan(model, FreezeSpec.from_boundary(2, L))

    def boom(module, args):
        raise RuntimeError("boom")

    handle = model.transformer.h[1].register_forward_pre_hook(boom)  # fails inside the no-grad prefix
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=_ids())
    assert torch.is_grad_enabled()
    handle.remove()


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt_neox", "bert"])
def test_other_architectures(model_type):
    task = "classification" if model_type == "bert" else "causal-lm"
    model = tiny_model(model_type, task, num_labels=3) if task == "classification" else tiny_model(model_type)
    model.enable_input_require_grads()
    apply_plan(model, FreezeSpec.from_boundary(2, L))
    parts = find_parts(model)
    model.train()
    labels = torch.tensor([0, 2]) if task == "classification" else _ids()
    out = model(input_ids=_ids(), labels=labels, output_hidden_states=True)
    assert out.hidden_states[2].grad_fn is None and out.hidden_states[3].grad_fn is not None
    out.loss.backward()
    assert torch.is_grad_enabled()
    for name, p in model.named_parameters():
        group = parts.group_of(name)
        assert (p.grad is not None) == p.requires_grad, name
        assert p.requires_grad == (group in ("block:2", "block:3", "norm", "head")), name
