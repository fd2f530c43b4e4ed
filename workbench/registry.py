"""One small registry helper for every name -> thing table of the workbench (like timm's ``_registry``).

Tasks (:func:`workbench.data.register_task`), methods (:func:`workbench.methods.register_method`)
and backbones (:func:`workbench.models.register_backbone`) each keep one :class:`Registry`. It
refuses a second, different entry under a taken name, and its errors list what is registered::

    BACKBONES = Registry("backbone")
    BACKBONES.register("vlt5-tiny", build_vlt5_tiny)
    BACKBONES.get("vlt5-tny")   # ValueError: unknown backbone 'vlt5-tny'; registered: vlt5-tiny
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, in registration order; duplicate names are refused."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._sources: dict[str, object] = {}

    def register(self, name: str, entry: T, source=None) -> T:
        """Add ``entry`` under ``name``.

        ``source`` is the function that defines the entry (a task's loader, a method's apply
        function; default: the entry itself). Registering again from the same definition -- the same
        object, or a function of the same module and qualified name, as a re-imported module makes --
        replaces the entry; anything else under a taken name is a ValueError.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        source = entry if source is None else source
        if name in self._entries and not _same_definition(self._sources[name], source):
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name "
                             f"or unregister the existing one first")
        self._entries[name] = entry
        self._sources[name] = source
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry (tests register throw-away entries and remove them)."""
        if name not in self._entries:
            return self.get(name)  # raises, listing the registered names
        self._sources.pop(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name lists the registered ones (and close matches)."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _same_definition(a, b) -> bool:
    # A module re-imported (importlib.reload, a notebook's autoreload) defines a new function object
    # with the same qualified name in the same module: that is the same entry, not a clash.
    if a is b:
        return True

    def key(x):
        return getattr(x, "__module__", None), getattr(x, "__qualname__", None)

    return key(a)[1] is not None and key(a) == key(b)
