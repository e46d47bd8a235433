"""Progress of a benchmark: a tqdm bar over the weighted work, one ``progress.log`` line per unit,
timestamps and durations as text."""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")




class Progress:
    """A tqdm bar over the work (weighted: a training step is 1) and one ``progress.log`` line per unit."""

    def __init__(self, path: Path, total: float, show: bool):
        from tqdm.auto import tqdm

        self.path = path
        self.total = total
        self.done = 0.0
        self.worked = 0.0
        self.seconds = 0.0
        self.bar = tqdm(total=round(total), desc="bench", unit="step", disable=not show)

    def grow(self, weight: float) -> None:
        self.total += weight
        self.bar.total = round(self.total)
        self.bar.refresh()

    def finish(self, key: str, weight: float, seconds: float | None, status: str) -> None:
        self.done += weight
        if seconds is not None:
            self.worked += weight
            self.seconds += seconds
        self.bar.update(round(self.done) - self.bar.n)
        rate = self.seconds / self.worked if self.worked else float("nan")
        eta = (self.total - self.done) * rate
        line = (f"{now()} [{self.done:.0f}/{self.total:.0f}] {status} {key}"
                + (f" in {seconds:.1f}s" if seconds is not None else "")
                + (f"; ETA {duration(eta)}" if math.isfinite(eta) else ""))
        self.bar.set_postfix_str(key[-40:])
        with open(self.path, "a") as log:
            log.write(line + "\n")

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


__all__ = ["Progress", "duration", "now"]
