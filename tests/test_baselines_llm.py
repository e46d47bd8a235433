"""The LLM tools' rules as baselines (``salf.bench.baselines_llm``): freeze-deep-half, Spectrum, LoRA on the plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salf.bench.baselines import BASELINES, BaselineContext
from salf.bench.baselines_llm import ModuleSelection, spectrum_selection, spectrum_snr
from salf.errors import SalfError
from salf.models.arch import find_parts
from salf.models.loading import LoadedModel
from salf.models.tiny import tiny_model


def context(model=None, num_layers=4, default_boundary=None) -> BaselineContext:
    loaded = LoadedModel(model=model, tokenizer=None, task="lm", fresh_head=False, model_type="llama",
                         name_or_path="tiny") if model is not None else None
    return BaselineContext(load=lambda: loaded, data=None, num_layers=num_layers, cost=np.linspace(1, 0.4, 5), seed=0,
                           batch_size=4, learning_rate=1e-4, default_boundary=default_boundary)


def test_spectrum_snr_is_spectrums_formula():
    # singular values 10, 4, 3, 2, 1.5, 1, 0.5, 0.25 of a square matrix: quartiles 3.25 and 0.875, so
    # sigma = 2.375 / 1.349 and the Marchenko-Pastur bound 2 sigma = 3.52; signal 10 + 4 over noise 8.25,
    # divided by the largest singular value 10
    s = torch.tensor([10.0, 4, 3, 2, 1.5, 1, 0.5, 0.25])
    assert spectrum_snr(torch.diag(s)) == pytest.approx(14 / 8.25 / 10, rel=1e-5)
    assert spectrum_snr(torch.diag(s)[:, :6] @ torch.eye(6, 12)) > 0  # rectangular: beta = 6 / 12


def test_spectrum_selects_the_top_share_of_each_module_type_and_freezes_the_rest():
    model = tiny_model("llama", num_hidden_layers=4)
    blocks = find_parts(model).blocks
    selection = spectrum_selection(model, 0.25)
    assert set(selection) >= {"self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"}
    for module, chosen in selection.items():
        scores = [spectrum_snr(block.get_submodule(module).weight) for block in blocks]
        assert chosen == [int(np.argmax(scores))]  # ceil(25% of 4 blocks): the one with the highest SNR
    assert all(len(chosen) == 2 for chosen in spectrum_selection(model, 0.5).values())

    ModuleSelection(selection).on_train_begin(None, None, None, model=model)
    for j, block in enumerate(blocks):
        for name, param in block.named_parameters():
            module = name.rsplit(".", 1)[0]
            assert param.requires_grad == (j in selection.get(module, [])), name


def test_spectrum_baseline_trains_the_blocks_holding_a_selected_module():
    model = tiny_model("llama", num_hidden_layers=4)
    choice = BASELINES.get("spectrum-50").decide(context(model))
    assert BASELINES.get("spectrum-50").trains and choice.variant is not None
    chosen = {j for blocks in choice.details["selected"].values() for j in blocks}
    assert choice.variant.spec.trainable_blocks == tuple(sorted(chosen)) and not choice.variant.spec.embeddings
    assert isinstance(choice.variant.callbacks()[0], ModuleSelection)


def test_freeze_deep_half_trains_the_shallow_blocks():
    choice = BASELINES.get("freeze-deep-half").decide(context(num_layers=30))
    assert choice.variant.spec.trainable_blocks == tuple(range(15)) and not choice.variant.spec.embeddings


def test_lora_plan_puts_adapters_on_the_default_plans_blocks():
    choice = BASELINES.get("lora-plan").decide(context(num_layers=4, default_boundary=lambda: 3))
    assert choice.variant.lora and choice.variant.spec.trainable_blocks == (3,)
    assert choice.variant.learning_rate == pytest.approx(1e-3)
    with pytest.raises(SalfError, match="no default plan"):
        BASELINES.get("lora-plan").decide(context(num_layers=4, default_boundary=lambda: None))
