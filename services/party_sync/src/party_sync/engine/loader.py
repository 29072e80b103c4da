"""Loading an engine named ``MODULE:ATTR`` (an Engine instance, or a factory that returns one:
a function, or the engine's class itself)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType

from party_sync.config import engine_spec_parts
from party_sync.engine.interface import Engine
from party_sync.protocol.errors import ConfigError, EngineStartError

log = logging.getLogger(__name__)

#: The reference Campaign Engine's package (the default ``engine``): a wheel of its own.
REFERENCE_ENGINE = "campaign_engine"


def _import(module_name: str) -> ModuleType:
    """``module_name``, found where Python finds it, or else in the working directory: the
    console scripts (``party-sync serve --engine mymodule:create_engine`` run next to
    ``mymodule.py``) do not have it on ``sys.path`` as ``python -m`` does. It goes after what
    is installed, so a file there never shadows an installed module."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module_name.partition(".")[0] or here in sys.path:
            raise
        sys.path.append(here)
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def load_engine(spec: str) -> Engine:
    parts = engine_spec_parts(spec)
    if parts is None:
        raise ConfigError(f"engine must be MODULE:ATTR, got {spec!r}")
    module_name, attr = parts
    try:
        module = _import(module_name)
    except ImportError as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name == REFERENCE_ENGINE:
            hint = (
                f" (the default engine, {REFERENCE_ENGINE}:create_engine, is the reference "
                f"Campaign Engine: its own package, {REFERENCE_ENGINE}, installed beside "
                "party_sync (README, Deploying); or name yours with --engine MODULE:ATTR / "
                "PARTY_SYNC_ENGINE)"
            )
        raise ConfigError(f"cannot import engine module {module_name!r}: {exc}{hint}") from exc
    except Exception as exc:  # the module raised as it ran (a SyntaxError, a missing setting)
        raise _could_not_start(f"importing {module_name!r}", exc) from None
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    try:
        # A class is a factory (its instances are the engines): the runtime protocol check
        # passes for the class itself too, whose methods are its attributes (new-user probe:
        # ``--engine echo_engine:EchoEngine`` failed with "start() missing 1 required positional
        # argument: 'publisher'").
        engine: object = target
        if isinstance(target, type) or not isinstance(target, Engine):
            engine = target() if callable(target) else None
    except ValueError as exc:  # a factory's word for a bad setting (CAMPAIGN_ENGINE_SEED=abc)
        raise ConfigError(f"{spec}: {exc}") from None
    except Exception as exc:  # anything else it raised (or a callable that is no factory)
        raise _could_not_start(spec, exc) from None
    if not isinstance(engine, Engine):
        raise ConfigError(f"{spec} is neither an Engine nor a factory of one")
    return engine


def _could_not_start(what: str, exc: Exception) -> EngineStartError:
    """What the engine's code raised while it was loaded, in one line (as ``start_engine``
    says what ``start`` raised); the traceback at DEBUG."""
    log.debug("the engine failed to load", exc_info=exc)
    return EngineStartError(
        f"the engine could not start: {what}: {type(exc).__name__}: {str(exc)[:500]}"
    )
