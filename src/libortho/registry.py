"""One registry mechanism for every family of interchangeable algorithms.

A :class:`Registry` maps a name to an implementation plus free-form metadata (for example
``needs_labels`` for a separation method). Registering a name twice is an error, and looking up
an unknown name raises a one-line ``KeyError`` listing what is registered, so a typo in a config
is caught before any expensive work. Adding an algorithm is adding one decorated function or
class in one file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered implementation and its metadata."""

    name: str
    impl: T
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Name -> implementation (+ metadata) for one family, e.g. ``SEPARATION``."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator adding ``impl`` under ``name``; a second registration of the name is refused."""

        def wrap(impl: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} registered twice")
            self._entries[name] = Entry(name, impl, dict(meta))
            return impl

        return wrap

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``; ``KeyError`` naming the registered choices when unknown."""
        if name not in self._entries:
            raise KeyError(f"unknown {self.family} {name!r}; registered: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.entry(name).impl

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def check(self, names: list[str] | tuple[str, ...]) -> None:
        """Raise ``ValueError`` naming every unknown name at once (config validation)."""
        bad = [n for n in names if n not in self._entries]
        if bad:
            raise ValueError(f"unknown {self.family}(s) {bad}; registered: {', '.join(sorted(self._entries))}")
