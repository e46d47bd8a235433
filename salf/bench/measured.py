"""What the benchmark measures beyond the Trainer's metrics: peak memory of a run (``PeakRSS``), exact
match of greedy generations (completion tasks) and the FLOPs of a per-datum run (``per_datum_flops``).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from salf.bench.records import Record, TrainedRun, oracle_variant
from salf.errors import SalfError

PER_DATUM_FLOPS_METHOD = (
    "sum over boundaries k of (FLOPs per padded token at k x padded tokens this run trained at k); FLOPs per "
    "padded token at k = the oracle run at k of the same seed (FlopCounterMode over its first step: same "
    "model, recipe and instrument as every oracle cost), or, where that run has none, the cost model's "
    "predicted step-FLOPs ratio of k times the measured k=0 value; padded tokens per boundary counted by the "
    "boundary switcher on every training forward"
)


class PeakRSS:
    """Samples this process's resident memory in a thread while a run lasts.

    The process's own peak (``ru_maxrss``) never comes down between runs, so it cannot tell runs apart;
    this reports the peak during the run and its growth over the start. Freed memory the allocator
    keeps makes later runs' growth an underestimate; the cost model's memory is the exact comparison.
    """

    def __init__(self, interval: float = 0.02):
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Any, data: Sequence[dict], batch_size: int = 32) -> dict[str, Any]:
    """Share of completion data whose greedy generation equals the completion (stripped strings).

    The prompt is every token before the first target; generation runs (batched, left-padded) for as
    many tokens as the completion has and stops at EOS; both token lists are cut at the first EOS and
    decoded with special tokens kept (so an unknown-token target is matched only by an unknown token,
    never by an empty string), then compared stripped.
    """
    from salf.data.batch import IGNORE_INDEX

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    items = []
    for d in data:
        targets = [t for t, label in enumerate(d["labels"]) if t > 0 and label != IGNORE_INDEX]
        if targets:
            start = targets[0]
            items.append((d["input_ids"][:start], d["input_ids"][start:]))
    if not items:
        raise SalfError("no evaluation datum has a completion to generate", "check the completion data")
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    correct = 0
    examples = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(items[i][0]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            prompt = items[i][0]
            ids[r, width - len(prompt):] = torch.as_tensor(prompt)
            mask[r, width - len(prompt):] = 1
        new = max(len(items[i][1]) for i in rows)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                             min_new_tokens=0, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos)
        for r, i in enumerate(rows):
            got = tokenizer.decode(_until(out[r, width : width + len(items[i][1])].tolist(), eos)).strip()
            want = tokenizer.decode(_until(items[i][1], eos)).strip()
            correct += got == want
            if len(examples) < 5:
                examples.append({"want": want, "got": got})
    return {"exact_match": correct / len(items), "exact_match_n": len(items), "exact_match_examples": examples}


def _until(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


def boundary_histogram(boundaries: Iterable[int]) -> dict[str, int]:
    counts: dict[int, int] = defaultdict(int)
    for k in boundaries:
        counts[int(k)] += 1
    return {str(k): counts[k] for k in sorted(counts)}


def per_datum_flops(metrics: dict[str, Any], oracle: Mapping[int, Record], predicted_ratio: Sequence[float]) -> dict:
    """The measured training FLOPs of a per-datum run (``PER_DATUM_FLOPS_METHOD``), to update its metrics.

    ``salf.training.trainer`` counts FLOPs over the first step only, which trained from one boundary; here each
    boundary's padded tokens are weighed by that boundary's measured FLOPs per padded token. The
    first-step figures stay under ``*_first_step``; ``first_step_check`` compares the run's own count
    with the oracle's at the boundary of its first step (same instrument; batch widths differ).
    """

    def measured(k: int) -> float | None:
        record = oracle.get(k)
        if not isinstance(record, TrainedRun) or not record.done:
            return None
        return (record.metrics or {}).get("flops_per_padded_token")

    per_datum = metrics.get("per_datum") or {}
    tokens = {int(k): int(v) for k, v in (per_datum.get("padded_tokens_per_boundary") or {}).items()}
    out: dict[str, Any] = {
        "train_flops_first_step": metrics.get("train_flops"),
        "train_flops_first_step_method": metrics.get("train_flops_method"),
        "flops_per_padded_token_first_step": metrics.get("flops_per_padded_token"),
        "train_flops_method": PER_DATUM_FLOPS_METHOD,
    }
    first = per_datum.get("first_boundary")
    if first is not None:
        out["first_step_check"] = {"boundary": first, "this_run": metrics.get("flops_per_padded_token"),
                                   "oracle": measured(int(first))}
    by_boundary, total = {}, 0.0
    full = measured(0)
    for k, count in sorted(tokens.items()):
        per_token, source = measured(k), oracle_variant(k)
        if per_token is None and full:
            per_token, source = float(predicted_ratio[k]) * full, f"predicted ratio x {oracle_variant(0)}"
        if per_token is None:
            return {**out, "train_flops": None, "flops_per_padded_token": None, "flops_by_boundary": None}
        by_boundary[str(k)] = {"flops_per_padded_token": per_token, "padded_tokens": count,
                               "flops": per_token * count, "source": source}
        total += per_token * count
    trained = sum(tokens.values())
    return {**out, "train_flops": total if trained else None, "flops_by_boundary": by_boundary,
            "flops_per_padded_token": total / trained if trained else None,
            "padded_tokens_agree": trained == metrics.get("padded_tokens")}


__all__ = ["boundary_histogram", "PER_DATUM_FLOPS_METHOD", "PeakRSS", "exact_match", "per_datum_flops"]
