"""How to make a plan (``PlanConfig``): the trace, the gain estimator, the policy and the cost model's shape."""

from __future__ import annotations

from dataclasses import dataclass

from salf.config.data import Task
from salf.config.fields import group, option
from salf.config.trace import TraceConfig
from salf.errors import SalfError

OUTPUT_HEAD_MODES = ("tied", "untie")
"""What to do with an output head tied to the input embeddings (= ``salf.models.heads.HEAD_MODES``, tested)."""
TOKEN_LABELS = "tokens"
"""Label kind of completion data: token labels aligned with input_ids (a causal LM's next tokens)."""
CLASS_LABELS = "classes"
"""Label kind of classification data: one class index per datum."""


@dataclass(frozen=True)
class DefaultCell:
    """The lens, gain estimator and policy a plan uses unless told, for one kind of task."""

    lens: str
    """How the trace reads each latent space (``salf.method.lenses.LENSES``)."""
    estimator: str
    """How the trace becomes one gain per block (``salf.method.gain.ESTIMATORS``)."""
    policy: str
    """How the gains and costs become a boundary (``salf.method.plan.POLICIES``)."""


CLOSED_COMPLETION = "completion-closed"
"""The ``DEFAULT_CELLS`` row of completion data whose answers come from a closed set (label words, one-word
instructions; ``salf.method.lenses.default_cell_key``); other completions use the ``Task.COMPLETION`` row."""
DEFAULT_CELLS: dict[str, DefaultCell] = {
    Task.CLASSIFICATION: DefaultCell("probe", "sufficiency-uniform", "unsolved=0.75"),
    CLOSED_COMPLETION: DefaultCell("basis-cosine", "observed", "coverage=0.9"),
    Task.COMPLETION: DefaultCell("logit-lens", "sufficiency-uniform", "unsolved"),
    Task.LM: DefaultCell("logit-lens", "sufficiency-uniform", "unsolved"),
}
"""The one table of defaults, keyed by the data's task (completions split by whether their answers repeat), each
row chosen by a benchmark's regret table (BENCHMARKS.md). Classification by 24 encoder task-seeds ("Where to
fine-tune": classifiers aim at 0.75 of the share their probe leaves unsolved, because the probe reads the pooled
state, which hides what the blocks hold but the pooling loses, and 0.75 had the lowest trade-off regret of every
plan and fixed rule there). Completions and plain text by the real decoder SmolLM2-135M (4 tasks) and the causal
fixture ("SmolLM2"). On closed answers (label words, one-word instructions) ``basis-cosine`` + ``observed`` +
``coverage=0.9`` trained SmolLM2's top 18-19 of 30 blocks, 98-101% of full fine-tuning's quality at 0.72-0.75x its
FLOPs, and every block of the weak causal fixture, whose frozen blocks cost quality: over those 10 task-seeds the
lowest trade-off regret of every cell at λ = 10 (0.35 points against full fine-tuning's 1.13), 0.08 above full
fine-tuning's at λ = 2 (0.42 against 0.33; ``salf bench-table ... --data-kind completion-closed``). On open answers and plain text the same boundary lost 28% of the exact
match and 0.33 nats, so they keep the logit lens, which reads a frozen LLM as solving none of a task whose
answers it does not produce yet and plans full fine-tuning or close to it. ``DEFAULT_LENS``,
``DEFAULT_ESTIMATOR`` and ``DEFAULT_POLICY`` are its columns."""
DEFAULT_LENS = {task: cell.lens for task, cell in DEFAULT_CELLS.items()}
DEFAULT_ESTIMATOR = {task: cell.estimator for task, cell in DEFAULT_CELLS.items()}
DEFAULT_POLICY = {task: cell.policy for task, cell in DEFAULT_CELLS.items()}
DEFAULT_CELL_WORDS = {Task.CLASSIFICATION: "classification data", CLOSED_COMPLETION: "completions with a closed set of answers",
                      Task.COMPLETION: "other completions", Task.LM: "plain text"}
"""Each row of ``DEFAULT_CELLS`` in words (the options' help, ``salf plan``'s summary)."""


def _by_data(column: dict[str, str]) -> str:
    return ", ".join(f"{value} for {DEFAULT_CELL_WORDS[key]}" for key, value in column.items())


LORA_RANK = 8
"""The LoRA rank salf trains and costs by default (one value for ``salf plan``, ``salf train`` and ``salf cost``)."""


@dataclass
class PlanConfig:
    """How to make a plan: the trace, the gain estimator, the policy, and the shape the cost model counts."""

    trace: TraceConfig = group(TraceConfig, "trace")
    policy: str | None = option(None, help=f"default: {_by_data(DEFAULT_POLICY)} (salf.config.plan.DEFAULT_CELLS); "
                                           "or: unsolved=S (train S x the share of the depth the frozen model leaves "
                                           "unsolved) | knee | budget=C (step cost <= C x full) | coverage=T (>= T of "
                                           "the gain) | full | freeze-first-half | train-last-quarter | random")
    estimator: str | None = option(None, help=f"the gain estimator (salf.method.gain.ESTIMATORS; default: "
                                              f"{_by_data(DEFAULT_ESTIMATOR)}): sufficiency-uniform | sufficiency | "
                                              "headroom | transition | observed | best-layer")
    cost_seq: int | None = option(None, help="sequence length the cost model counts (default: the data's mean length)")
    cost_batch: int = option(8, help="batch size the cost model counts")
    lora: bool = option(False, help="cost the plan for LoRA adapters instead of full fine-tuning of the trained blocks")
    lora_rank: int = option(LORA_RANK, help="LoRA rank the cost model counts")
    per_datum: bool = option(False, help="also give each traced datum its own boundary from its own trace "
                                         "(train with --per-datum)")
    output_head: str | None = option(None, flag="--output-head", old=("--head",), choices=OUTPUT_HEAD_MODES,
                                     help="for a causal LM whose output head (the vocabulary projection) is tied to its "
                                          "input embeddings: untie it (default: a trainable copy; the embeddings "
                                          "stay frozen) or keep it tied (frozen with the embeddings when k > 0)")
    seed: int = option(0, cli=False, help="seed of the random policy and of the trace (salf's commands: --seed)")

    def __post_init__(self) -> None:
        if self.cost_seq is not None and self.cost_seq < 1:
            raise SalfError(f"cost_seq must be at least 1 token, got {self.cost_seq}", "raise --cost-seq, or leave it out")
        if self.cost_batch < 1:
            raise SalfError(f"cost_batch must be at least 1, got {self.cost_batch}", "raise --cost-batch")
        if self.lora_rank < 1:
            raise SalfError(f"lora_rank must be at least 1, got {self.lora_rank}", "raise --lora-rank")
        if self.output_head is not None and self.output_head not in OUTPUT_HEAD_MODES:
            raise SalfError(f"unknown output head mode {self.output_head!r}",
                            f"choose one of: {', '.join(OUTPUT_HEAD_MODES)}")
