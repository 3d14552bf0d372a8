"""Name -> class registries (tasks, methods, ...), filled by class decorators.

Built-in entries register themselves when their module is imported; the
registry imports those modules on first use, so listing or looking up a name
never depends on import order elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Generic, TypeVar

from tunesmith.errors import ConfigError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by their ``name`` attribute.

    Args:
        config_key: The config key that selects an entry (for error messages).
        builtin_modules: Modules whose import registers the built-in entries.
    """

    def __init__(self, config_key: str, builtin_modules: Sequence[str]) -> None:
        self.config_key = config_key
        self.builtin_modules = tuple(builtin_modules)
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator: add ``cls`` under ``cls.name``."""
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__qualname__} has no registry name")
        self._entries[name] = cls
        return cls

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The class registered as ``name``; ConfigError listing the names otherwise."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"{self.config_key}: unknown '{name}' (available: {', '.join(self.names())})"
            ) from None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.builtin_modules:
                importlib.import_module(module)
