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
#: The settings every gateway node should share: what a player meets must not depend on the node
#: its connection landed on (presence and its grace, an action's deadline and record, what a
#: resume replays, the history, the message limit). Each node's heartbeat carries them
#: (``<prefix>:node:<id>``, ``settings``); a node that finds another's different says so, once
#: (nodes started with different flags or environments did it without a word).
NODES: Final = (
    "presence_ttl",
    "presence_grace",
    "action_timeout",
    "action_record_ttl",
    "party_ttl",
    "history_size",
    "history_max_bytes",
    "history_max_age",
    "max_replay",
    "narration_idle",
    "max_message_bytes",
)
#: The integer ones (the others are seconds, floats).
_INTEGERS: Final = frozenset(
    {"history_size", "history_max_bytes", "api_max_body_bytes", "max_replay", "max_message_bytes"}
)
#: Those a node of an earlier release does not write: a worker keeps its own for them.
OPTIONAL: Final = frozenset({"api_max_body_bytes"})


def values_of(settings: object, names: tuple[str, ...] = SHARED) -> dict[str, float]:
    """The shared settings of ``settings`` (an object with those attributes): ``SHARED``, or
    ``NODES``."""
    return {name: getattr(settings, name) for name in names}


def decode_nodes(raw: Any) -> dict[str, float]:
    """The ``NODES`` settings in a heartbeat's ``settings`` (a node of an earlier release sends
    none: empty; a value that is not a number is left out)."""
    if not isinstance(raw, dict):
        return {}
    return {
        name: int(value) if name in _INTEGERS else float(value)
        for name in NODES
        if isinstance(value := raw.get(name), (int, float)) and not isinstance(value, bool)
    }


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
    own: Mapping[str, float],
    theirs: Mapping[str, float],
    own_is: str = "this process",
    names: tuple[str, ...] = SHARED,
) -> list[str]:
    """``name theirs (this process: own)`` for each shared setting that differs (``own_is``
    says what ``own`` is: a worker that took the nodes' settings before writes "until now",
    not its own environment's values). A setting ``theirs`` lacks (``OPTIONAL``, or a node of
    an earlier release) is not one."""
    return [
        f"{name} {theirs[name]:g} ({own_is}: {own[name]:g})"
        for name in names
        if name in theirs and name in own and float(theirs[name]) != float(own[name])
    ]


__all__ = [
    "NODES",
    "OPTIONAL",
    "SHARED",
    "decode",
    "decode_nodes",
    "differences",
    "encode",
    "values_of",
]
