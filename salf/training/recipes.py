"""Default training recipes per kind of run, each with the evidence behind it.

``salf train`` without learning-rate flags takes the recipe of its kind of run: a fresh classification
head on a pretrained encoder or decoder, a language model trained on text or completions, or LoRA
adapters. A flag the user gives always wins. ``measured`` says whether the figures come from this
project's measurements (BENCHMARKS.md) or are conventional starting points still to be measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from salf.config.train import AUTO, TrainConfig


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
    reference_width: int | None = None
    """Hidden size of the model ``learning_rate`` was measured on; None: the rate holds for every width.
    Another width trains the body at ``learning_rate * reference_width / width`` (``learning_rate_for``)."""

    def learning_rate_for(self, width: int | None) -> float:
        """The body's peak rate for a model of hidden size ``width`` (None: unknown, the measured rate).

        Adam's best rate for hidden weights falls about as 1/width (the muP analysis, Yang et al. 2021),
        and published full fine-tuning recipes follow it: from this project's measurements the rule gives
        5e-5 for a 768-wide BERT-base and 1.9e-5 for a 4,096-wide 8B model, where those recipes sit. The
        scaling is that prior, not measured here: every model measured here is 256 or 384 wide.
        """
        if self.reference_width is None or not width:
            return self.learning_rate
        return self.learning_rate * self.reference_width / width


def _fixture_grid(run: str, rates: str, description: str, name: str, old_rate: str, old_scores: str) -> str:
    """Evidence from a learning-rate grid on the causal benchmark's fixture (BENCHMARKS.md, 'The training recipe')."""
    return (f"{run} of the causal benchmark's fixture (a 6-block, 256-wide GPT-2 pretrained here) on both "
            f"label-word tasks, 150 steps, seed 0: rates {rates} reached {description}% (description -> section) "
            f"and {name}% (name -> section); the {old_rate} this recipe had reached {old_scores}. Other widths "
            f"scale the rate by 256 / width (``learning_rate_for``)")


RECIPES: dict[str, Recipe] = {
    "classifier": Recipe(
        batch_size=16, learning_rate=1e-4, head_learning_rate=2e-3, warmup_ratio=0.1, epochs=3.0, measured=True,
        reference_width=384,  # MiniLM-L6 and e5-small; a 768-wide BERT-base gets 5e-5
        evidence=(
            "real MiniLM-L6 on a real 22-class task, 300 steps: lr 5e-5, batch 8, no warm-up (salf's first "
            "defaults) reached 0.476-0.486 accuracy; batch 16, lr 1e-4, head lr 2e-3 reached 0.653. On e5-small "
            "(fresh pooler) the same rates without warm-up gave 0.664 and 0.513 on two seeds; with 10% warm-up "
            "the e5 suite's full fine-tuning is stable across seeds (BENCHMARKS.md, 'Where to fine-tune'). Three "
            "epochs, not one: on the benchmark's 3,200-row tasks 150 steps (0.75 epochs) left full fine-tuning "
            "0.8 to 36 points below 450 steps, and on word order at chance on some seeds; at 3 epochs MiniLM's "
            "word order is 82.0 +- 0.9 over three seeds (60.7 +- 8.6 at 150 steps) and e5's failed seed reaches "
            "83.6; at 3 epochs all eight MiniLM and e5 tasks vary by at most 1.0 point (std) over three seeds "
            "(BENCHMARKS.md, 'The training recipe')"
        ),
    ),
    "lm": Recipe(
        batch_size=8, learning_rate=3e-4, head_learning_rate=None, warmup_ratio=0.05, epochs=1.0, measured=True,
        reference_width=256,
        evidence=_fixture_grid("full fine-tuning", "3e-5 / 1e-4 / 3e-4 / 1e-3", "18.0 / 52.3 / 66.0 / 64.3",
                               "25.8 / 82.8 / 87.5 / 87.5", "5e-5", "23.5 and 59.8")
        + "; a 4,096-wide 8B model gets 1.9e-5",
    ),
    "lora": Recipe(
        batch_size=8, learning_rate=3e-3, head_learning_rate=None, warmup_ratio=0.05, epochs=1.0, measured=True,
        reference_width=256,
        evidence=_fixture_grid("LoRA (rank 8, every block)", "1e-4 / 3e-4 / 1e-3 / 3e-3 / 1e-2",
                               "0.0 / 1.3 / 2.5 / 17.8 / 11.8", "0.0 / 1.5 / 7.5 / 61.0 / 15.5", "5e-4", "2.5 and 3.5")
        + "; adapters start at zero and want about ten times the full rate, and a 4,096-wide 7-8B model "
          "gets 1.9e-4, next to QLoRA's published 2e-4 for 7B and 13B",
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


RECIPE_FIELDS = ("learning_rate", "head_learning_rate", "batch_size", "warmup_ratio", "epochs")
"""The ``TrainConfig`` fields whose None means "the recipe's"."""


def resolve_recipe(config: TrainConfig, task: str, width: int | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """``config`` with the recipe of the run's kind in every recipe field it leaves None, and what was decided.

    ``width``: the model's hidden size, which scales the recipe's body rate (``Recipe.learning_rate_for``).
    ``learning_rate='auto'`` starts from the recipe's rate (the search then tunes it). A head rate left out
    is the recipe's (2e-3 for a fresh classification head); where the recipe has none it stays None, so the
    head follows the body's rate (the loop's rule), also while the search scales the body's.
    """
    recipe = default_recipe(task, config.lora)
    scaled = recipe.learning_rate_for(width)
    body = scaled if config.learning_rate in (None, AUTO) else float(config.learning_rate)
    head = config.head_learning_rate if config.head_learning_rate is not None else recipe.head_learning_rate
    resolved = replace(config, learning_rate=body, head_learning_rate=head,
                       batch_size=config.batch_size or recipe.batch_size,
                       warmup_ratio=recipe.warmup_ratio if config.warmup_ratio is None else config.warmup_ratio,
                       epochs=recipe.epochs if config.epochs is None else config.epochs)
    given = {name: getattr(config, name) for name in RECIPE_FIELDS if getattr(config, name) is not None}
    return resolved, {"kind": recipe_kind(task, config.lora), "recipe": asdict(recipe), "model_width": width,
                      "learning_rate_for_width": scaled, "flags_given": given}


__all__ = ["RECIPES", "RECIPE_FIELDS", "Recipe", "default_recipe", "recipe_kind", "resolve_recipe"]
