"""``option``: a dataclass field that carries its own help, choices and command-line spelling.

Every option salf has is one such field of one config class (``salf.config``); the command line is
generated from those fields (``salf.config.parser``), so a flag's name, default, choices and help
cannot drift from the library's. This module, like the whole of ``salf.config``, imports no torch:
``salf --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptionInfo:
    """How one config field appears on the command line."""

    help: str
    """What the option does, shown by ``--help`` (and read as the field's documentation)."""
    flag: str | None = None
    """The flag (default: ``--`` and the field name with dashes); for a positional argument, its name. A
    boolean defaulting to True is switched off by its flag (``--no-resume`` sets ``resume`` False)."""
    choices: Sequence[str] | None = None
    """The values allowed (checked by the parser, and listed by ``--help``)."""
    metavar: str | None = None
    """What ``--help`` shows as the value."""
    cli: bool = True
    """False: a Python-only option (salf's commands set it themselves or leave it at its default)."""
    old: Sequence[str] = ()
    """Older spellings of the flag, still accepted for one release with a deprecation line."""
    old_values: dict[str, str] = dataclasses.field(default_factory=dict)
    """Older spellings of values (old -> new), still accepted with a deprecation line."""
    parse: Callable[[str], Any] | None = None
    """Turns the flag's text into the value (default: from the field's type)."""
    positional: bool = False
    """A positional argument instead of a flag."""
    nargs: str | None = None
    """argparse ``nargs`` for list-valued options ('+': one or more)."""


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           **cli: Any) -> Any:
    """A dataclass field with its help and command-line spelling (``OptionInfo``'s fields as keywords).

    ``default`` left out makes the option required (a required flag, or a positional argument).
    """
    info = OptionInfo(help=help, **cli)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": info})


def group(config_class: type, help: str) -> Any:
    """A field holding another config, built with its own defaults; its options join the command's."""
    return dataclasses.field(default_factory=config_class, metadata={"group": help})


def option_info(field: dataclasses.Field) -> OptionInfo | None:
    return field.metadata.get("option")


def group_help(field: dataclasses.Field) -> str | None:
    return field.metadata.get("group")


def field_help(config_class: type, name: str) -> str:
    """The help of one field (for error messages and docs that name it)."""
    for f in dataclasses.fields(config_class):
        if f.name == name:
            info = option_info(f)
            return info.help if info else ""
    raise KeyError(name)
