"""One small registry type, shared by attacks, defences, datasets and models.

A new method is one module plus one ``@REGISTRY.register("name")`` line, reachable from the CLI
(which lists ``names()``) and from Python (``get(name)``). A registry given ``package`` imports
that package's modules on first lookup, so dropping a file in is all it takes, while start-up
stays fast for commands that never look anything up. One given ``modules`` imports those named
modules instead (entries that live beside unrelated code in a shared package).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterable, TypeVar

from clipguard.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str | None = None, skip: Iterable[str] = (),
                 modules: Iterable[str] = ()):
        if package is not None and modules:
            raise ValueError("a registry loads either a package or named modules, not both")
        self.kind = kind
        self._items: dict[str, T] = {}
        self._package, self._skip, self._modules = package, set(skip), tuple(modules)
        self._loaded = package is None and not self._modules

    def _autoload(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._modules:
            for name in self._modules:
                importlib.import_module(name)
            return
        pkg = importlib.import_module(self._package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name not in self._skip:
                importlib.import_module(f"{self._package}.{mod.name}")

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        self._autoload()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._items))}"
                              f"{did_you_mean(name, self._items)}") from None

    def names(self) -> list[str]:
        self._autoload()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._autoload()
        return name in self._items
