"""Name -> object registries that fail loudly.

Architectures, data sources and optimizers (and, in `hpo`, samplers, pruners and backends) are
created by name. Registering a name twice is a programming error; asking for an unknown name is a
user error whose message lists the known names, close matches first.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from imgcls.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """An ordered mapping of names to objects, filled by the `register` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # what the names are, for messages: "architecture", "data source", ...
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: T, **meta: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, obj, dict(meta))

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def check_name(self, name: str) -> str:
        """`name` if registered. For pydantic validators, which report a ValueError under the
        field's name."""
        if name not in self._entries:
            raise ValueError(self.unknown_message(name))
        return name

    def unknown_message(self, name: object) -> str:
        known = list(self._entries)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
        ordered = close + [k for k in known if k not in close]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(ordered)})"

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
