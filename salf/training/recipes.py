"""Default training recipes per kind of run, each with the evidence behind it.

``salf train`` without learning-rate flags takes the recipe of its kind of run: a fresh classification
head on a pretrained encoder or decoder, a language model trained on text or completions, or LoRA
adapters. A flag the user gives always wins. ``measured`` says whether the figures come from this
project's measurements (BENCHMARKS.md) or are conventional starting points still to be measured.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Batch, rates and schedule of one kind of run."""

    batch_size: int
    learning_rate: float
    """Peak rate of the pretrained weights (of the adapters, for LoRA)."""
    head_learning_rate: float | None
    """Peak rate of the head; None: the same as ``learning_rate``."""
    warmup_ratio: float
    """Share of the steps spent warming the rate up (linear decay after it)."""
    epochs: float
    """Passes over the training data when neither ``--max-steps`` nor ``--epochs`` is given."""
    measured: bool
    """True when the recipe was chosen from measurements here; False for a conventional starting point."""
    evidence: str
    """Where the figures come from."""


RECIPES: dict[str, Recipe] = {
    "classifier": Recipe(
        batch_size=16, learning_rate=1e-4, head_learning_rate=2e-3, warmup_ratio=0.1, epochs=3.0, measured=True,
        evidence=(
            "real MiniLM-L6 on a real 22-class task, 300 steps: lr 5e-5, batch 8, no warm-up (salf's first "
            "defaults) reached 0.476-0.486 accuracy; batch 16, lr 1e-4, head lr 2e-3 reached 0.653. On e5-small "
            "(fresh pooler) the same rates without warm-up gave 0.664 and 0.513 on two seeds; with 10% warm-up "
            "the e5 suite's full fine-tuning is stable across seeds (BENCHMARKS.md, 'Where to fine-tune'). Three "
            "epochs, not one: on the benchmark's 3,200-row tasks 150 steps (0.75 epochs) left full fine-tuning "
            "0.8 to 36 points below 450 steps, and on word order at chance on some seeds; at 3 epochs MiniLM's "
            "word order is 82.0 +- 0.9 over three seeds (60.7 +- 8.6 at 150 steps) and e5's failed seed reaches "
            "83.6 (BENCHMARKS.md, 'The training recipe')"
        ),
    ),
    "lm": Recipe(
        batch_size=8, learning_rate=5e-5, head_learning_rate=None, warmup_ratio=0.05, epochs=1.0, measured=False,
        evidence=("a conventional full fine-tuning rate for pretrained causal LMs; no pretrained causal LM "
                  "installs here, so it is not yet measured (the causal benchmark's fixture is pretrained "
                  "here and uses its own rate)"),
    ),
    "lora": Recipe(
        batch_size=8, learning_rate=5e-4, head_learning_rate=None, warmup_ratio=0.05, epochs=1.0, measured=False,
        evidence=("adapters start at zero and want about ten times the full fine-tuning rate (the benchmark's "
                  "LoRA baseline uses 10x the suite's rate); not yet searched per task"),
    ),
}
"""The default recipe of each kind of run (``recipe_kind``)."""


def recipe_kind(task: str, lora: bool) -> str:
    """'lora' for adapters, 'classifier' for a classification head, else 'lm' (text or completions)."""
    if lora:
        return "lora"
    return "classifier" if task == "classification" else "lm"


def default_recipe(task: str, lora: bool) -> Recipe:
    """The recipe ``salf train`` uses for flags the user left out."""
    return RECIPES[recipe_kind(task, lora)]


__all__ = ["RECIPES", "Recipe", "default_recipe", "recipe_kind"]
