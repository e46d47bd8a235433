"""salf: semantic-aware layer freezing. Decide where to fine-tune, freeze the rest, measure the saving.

The names most scripts need are available here (``from salf import Plan, SalfCallback, apply_plan``);
each is imported from its module on first use, so ``import salf`` (and the CLI's ``--help``) stays
cheap. The modules themselves: ``salf.method`` (trace, gain, cost, plan, freeze), ``salf.training``,
``salf.bench``, ``salf.data``, ``salf.models``; docs/DESIGN.md describes the layout.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

PUBLIC = {
    "SalfError": "salf.errors",
    "Plan": "salf.method.plan",
    "make_plan": "salf.method.plan",
    "PolicyChoice": "salf.method.plan",
    "FreezeSpec": "salf.method.freeze",
    "apply_plan": "salf.method.freeze",
    "TraceConfig": "salf.method.lenses",
    "trace_model": "salf.method.trace",
    "SalfCallback": "salf.training.callback",
    "TrainConfig": "salf.training.config",
    "train": "salf.training.run",
}
"""Public name -> the module that defines it."""


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        return getattr(importlib.import_module(PUBLIC[name]), name)
    raise AttributeError(f"module 'salf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *PUBLIC])


__all__ = ["__version__", *PUBLIC]
