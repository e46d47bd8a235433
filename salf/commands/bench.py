"""``salf bench``: the oracle sweep over every boundary, salf's plans and the baselines; regret and savings."""

from __future__ import annotations

import dataclasses

from salf.bench.runner import BenchResult, report_bench, run_bench
from salf.bench.suite import BenchSuite, parse_seeds
from salf.config.commands import BenchOptions


def run(options: BenchOptions) -> BenchResult:
    """Run (or resume) a suite into ``--out``; the reports always cover the whole suite: every finished seed
    in ``out/runs.json`` (``--tasks`` runs only some tasks, so processes running different tasks may share
    ``--out``)."""
    suite = BenchSuite.load(options.suite)
    if options.seeds:
        suite = suite.with_seeds(parse_seeds(options.seeds))
    report_suite = suite
    if options.tasks:
        suite = suite.only_tasks([n.strip() for n in options.tasks.split(",") if n.strip()])
    if options.threads is not None:
        suite = dataclasses.replace(suite, threads=options.threads)
    out = options.out or f"bench_out/{suite.name}"
    if options.report_only:
        return report_bench(report_suite, out)
    return run_bench(suite, out, resume=options.resume, show_progress=options.output.progress,
                     report_suite=report_suite, replan=options.replan)
