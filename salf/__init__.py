"""salf: semantic-aware layer freezing. Decide where to fine-tune, freeze the rest, measure the saving.

The Python API is here: ``salf.plan(model, data, PlanConfig(...))``, ``salf.apply_plan(model, plan)``,
``salf.train(model, data, plan=plan, config=TrainConfig(...))`` (``salf.api``), with the configs
(``salf.config``) and the names most scripts need (``Plan``, ``SalfCallback``, ``FreezeSpec``); each is
imported from its module on first use, so ``import salf`` (and the CLI's ``--help``) stays cheap. The modules themselves: ``salf.method`` (trace, gain, cost, plan, freeze), ``salf.training``,
``salf.bench``, ``salf.data``, ``salf.models``; docs/DESIGN.md describes the layout.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

PUBLIC = {
    "SalfError": "salf.errors",
    "plan": "salf.api",
    "apply_plan": "salf.api",
    "train": "salf.api",
    "DataConfig": "salf.config",
    "PlanConfig": "salf.config",
    "TraceConfig": "salf.config",
    "TrainConfig": "salf.config",
    "Task": "salf.config",
    "Plan": "salf.method.plan",
    "make_plan": "salf.method.plan",
    "PolicyChoice": "salf.method.plan",
    "FreezeSpec": "salf.method.freeze",
    "trace_model": "salf.method.trace",
    "SalfCallback": "salf.training.callback",
}
"""Public name -> the module that defines it."""


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        return getattr(importlib.import_module(PUBLIC[name]), name)
    raise AttributeError(f"module 'salf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *PUBLIC])


__all__ = ["__version__", *PUBLIC]
