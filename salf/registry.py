"""Name -> implementation registries, so benchmarks can sweep lenses, estimators and policies.

Each pipeline stage owns one ``Registry``; implementations add themselves with the ``register``
decorator, and callers look them up by name. An unknown name is a ``SalfError`` that lists the
known ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from salf.errors import SalfError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9\-]*$")


class Registry(Generic[T]):
    """A validated mapping from lowercase names to implementations of one kind."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase letters, digits and '-'")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")

        def add(item: T) -> T:
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise SalfError(
                f"unknown {self.kind} {name!r}",
                f"choose one of: {', '.join(self.names())}",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
