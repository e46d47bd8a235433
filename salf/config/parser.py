"""The command line, generated from the config dataclasses (the pattern of ``HfArgumentParser``).

``add_options(parser, Options)`` adds one argument per ``option`` field of ``Options`` and of the configs
it holds (``group`` fields); ``build(Options, namespace)`` makes the dataclasses back from the parsed
flags. A flag's name, type, default, choices and help all come from its one field, so ``salf --help``
and the library cannot disagree. Older spellings (``OptionInfo.old``) parse with a deprecation line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any

from salf.config.fields import OptionInfo, group_help, option_info

SCALARS = (int, float, str)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One option field as the parser sees it: where it sits in the config tree, and how it is spelled."""

    path: tuple[str, ...]
    """Field names from the command's options down to the field (``("plan", "trace", "lens")``)."""
    field: dataclasses.Field
    info: OptionInfo
    annotation: Any

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    @property
    def spelling(self) -> str:
        if self.info.positional:
            return self.info.flag or self.path[-1]
        return self.info.flag or "--" + self.path[-1].replace("_", "-")

    @property
    def default(self) -> Any:
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return dataclasses.MISSING


def walk(options_class: type, path: tuple[str, ...] = ()) -> Iterator[Flag]:
    """Every command-line option of ``options_class``, depth first through its config groups."""
    hints = typing.get_type_hints(options_class)
    for f in dataclasses.fields(options_class):
        if group_help(f) is not None:
            yield from walk(hints[f.name], (*path, f.name))
            continue
        info = option_info(f)
        if info is None:
            raise TypeError(f"{options_class.__name__}.{f.name} is neither an option() nor a group(): give it its help")
        if info.cli:
            yield Flag((*path, f.name), f, info, hints[f.name])


def _scalar_type(annotation: Any) -> type | None:
    """The scalar a flag's text converts to: ``int | None`` -> int; ``bool | str`` -> None (special-cased)."""
    if annotation in SCALARS:
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _scalar_type(args[0])
        for scalar in SCALARS:  # a union with a list / tuple of scalars reads the scalar
            if scalar in args:
                return scalar
    if typing.get_origin(annotation) in (list, tuple):
        return _scalar_type(typing.get_args(annotation)[0])
    return None


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (isinstance(annotation, types.UnionType) and bool in typing.get_args(annotation))


class _Deprecated(argparse.Action):
    """Stores the value; an older flag spelling or value prints how to say it now."""

    def __init__(self, *args: Any, new: str = "", old_values: dict[str, str] | None = None, const_value: Any = None,
                 **kwargs: Any):
        self.new, self.old_values, self.const_value = new, old_values or {}, const_value
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string is not None and option_string != self.new:
            print(f"salf: {option_string} is deprecated and goes in the next release; use {self.new} "
                  "(CHANGELOG.md maps the old spellings)", file=sys.stderr)
        if isinstance(values, str) and values in self.old_values:
            print(f"salf: {self.new} {values} is deprecated; use {self.new} {self.old_values[values]}",
                  file=sys.stderr)
            values = self.old_values[values]
        setattr(namespace, self.dest, self.const_value if self.nargs == 0 else values)


def group_titles(options_class: type, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """The ``--help`` section title of every config group in ``options_class``, by its path."""
    hints, titles = typing.get_type_hints(options_class), {}
    for f in dataclasses.fields(options_class):
        title = group_help(f)
        if title is not None:
            titles[(*path, f.name)] = title
            titles.update(group_titles(hints[f.name], (*path, f.name)))
    return titles


def add_options(parser: argparse.ArgumentParser, options_class: type) -> None:
    """Add every option of ``options_class`` to ``parser``, grouped by the config that holds it."""
    groups: dict[tuple[str, ...], Any] = {}
    titles = group_titles(options_class)
    for flag in walk(options_class):
        where = flag.path[:-1]
        if where not in groups:
            groups[where] = parser.add_argument_group(titles[where]) if where else parser
        target, info, default = groups[where], flag.info, flag.default
        kwargs: dict[str, Any] = {"dest": flag.dest, "help": info.help,
                                  "metavar": info.metavar or flag.path[-1].upper()}
        if info.positional:
            kwargs.pop("dest")
            target.add_argument(flag.dest, metavar=flag.spelling, help=info.help, nargs=info.nargs,
                                type=info.parse or _scalar_type(flag.annotation))
            continue
        if _is_bool(flag.annotation) and isinstance(default, bool):
            # A switch: --x sets True (or, for a True default, --no-x sets False).
            kwargs.update(nargs=0, default=default, const_value=not default)
            kwargs.pop("metavar")
        else:
            kwargs.update(type=info.parse or _scalar_type(flag.annotation), choices=info.choices, nargs=info.nargs)
            if info.choices is not None and info.metavar is None:
                kwargs.pop("metavar")  # argparse shows {a,b,c}
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
                if default is not None and not isinstance(default, (list, tuple)):
                    kwargs["help"] = f"{info.help} (default: {default})"
        if info.choices is not None and info.old_values:
            kwargs["choices"] = [*info.choices, *info.old_values]
        target.add_argument(flag.spelling, *info.old, action=_Deprecated, new=flag.spelling,
                            old_values=info.old_values, **kwargs)


def build(options_class: type, namespace: argparse.Namespace, path: tuple[str, ...] = ()) -> Any:
    """The ``options_class`` instance the parsed flags describe (options not on the command line: defaults)."""
    hints = typing.get_type_hints(options_class)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(options_class):
        dest = "__".join((*path, f.name))
        if group_help(f) is not None:
            values[f.name] = build(hints[f.name], namespace, (*path, f.name))
        elif hasattr(namespace, dest):
            values[f.name] = getattr(namespace, dest)
    return options_class(**values)


__all__ = ["Flag", "add_options", "build", "walk"]
