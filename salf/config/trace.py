"""How to trace a model (``TraceConfig``): which lens, how much data, and the probe's settings."""

from __future__ import annotations

from dataclasses import dataclass

from salf.config.fields import option
from salf.errors import SalfError

PROBE_POOLINGS = ("first", "last", "mean")
"""The pooled vectors a probe can read (= ``salf.method.lenses.POOLERS``, tested)."""


@dataclass
class TraceConfig:
    """How to trace a model: which lens, how much data, and the probe's settings."""

    lens: str | None = option(None, help="logit-lens | basis-cosine | probe | answer-probe | answer-lens (salf.method.lenses.LENSES; "
                                         "default: chosen from the model and the task)")
    sample_size: int = option(256, help="at most this many data are traced (one no-grad forward pass); a larger "
                                        "dataset is sampled without replacement by the seed")
    batch_size: int = option(8, flag="--trace-batch-size", help="data per forward pass of the trace")
    pooling: str = option("auto", flag="--probe-pooling", old=("--pooling",), choices=("auto", *PROBE_POOLINGS),
                          help="the pooled vector the probe lens reads: first token, last non-pad token, mean of "
                               "the non-pad tokens, or auto (what the model's classification head reads: the last "
                               "token of a causal LM, the first of an encoder, the mean for a mean-pooling head)")
    seed: int = option(0, cli=False, help="seed of the data sample and of the probe's cross-fitting folds (salf's "
                                          "commands set it from --seed)")
    vocab_chunk: int = option(8192, cli=False, help="vocabulary rows projected at a time by the token lenses "
                                                    "(streaming logsumexp over chunks)")
    probe_folds: int = option(5, cli=False, help="cross-fitting folds of the probe: each datum's deviation comes "
                                                 "from a probe fitted without it")
    probe_l2: float = option(0.1, cli=False,
                             help="weight of the squared L2 norm of the probe weights, added to the mean training "
                                  "cross-entropy (features are standardised per layer, so one value suits every "
                                  "layer; weaker values let a probe memorise a small sample and score held-out "
                                  "data worse than chance, which shows up as noise in the trace)")
    probe_max_iter: int = option(100, cli=False, help="L-BFGS-B iterations per probe fit")
    show_progress: bool = option(True, cli=False, help="show progress bars (with ETA) for the forward pass and the "
                                                       "probe fits (salf's commands: unless --no-progress)")

    def __post_init__(self) -> None:
        flags = {"sample_size": "--sample-size", "batch_size": "--trace-batch-size"}  # the others: Python only
        for name in ("sample_size", "batch_size", "vocab_chunk", "probe_max_iter"):
            if getattr(self, name) < 1:
                raise SalfError(
                    f"trace {name} must be at least 1, got {getattr(self, name)}",
                    f"set {flags.get(name, name)} to 1 or more",
                )
        if self.pooling != "auto" and self.pooling not in PROBE_POOLINGS:
            raise SalfError(
                f"unknown pooling {self.pooling!r}", f"choose one of: auto, {', '.join(PROBE_POOLINGS)}"
            )
        if self.probe_folds < 2:
            raise SalfError(f"probe_folds must be at least 2, got {self.probe_folds}", "set probe_folds >= 2")
        if not self.probe_l2 >= 0:
            raise SalfError(
                f"probe_l2 must be >= 0, got {self.probe_l2}", "set probe_l2 to 0 or a small positive value"
            )
