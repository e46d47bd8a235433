"""Every option salf has, once: typed config dataclasses whose fields carry their help, choices and flag.

The stage configs (``DataConfig``, ``TraceConfig``, ``PlanConfig``, ``TrainConfig``) are what the Python API
takes; each command's options (``salf.config.commands``) compose them, and the command line is generated
from those fields (``salf.config.parser``). Nothing here imports torch, so ``salf --help`` stays fast.
"""

from salf.config.data import TASKS, DataConfig, Task
from salf.config.fields import group, option
from salf.config.plan import PlanConfig
from salf.config.trace import TraceConfig
from salf.config.train import TrainConfig

__all__ = ["TASKS", "DataConfig", "PlanConfig", "Task", "TraceConfig", "TrainConfig", "group", "option"]
