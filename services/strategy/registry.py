"""Find a strategy class by registry name (``momentum``) or dotted path (``pkg.module:Class``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from services.strategy.base import Strategy

# Built-in strategies, imported lazily so one broken strategy never blocks the others.
BUILTIN: dict[str, str] = {
    "momentum": "services.strategy.momentum:Momentum",
    "macd": "services.strategy.macd:MacdCrossover",
    "ema_cross": "services.strategy.ema_cross:EmaCross",
    "straddle": "services.strategy.straddle:Straddle",
}

_registered: dict[str, type[Strategy]] = {}


class UnknownStrategy(LookupError):
    """No strategy of that name or path."""


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered")
    _registered[cls.name] = cls
    return cls


def names() -> list[str]:
    """Every name ``load`` accepts without a dotted path."""
    return sorted({*BUILTIN, *_registered})


def _import(module_name: str) -> ModuleType:
    """Import from the installed packages, else from the current directory (so a strategy in
    ``./mystrats/`` works from the ``neopulse`` console script too)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = str(Path.cwd())
        top = module_name.split(".", 1)[0]
        if exc.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def load(spec: str) -> type[Strategy]:
    """Resolve ``spec``: a registered or built-in name, or ``package.module:Class`` (importable
    from the installed packages or the current directory)."""
    if spec in _registered:
        return _registered[spec]
    path = BUILTIN.get(spec, spec)
    if ":" not in path:
        raise UnknownStrategy(
            f"unknown strategy {spec!r} (known: {', '.join(names())}; "
            "or give a dotted path package.module:Class)"
        )
    module_name, _, attr = path.partition(":")
    try:
        module = _import(module_name)
    except ModuleNotFoundError as exc:
        raise UnknownStrategy(f"strategy {spec!r}: cannot import {module_name}: {exc}") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type) or not issubclass(cls, Strategy):
        raise UnknownStrategy(f"strategy {spec!r}: {path} is not a Strategy subclass")
    return cls
