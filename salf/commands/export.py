"""``salf export``: the settings that apply a plan in another tool (LLaMA-Factory, axolotl, PEFT, ...)."""

from __future__ import annotations

from salf.config.commands import ExportOptions
from salf.export import export


def run(options: ExportOptions) -> str:
    return export(options.plan, options.to, options.out, options.model)
