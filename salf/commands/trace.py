"""``salf trace``: one no-grad pass, the deviation of every latent space from the targets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from salf.api import data_info, model_info, trace_for
from salf.commands.loading import load
from salf.config.commands import TraceOptions
from salf.config.plan import PlanConfig
from salf.fileio import write_json
from salf.method.trace import Trace
from salf.table import render_table


@dataclass
class TraceResult:
    trace: Trace
    out: Path | None

    def render(self) -> str:
        rows = [[i, float(m), float(s)] for i, (m, s) in enumerate(zip(self.trace.mean, self.trace.std))]
        title = (f"trace: lens {self.trace.lens}, {self.trace.n_data} data, {self.trace.seconds:.1f}s"
                 + (f" -> {self.out}" if self.out else ""))
        return render_table(["latent space", "deviation", "std"], rows, title)

    def to_json(self) -> dict[str, Any]:
        return self.trace.to_dict()


def run(options: TraceOptions) -> TraceResult:
    loaded = load(options.inputs.source, options.inputs.data)
    config = PlanConfig(trace=replace(options.trace, show_progress=options.output.progress), seed=options.inputs.data.seed)
    result = trace_for(loaded.model, loaded.data, config)
    write_json(options.out, {**result.to_dict(), "model": model_info(loaded.model), "data": data_info(loaded.data)})
    return TraceResult(result, Path(options.out))
