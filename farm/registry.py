"""A small generic registry: a plug-in's name -> the module that implements it, imported when first used.

Each entry is one line in its package's __init__.py. A plug-in kept outside farm/ is registered by
FARM_PLUGINS="method:NAME=MODULE format:NAME=MODULE runtime:NAME=MODULE" (space- or comma-separated; every
process of a sweep, the evaluate and bench children included, reads it). On first use the module is checked:
it must define what its kind requires (e.g. `Options`, a subclass of the kind's options base, and `apply`),
and its Options must name it (`method: Literal["gptq"]`). Unknown names get "did you mean"; a name
registered twice is refused.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from types import ModuleType

from farm.errors import FarmError


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


class Registry:
    def __init__(self, kind: str, entries: dict[str, str], base: str | None, key: str | None,
                 needs: tuple[str, ...], plugin_kind: str = ""):
        """kind: for messages; base: 'module:Class' every Options must subclass (None: the plug-ins of this
        kind have no Options); key: the Options field that holds the plug-in's name; needs: the functions
        the module must define; plugin_kind: this registry's prefix in FARM_PLUGINS."""
        self.kind, self._base, self.key, self.needs = kind, base, key, needs
        self._entries: dict[str, str] = {}
        self._loaded: dict[str, ModuleType] = {}
        self.version = 0  # bumped by add(): the spec rebuilds its unions
        for name, module in entries.items():
            self.add(name, module)
        for item in re.split(r"[\s,]+", os.environ.get("FARM_PLUGINS", "").strip()):
            prefix, _, entry = item.partition(":")
            if prefix == plugin_kind and plugin_kind:
                name, _, module = entry.partition("=")
                if not (name and module):
                    raise FarmError(f"FARM_PLUGINS: '{item}' is not {plugin_kind}:NAME=MODULE")
                self.add(name, module)

    def add(self, name: str, module: str) -> None:
        if name in self._entries:
            raise FarmError(f"{self.kind} '{name}' is registered twice ({self._entries[name]} and {module})")
        self._entries[name] = module
        self.version += 1

    def remove(self, name: str) -> None:
        self._known(name)
        del self._entries[name]
        self._loaded.pop(name, None)
        self.version += 1

    def names(self) -> list[str]:
        return sorted(self._entries)

    def module_name(self, name: str) -> str:
        self._known(name)
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _known(self, name: str) -> None:
        if name not in self._entries:
            raise FarmError(
                f"unknown {self.kind} '{name}'{suggest(name, self.names())} (allowed: {', '.join(self.names())})")

    def get(self, name: str) -> ModuleType:
        self._known(name)
        if name not in self._loaded:
            module = importlib.import_module(self._entries[name])
            missing = [f for f in self.needs if not callable(getattr(module, f, None))]
            if self._base is None:
                if missing:
                    raise FarmError(f"{self.kind} '{name}': module {module.__name__} lacks {', '.join(missing)}")
                self._loaded[name] = module
                return module
            base_mod, _, base_cls = self._base.partition(":")
            base = getattr(importlib.import_module(base_mod), base_cls)
            opts = getattr(module, "Options", None)
            if not (isinstance(opts, type) and issubclass(opts, base)):
                missing.insert(0, f"Options (a subclass of {base.__name__})")
            if missing:
                raise FarmError(f"{self.kind} '{name}': module {module.__name__} lacks {', '.join(missing)}")
            field = opts.model_fields.get(self.key)
            args = getattr(field.annotation, "__args__", ()) if field else ()
            if args != (name,):
                raise FarmError(f"{self.kind} '{name}': {module.__name__}.Options.{self.key} must be "
                                f"Literal['{name}'], is {field.annotation if field else 'missing'}")
            self._loaded[name] = module
        return self._loaded[name]

    def options(self, name: str) -> type:
        return self.get(name).Options

    def all_options(self) -> tuple[type, ...]:
        return tuple(self.options(n) for n in self.names())

    def modules(self) -> list[ModuleType]:
        """Every registered plug-in's module, in registration order (imported on first use)."""
        return [self.get(n) for n in self._entries]
