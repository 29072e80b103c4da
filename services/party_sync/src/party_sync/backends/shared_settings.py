"""The settings every process that writes a party's keys must share: the history's bounds and
the keys' lifetimes. The gateway nodes write them; ``party-sync engine-worker`` publishes the
engine's events into the same keys, so it writes with them too.

A worker started without the nodes' values (they were given to ``serve`` as flags, and the
worker read only its own environment) wrote action records that lived ``action_record_ttl`` =
600 s where the nodes said 20, and kept parties for an hour where they said a minute, without a
word (outside hygiene probe). So the nodes publish theirs in ``<prefix>:settings`` (with the
actions stream link: only a deployment with stream workers needs it), and a worker takes them
when it starts, and says so; one that finds them changed later takes them then (it kept its
own until restarted: a rolling-upgrade probe saw history trimmed to a bound the nodes had given
up), and says so.

Pure: the encoding and the comparison. The nodes' stream link writes the key, the worker's
command reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

#: The settings (their names in ``config.Settings``) shared through ``<prefix>:settings``.
SHARED: Final = (
    "history_size",
    "history_max_bytes",
    "history_max_age",
    "action_record_ttl",
    "party_ttl",
    "narration_idle",
    # the bound of one event (with its envelope: ``BackendSettings.max_event_bytes``): a worker
    # with its own default published events a node's engines could not (re-check probe)
    "api_max_body_bytes",
)
#: The integer ones (the others are seconds, floats).
_INTEGERS: Final = frozenset({"history_size", "history_max_bytes", "api_max_body_bytes"})
#: Those a node of an earlier release does not write: a worker keeps its own for them.
OPTIONAL: Final = frozenset({"api_max_body_bytes"})


def values_of(settings: object) -> dict[str, float]:
    """The shared settings of ``settings`` (an object with those attributes)."""
    return {name: getattr(settings, name) for name in SHARED}


def encode(values: Mapping[str, float]) -> bytes:
    """The key's value: a JSON object of the shared settings, names sorted."""
    return orjson.dumps({name: values[name] for name in SHARED}, option=orjson.OPT_SORT_KEYS)


def decode(raw: Any) -> dict[str, float] | None:
    """The shared settings in the key's value, or None if it holds none (absent, or not what a
    node writes: nothing is taken from it)."""
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if not isinstance(data, dict):
        return None
    values: dict[str, float] = {}
    for name in SHARED:
        value = data.get(name)
        if value is None and name in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return None
        values[name] = int(value) if name in _INTEGERS else float(value)
    return values


def differences(
    own: Mapping[str, float], theirs: Mapping[str, float], own_is: str = "this process"
) -> list[str]:
    """``name theirs (this process: own)`` for each shared setting that differs (``own_is``
    says what ``own`` is: a worker that took the nodes' settings before writes "until now",
    not its own environment's values). A setting ``theirs`` lacks (``OPTIONAL``) is not one."""
    return [
        f"{name} {theirs[name]:g} ({own_is}: {own[name]:g})"
        for name in SHARED
        if name in theirs and float(theirs[name]) != float(own[name])
    ]


__all__ = ["OPTIONAL", "SHARED", "decode", "differences", "encode", "values_of"]
