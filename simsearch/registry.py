"""One table type behind every extension point (datasets, backbone families, metrics, losses, commands).

As in timm's `_registry.py`: the registry is the only list of its kind, so listing, validating and building
all read it; registering a name twice warns and the later entry is used (a plugin may replace a built-in on
purpose, but never without a word); an unknown name is one sentence that lists the known ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from simsearch.errors import SimsearchError

Entry = TypeVar("Entry")


class DuplicateRegistration(UserWarning):
    """A name registered twice in one registry: the later entry replaces the earlier one."""


class Registry(Mapping[str, Entry], Generic[Entry]):
    """Entries by name, in the order registered. `key` is the config key that names them (`data.name`),
    used in the sentence for an unknown name."""

    def __init__(self, kind: str, key: str):
        self.kind = kind
        self.key = key
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> Entry:
        if not isinstance(name, str) or not name:
            raise SimsearchError(f"a {self.kind} needs a non-empty name, not {name!r}")
        if name in self._entries:
            warnings.warn(f"the {self.kind} '{name}' is registered twice: the later registration replaces the earlier one",
                          DuplicateRegistration, stacklevel=3)
        self._entries[name] = entry
        return entry

    def decorator(self, name: str, make: Callable[[Callable], Entry]) -> Callable[[Callable], Callable]:
        """`@registry.decorator(name, make)` on a function: registers `make(function)`, returns the function."""

        def register(function: Callable) -> Callable:
            self.add(name, make(function))
            return function

        return register

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise SimsearchError(f"unknown {self.key} '{name}' (known: {', '.join(self._entries) or 'none'})") from None

    def get(self, name: str, default: Entry | None = None) -> Entry | None:
        return self._entries.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def restore(self, entries: Mapping[str, Entry]) -> None:
        """Put back the entries saved with `dict(registry)`: a test or a notebook undoing its registrations."""
        self._entries = dict(entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
