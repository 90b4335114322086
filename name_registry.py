"""A registry of named extensions (guidances, surface representations): torch-free, so that config
validation knows every name without importing what the names stand for."""
from __future__ import annotations

import difflib
from typing import Any, Callable

Entry = Any   # a factory or a class; what it is belongs to the registry's user


class NameRegistry:
    """Names -> entries, with the built-in names known before their modules are imported.

    `kind` names the extension in messages ("guidance"); `builtin` are the names the project's own
    modules register when `imported_by` imports them; `error` is raised for an unknown name."""

    def __init__(self, kind: str, builtin: tuple[str, ...], error: type[Exception], imported_by: str) -> None:
        self.kind, self.builtin, self.error, self.imported_by = kind, builtin, error, imported_by
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[Entry], Entry]:
        """Decorator: the decorated entry is what `name` selects. Registering a taken name raises
        ValueError unless `replace` (a test or plugin overriding an entry on purpose)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{self.kind} name: expected an identifier (letters, digits, _), got {name!r}")

        def add(entry: Entry) -> Entry:
            taken = self._entries.get(name)
            if taken is not None and taken is not entry and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {taken.__module__}); pass "
                                 "replace=True to override it")
            self._entries[name] = entry
            return entry
        return add

    def unregister(self, name: str) -> None:
        """Remove a registered entry (tests that register their own clean up with this)."""
        if name in self.builtin:
            raise ValueError(f"{self.kind} {name!r} is built in and cannot be unregistered")
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Every name: the built-in ones, then the registered rest."""
        return self.builtin + tuple(sorted(set(self._entries) - set(self.builtin)))

    def get(self, name: str) -> Entry:
        """The entry registered under `name`; raises `error` naming the closest name."""
        if name in self._entries:
            return self._entries[name]
        if name in self.builtin:   # a program that skipped the module registering the built-in ones
            raise self.error(f"{self.kind} {name!r} is built in but its module was not imported; "
                             f"{self.imported_by} imports it")
        close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise self.error(f"unknown {self.kind} {name!r}: registered are {', '.join(self.names())}{hint}")
