"""``salf report``: one self-contained HTML page of a run, its plan and the runs it is compared with."""

from __future__ import annotations

from salf.config.commands import ReportOptions
from salf.report import ReportResult, report


def run(options: ReportOptions) -> ReportResult:
    return report(options.run_dir, options.compare, options.out)
