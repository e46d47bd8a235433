"""``salf bench-table``: regret by model over one or more ``salf bench`` output directories."""

from __future__ import annotations

from salf.bench.report import RegretTable, bench_table
from salf.config.commands import BenchTableOptions


def run(options: BenchTableOptions) -> RegretTable:
    return bench_table(options.dirs, options.out, options.data_kind)
