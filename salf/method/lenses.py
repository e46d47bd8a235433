"""Lenses: what reads each latent state and turns it into per-datum deviations, and ``TraceConfig``,
the settings they read. ``LENSES`` holds them by name; ``choose_lens`` picks one from the labels (token
the data's row of the defaults (``default_cell_key``, ``salf.config.plan.DEFAULT_LENS``) and the model.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from salf.config.data import Task
from salf.config.plan import CLASS_LABELS, CLOSED_COMPLETION, DEFAULT_LENS, TOKEN_LABELS
from salf.config.trace import TraceConfig
from salf.data.batch import IGNORE_INDEX
from salf.errors import SalfError
from salf.method.probe import check_probe_data, cross_fitted_probe_loss, one_blas_thread, stratified_folds
from salf.models.arch import ModelParts
from salf.models.pooling import head_pooling
from salf.registry import Registry

LENSES: Registry[type[Lens]] = Registry("lens")


_LABEL_WORDS = {
    TOKEN_LABELS: "token labels (lists aligned with input_ids)",
    CLASS_LABELS: "class labels (one int)",
}


# Upper bound on the elements of one [tokens, vocab chunk] logit block: keeps the lens's own memory
# small (64 MiB in float32) whatever the batch size and sequence length.
_MAX_LOGIT_ELEMENTS = 1 << 24


def frequency_entropy(counts: Sequence[int]) -> float | None:
    """Entropy (nats) of the frequencies ``counts`` give: the cross-entropy of always predicting them, i.e. the
    loss of knowing nothing about a datum (a trace's chance level, a classifier's untrained loss). None when
    nothing was counted."""
    p = np.asarray([c for c in counts if c > 0], dtype=np.float64)
    if p.size == 0:
        return None
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def _first_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def _last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # collate right-pads, so the last real token sits at length - 1.
    last = mask.sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _mean_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


POOLERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "first": _first_token,
    "last": _last_token,
    "mean": _mean_tokens,
}


def head_reads(parts: ModelParts) -> str:
    """The ``POOLERS`` entry matching what ``parts.model``'s classification head reads."""
    return head_pooling(parts.model) if parts.encoder else "last"


class Lens(abc.ABC):
    """Reads each latent state as it is produced and turns what it read into per-datum deviations.

    A lens is built once per trace from the model parts, the config and the sample; then, for every
    batch, ``begin_batch`` is called with the sample rows of the batch, and ``read`` once per latent
    space (l = 0..L) with that batch's hidden states [B, T, H]. ``result`` returns [N, L+1].
    """

    label_kind: str = TOKEN_LABELS
    """Which labels the lens reads: TOKEN_LABELS (lists aligned with input_ids) or CLASS_LABELS (ints)."""
    needs_head: bool = True
    """Whether the lens reads the model's vocabulary head (and so needs a causal LM with one)."""
    pooling: str = "targets"

    @staticmethod
    def applies(data: Sequence[dict]) -> bool:
        """Whether the lens can read these data at all (beyond their label kind)."""
        return True

    def __init__(self, parts: ModelParts, config: TraceConfig, sample: Sequence[dict]):
        self.parts = parts
        self.config = config
        self.n_data = len(sample)
        self.num_latents = parts.num_layers + 1

    @abc.abstractmethod
    def begin_batch(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> None: ...

    @abc.abstractmethod
    def read(self, layer: int, hidden: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def result(self) -> np.ndarray: ...

    def chance(self) -> float | None:
        """``Trace.chance`` for this lens and sample (None: the lens has no natural 'knows nothing' level)."""
        return None


class TargetLens(Lens):
    """A token lens: averages a per-token deviation over the target positions of each datum.

    Position t is a target when labels[t+1] is not -100 (the Hugging Face shift: position t predicts
    token t+1), so at l = L a lens that scores the model's own head reproduces the model's loss.
    """

    in_nats = False
    """Whether the deviation is a cross-entropy (then the target tokens' frequencies give a chance level)."""

    def __init__(self, parts: ModelParts, config: TraceConfig, sample: Sequence[dict]):
        super().__init__(parts, config, sample)
        head = parts.output_head()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise SalfError(
                f"{type(parts.model).__name__} has no vocabulary head with a weight matrix to read latent states with",
                "use lens 'probe' (class labels) or load the model with its language-model head",
            )
        self.weight = weight
        self.bias = getattr(head, "bias", None)
        self.norm = parts.norm if parts.norm is not None else nn.Identity()
        # Accumulated on the CPU in float64: one small transfer per layer and batch, exact sums.
        self.sums = torch.zeros(self.n_data, self.num_latents, dtype=torch.float64)
        self.counts = torch.zeros(self.n_data, dtype=torch.float64)
        self.target_counts: dict[int, int] = {}

    def begin_batch(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        targets = batch["labels"][:, 1:]
        b, t = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        self._b, self._t, self._y = b, t, targets[b, t]
        self._owner = rows[b.cpu()]
        self.counts.index_add_(0, self._owner, torch.ones(len(self._owner), dtype=torch.float64))
        for token, n in zip(*np.unique(self._y.cpu().numpy(), return_counts=True)):
            self.target_counts[int(token)] = self.target_counts.get(int(token), 0) + int(n)

    def read(self, layer: int, hidden: torch.Tensor) -> None:
        # A model split over devices hands each layer's states over on that layer's device; the head's
        # device is where they are read (`.to` is free when everything is on one device).
        rows, cols = self._b.to(hidden.device), self._t.to(hidden.device)
        x = self.norm(hidden[rows, cols].to(self.weight.device))
        deviation = self.token_deviation(x, self._y.to(self.weight.device))
        self.sums[:, layer].index_add_(0, self._owner, deviation.detach().to("cpu", torch.float64))

    @abc.abstractmethod
    def token_deviation(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[n] deviation of normed latent states x [n, H] from target tokens y [n]."""

    def result(self) -> np.ndarray:
        return (self.sums / self.counts.clamp(min=1).unsqueeze(1)).numpy()

    def chance(self) -> float | None:
        """Entropy (nats) of the target tokens' frequencies in the sample: the loss of predicting them without
        reading the text. In cross-entropy units, so only the logit lens has it (cosine has no such level)."""
        return frequency_entropy(list(self.target_counts.values())) if self.in_nats else None


@LENSES.register("logit-lens")
class LogitLens(TargetLens):
    """d_{i,l} = mean over targets of CE(W . N(h_{i,l,t}), y_{i,t}): the model's loss read at depth l."""

    in_nats = True

    def __init__(self, parts: ModelParts, config: TraceConfig, sample: Sequence[dict]):
        super().__init__(parts, config, sample)
        # Gemma 2 squashes its logits before the loss; without it the l = L deviation is not the loss.
        self.softcap = getattr(parts.model.config, "final_logit_softcapping", None)

    def token_deviation(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(x, self.weight, self.bias, y, self.config.vocab_chunk, self.softcap)


@LENSES.register("basis-cosine")
class BasisCosineLens(TargetLens):
    """d_{i,l} = mean over targets of 1 - cos(N(h_{i,l,t}), W[y_{i,t}]), in [0, 2]."""

    def token_deviation(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        basis = self.weight[y]
        return 1.0 - F.cosine_similarity(x.float(), basis.float(), dim=-1, eps=1e-8)


def chunked_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    vocab_chunk: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-row CE of logits ``x @ weight.T + bias`` against ``y`` without materialising all logits.

    The vocabulary is projected ``vocab_chunk`` rows at a time (and the rows of x in pieces), keeping a
    running logsumexp and picking each target's logit from the chunk that holds it.
    """
    rows = max(1, _MAX_LOGIT_ELEMENTS // vocab_chunk)
    pieces = [
        _chunked_ce_rows(x[s : s + rows], weight, bias, y[s : s + rows], vocab_chunk, softcap)
        for s in range(0, x.shape[0], rows)
    ]
    return torch.cat(pieces) if pieces else x.new_zeros(0, dtype=torch.float32)


def _chunked_ce_rows(x, weight, bias, y, vocab_chunk, softcap) -> torch.Tensor:
    n = x.shape[0]
    lse = torch.full((n,), -math.inf, dtype=torch.float32, device=x.device)
    target = torch.zeros(n, dtype=torch.float32, device=x.device)
    for start in range(0, weight.shape[0], vocab_chunk):
        stop = start + vocab_chunk
        logits = F.linear(x, weight[start:stop], None if bias is None else bias[start:stop]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        inside = (y >= start) & (y < stop)
        idx = inside.nonzero(as_tuple=True)[0]
        target[idx] = logits[idx, y[idx] - start]
    return lse - target


class _CrossFittedProbe(Lens):
    """A linear probe per layer on one vector per datum (which vector, and which class: the subclass's), fitted
    by L-BFGS-B on standardised features and cross-fitted over ``probe_folds`` stratified folds, so that every
    datum is scored by a probe that never saw it. d_{i,l} is datum i's held-out cross-entropy at layer l."""

    needs_head = False

    def __init__(self, parts: ModelParts, config: TraceConfig, sample: Sequence[dict], classes: Sequence[Any]):
        super().__init__(parts, config, sample)
        kinds, self.labels = np.unique(np.asarray(classes), return_inverse=True)
        self.num_classes = len(kinds)
        check_probe_data(self.labels, self.num_classes, config.probe_folds)
        self.features: np.ndarray | None = None  # [N, L+1, H], allocated at the first read

    def store(self, rows: torch.Tensor, layer: int, vectors: torch.Tensor) -> None:
        vectors = vectors.detach().to("cpu", torch.float32).numpy()
        if self.features is None:
            self.features = np.zeros((self.n_data, self.num_latents, vectors.shape[-1]), dtype=np.float32)
        self.features[rows.numpy(), layer] = vectors

    def chance(self) -> float:
        """Entropy (nats) of the sample's class frequencies: the cross-entropy of the best constant guess."""
        return frequency_entropy(np.bincount(self.labels).tolist())

    def result(self) -> np.ndarray:
        assert self.features is not None, "result() before any batch was read"
        folds = stratified_folds(self.labels, self.config.probe_folds, self.config.seed)
        out = np.empty((self.n_data, self.num_latents))
        layers = tqdm(
            range(self.num_latents), desc="probe", unit="layer", disable=not self.config.show_progress
        )
        with one_blas_thread():
            for layer in layers:
                x = self.features[:, layer].astype(np.float64)
                out[:, layer] = cross_fitted_probe_loss(
                    x, self.labels, self.num_classes, folds, self.config.probe_l2, self.config.probe_max_iter
                )
        return out


@LENSES.register("probe")
class ProbeLens(_CrossFittedProbe):
    """d_{i,l} = held-out CE of a linear probe on the pooled latent state of datum i at layer l, predicting its
    class: the pooled vector is the one a classification head reads (``TraceConfig.pooling``)."""

    label_kind = CLASS_LABELS

    def __init__(self, parts: ModelParts, config: TraceConfig, sample: Sequence[dict]):
        super().__init__(parts, config, sample, [int(d["labels"]) for d in sample])
        self.pooling = head_reads(parts) if config.pooling == "auto" else config.pooling
        self._pool = POOLERS[self.pooling]

    def begin_batch(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self._rows = rows
        self._mask = batch["attention_mask"]

    def read(self, layer: int, hidden: torch.Tensor) -> None:
        self.store(self._rows, layer, self._pool(hidden, self._mask.to(hidden.device)))


RARE_ANSWER = "\x00rare"
"""The answer probe's class of the answers seen fewer than ``probe_folds`` times in the sample."""


def answer_classes(sample: Sequence[dict], min_count: int) -> list[str]:
    """Each datum's answer (its target tokens, in order) as a class; answers seen fewer than ``min_count``
    times share ``RARE_ANSWER``, since a cross-fitted probe cannot learn an answer from fewer examples than it
    holds out."""
    keys = [" ".join(map(str, answer_tokens(d))) for d in sample]
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return [key if counts[key] >= min_count else RARE_ANSWER for key in keys]


def closed_answers(sample: Sequence[dict], min_count: int = 5, min_share: float = 0.5) -> bool:
    """Whether most data's answers come from a closed set (label words, a short list of one-word answers):
    at least ``min_share`` of them have an answer seen ``min_count`` times or more, and there are at least two
    such answers. Plain text (every position a target) never qualifies; data whose answer was cut off by the
    length limit (no target left) are not counted, as the trace leaves them out."""
    targets = [[t != IGNORE_INDEX for t in d["labels"][1:]] for d in sample]
    if any(all(row) for row in targets):
        return False
    classes = answer_classes([d for d, row in zip(sample, targets) if any(row)], min_count)
    repeated = [c for c in classes if c != RARE_ANSWER]
    return len(set(repeated)) >= 2 and len(repeated) >= min_share * len(classes)


def require_closed_answers(sample: Sequence[dict], config: TraceConfig, lens: str) -> None:
    """Refuse, naming the fix, data whose answers do not come from a closed set (``closed_answers``)."""
    if not closed_answers(sample, config.probe_folds):
        raise SalfError(
            f"{lens} needs completions whose answers repeat (label words, a closed set of short answers); most "
            "answers in this sample are unique, or the data are plain text",
            "use lens 'logit-lens' for open-ended completions and plain text",
        )


def answer_tokens(datum: dict) -> list[int]:
    """A completion's target tokens, in order (its answer)."""
    return [int(t) for t in datum["labels"][1:] if t != IGNORE_INDEX]


@LENSES.register("answer-probe")
class AnswerProbeLens(_CrossFittedProbe):
    """d_{i,l} = held-out CE of a linear probe on datum i's latent state at the answer position (the last
    prompt token, which predicts the first answer token) at layer l, predicting its whole answer.

    What the layers know, not what the head already says: the logit lens of a frozen LLM reads a task whose
    answer format it has not been shown as unsolved at every depth (SmolLM2 read label words at 11.8 nats at its
    top layer, above the chance level), although its states may already separate the answers. For
    completion data with a closed set of answers (``closed_answers``): label words, one-word instructions."""

    label_kind = TOKEN_LABELS
    applies = staticmethod(closed_answers)

    def __init__(self, parts: ModelParts, config: TraceConfig, sample: Sequence[dict]):
        require_closed_answers(sample, config, "the answer probe")
        super().__init__(parts, config, sample, answer_classes(sample, config.probe_folds))

    def begin_batch(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        targets = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        self._rows = rows
        self._answer_at = targets.int().argmax(dim=1)  # the first target of every row (each has one)

    def read(self, layer: int, hidden: torch.Tensor) -> None:
        at = self._answer_at.to(hidden.device)
        self.store(self._rows, layer, hidden[torch.arange(hidden.shape[0], device=hidden.device), at])


@LENSES.register("answer-lens")
class AnswerSetLens(LogitLens):
    """d_{i,l} = mean over datum i's answer tokens of the cross-entropy of the head's logits restricted to the
    answer set: at the j-th answer token, the tokens seen j-th in the sample's answers (the logit lens over the
    label words only).

    The full-vocabulary logit lens charges a frozen LLM for every word it would rather say than the task's
    answers (SmolLM2 read label words at 11.8 nats at its top layer); restricted to the answers, it asks only
    whether the head already ranks the right answer above the others. Its chance level is the entropy of the
    answers' tokens at each position. For completions with a closed set of answers (``closed_answers``)."""

    applies = staticmethod(closed_answers)

    def __init__(self, parts: ModelParts, config: TraceConfig, sample: Sequence[dict]):
        require_closed_answers(sample, config, "the answer lens")
        super().__init__(parts, config, sample)
        by_position: dict[int, list[int]] = {}
        for datum in sample:
            for j, token in enumerate(answer_tokens(datum)):
                by_position.setdefault(j, []).append(token)
        self.candidates = {j: torch.tensor(sorted(set(tokens))) for j, tokens in by_position.items()}
        self._position_counts = {j: np.unique(tokens, return_counts=True)[1] for j, tokens in by_position.items()}

    def begin_batch(self, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        super().begin_batch(rows, batch)
        first = (batch["labels"][:, 1:] != IGNORE_INDEX).int().argmax(dim=1)  # each row's first target
        self._position = self._t - first[self._b]

    def token_deviation(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(y), dtype=torch.float32, device=x.device)
        position = self._position.to(x.device)
        for j, candidates in self.candidates.items():
            at = (position == j).nonzero(as_tuple=True)[0]
            if len(at) == 0:
                continue
            c = candidates.to(self.weight.device)
            logits = F.linear(x[at], self.weight[c], None if self.bias is None else self.bias[c]).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            target = (y[at].unsqueeze(1) == c.unsqueeze(0)).int().argmax(dim=1)  # every answer token is a candidate
            out[at] = F.cross_entropy(logits, target, reduction="none")
        return out

    def chance(self) -> float | None:
        """The cross-entropy of knowing nothing: at each answer position the entropy of the tokens seen there,
        weighted by how many answer tokens sit at that position."""
        total = sum(int(c.sum()) for c in self._position_counts.values())
        return sum(int(c.sum()) * frequency_entropy(c.tolist()) for c in self._position_counts.values()) / total


def label_kind(data: Sequence[dict]) -> str:
    """CLASS_LABELS when every datum's label is one int, TOKEN_LABELS when every one is a list."""
    if not data:
        raise SalfError("no data to trace", "give at least one tokenized datum")
    try:
        kinds = {CLASS_LABELS if _is_class_label(d["labels"]) else TOKEN_LABELS for d in data}
    except (KeyError, TypeError):
        raise SalfError(
            "a datum lacks 'input_ids' or 'labels'", "tokenize the data with salf.data.encode.load_task_data (see salf/data/batch.py)"
        ) from None
    if len(kinds) > 1:
        raise SalfError(
            "the data mix class labels (ints) and token labels (lists)", "trace one task's data at a time"
        )
    return kinds.pop()


def _is_class_label(labels: Any) -> bool:
    return isinstance(labels, (int, np.integer)) and not isinstance(labels, bool)


def label_kind_of(task: str) -> str:
    """The labels a task's data carry (``task``: a task or a row of the defaults): class labels for
    classification, token labels otherwise."""
    return CLASS_LABELS if task == Task.CLASSIFICATION else TOKEN_LABELS


def data_task(data: Sequence[dict]) -> Task:
    """The task of tokenized data, from its labels: class labels are classification; token labels equal to the
    input ids at every position are plain text (every token a target); other token labels are a completion."""
    if label_kind(data) == CLASS_LABELS:
        return Task.CLASSIFICATION
    if all(list(d["labels"]) == list(d["input_ids"]) for d in data):
        return Task.LM
    return Task.COMPLETION


def default_cell_key(data: Sequence[dict]) -> str:
    """The row of ``salf.config.plan.DEFAULT_CELLS`` for tokenized data: its task (``data_task``), and for a
    completion whether its answers come from a closed set (``closed_answers``: label words, one-word
    instructions), which the real LLM benchmarked here plans differently from open answers."""
    task = data_task(data)
    return CLOSED_COMPLETION if task == Task.COMPLETION and closed_answers(data) else task


def choose_lens(parts: ModelParts, cell: str, requested: str | None) -> str:
    """The lens to trace with: the requested one if it fits the data's labels and the model, else the default of
    the data's row of the defaults (``cell``: ``default_cell_key``; ``DEFAULT_LENS``)."""
    kind = label_kind_of(cell)
    if requested is None:
        requested = DEFAULT_LENS[cell]
        fix = "give token labels with a causal LM that has its language-model head, or class labels"
    else:
        fix = "use lens 'probe' with class labels" if kind == CLASS_LABELS else "use lens 'logit-lens'"
    lens = LENSES.get(requested)
    if lens.label_kind != kind:
        raise SalfError(
            f"lens {requested!r} reads {_LABEL_WORDS[lens.label_kind]}, but the data have {_LABEL_WORDS[kind]}",
            fix,
        )
    if lens.needs_head and (parts.encoder or parts.output_head() is None):
        raise SalfError(
            f"lens {requested!r} reads next-token predictions, but {type(parts.model).__name__} has no "
            "causal language-model head",
            "use lens 'probe' with class labels (a classification task)",
        )
    return requested


__all__ = ["AnswerProbeLens", "AnswerSetLens", "BasisCosineLens", "CLASS_LABELS", "RARE_ANSWER", "DEFAULT_LENS", "LENSES", "Lens", "LogitLens", "POOLERS", "ProbeLens", "TOKEN_LABELS", "TargetLens", "TraceConfig", "answer_classes", "answer_tokens", "choose_lens", "chunked_cross_entropy", "closed_answers", "data_task", "default_cell_key", "head_reads", "label_kind", "label_kind_of", "require_closed_answers"]
