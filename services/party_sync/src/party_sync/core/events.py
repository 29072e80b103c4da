"""The unit of a party's stream: one sequenced, encoded event."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """A party event as delivered: ``data`` is the whole envelope with its ``seq``, encoded once."""

    party_id: str
    seq: int
    type: str
    payload: Mapping[str, Any]
    trace_id: str
    data: bytes
