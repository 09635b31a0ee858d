"""A small generic registry: name -> "module:Attr", imported lazily, with "did you mean" suggestions."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from farm.errors import FarmError


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


class Registry:
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)
        self._loaded: dict[str, Any] = {}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise FarmError(
                f"unknown {self.kind} '{name}'{suggest(name, self.names())} (allowed: {', '.join(self.names())})"
            )
        if name not in self._loaded:
            module, _, attr = self._entries[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]
