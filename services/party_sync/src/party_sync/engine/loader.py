"""Loading an engine named ``MODULE:ATTR`` (an Engine instance, or a factory that returns one)."""

from __future__ import annotations

import importlib

from party_sync.engine.interface import Engine
from party_sync.protocol.errors import ConfigError


def load_engine(spec: str) -> Engine:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"engine must be MODULE:ATTR, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import engine module {module_name!r}: {exc}") from exc
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    engine = target if isinstance(target, Engine) else target() if callable(target) else None
    if not isinstance(engine, Engine):
        raise ConfigError(f"{spec} is neither an Engine nor a factory of one")
    return engine
