"""Live narration: the engine writes its scene text progressively, like a model generating it.

An AI game master writes its narration over seconds, token by token; the reference engine's texts
are ready at once, so in development mode (``make run``) it *simulates* the writing: before it
publishes an action's events it sends what is new — after a scene change the new
``scene.update``'s whole text, within a scene the ``action.result``'s (what happened), texts the
final, authoritative events then carry — as a ``narration.delta`` stream (party_sync's
``Narration`` writer, tied to the action's ``action_id``), a word at a time, at
``speed`` characters per second (``CAMPAIGN_ENGINE_NARRATION_SPEED``; off unless set).

Narration never delays the answer for long nor breaks it: a stream takes at most
``MAX_NARRATION_SECONDS`` (a long text is written faster), a piece party_sync does not take within
``PIECE_TIMEOUT`` seconds or refuses (``NarrationConflict``, ``InvalidEvent``) or cannot be sent
(party_sync unreachable) ends the narration with a warning, and the events are published as
always. A stream left open that way is closed by party_sync after its ``narration_idle``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Final

from party_sync.engine import EventPublisher, Narration

log = logging.getLogger("campaign_engine")

#: The longest a narration stream takes (seconds): a longer text at the configured speed is
#: written faster. It keeps the whole delivery under party_sync's HTTP engine timeout (5 s).
MAX_NARRATION_SECONDS: Final = 4.0
#: Seconds party_sync may take to accept one piece before the narration is given up.
PIECE_TIMEOUT: Final = 2.0
#: The highest speed accepted (characters per second); 0 means off.
MAX_SPEED: Final = 1_000_000.0

_WORDS = re.compile(r"\s*\S+\s*|\s+")

Sleep = Callable[[float], Awaitable[None]]


def pieces(text: str) -> list[str]:
    """``text`` cut into word-sized pieces (a word with the spaces around it) that join back
    into exactly ``text``."""
    return _WORDS.findall(text)


def parse_speed(text: str, name: str) -> float | None:
    """A narration speed from a setting: None (off) for "" or 0, else characters per second."""
    text = text.strip()
    if not text:
        return None
    try:
        speed = float(text)
    except ValueError:
        speed = -1.0
    if not (math.isfinite(speed) and 0 <= speed <= MAX_SPEED):
        raise ValueError(
            f"{name} must be a number of characters per second in [0, {MAX_SPEED:.0f}] "
            f"(0: off), got {text!r}"
        )
    return speed or None


def duration(text: str, speed: float) -> float:
    """Seconds ``narrate`` takes to write ``text`` at ``speed`` (its pauses; not the publishing):
    at most ``MAX_NARRATION_SECONDS``."""
    if not pieces(text) or speed <= 0:
        return 0.0
    return len(text) / max(speed, len(text) / MAX_NARRATION_SECONDS)


async def narrate(
    publisher: EventPublisher,
    party_id: str,
    text: str,
    *,
    speed: float,
    action_id: str | None = None,
    trace_id: str | None = None,
    sleep: Sleep = asyncio.sleep,
) -> bool:
    """Write ``text`` as a live narration stream at ``speed`` characters per second.

    Returns True if the whole stream went out (its last piece ``done``), False if it was given up
    (logged as a warning; never raises but for cancellation). ``sleep`` waits before each piece,
    as long as writing it takes at that speed.
    """
    parts = pieces(text)
    if not parts or speed <= 0:
        return False
    speed = max(speed, len(text) / MAX_NARRATION_SECONDS)
    story = Narration(publisher, party_id, action_id=action_id, trace_id=trace_id)
    extra = {"trace_id": trace_id, "action_id": action_id, "stream_id": story.stream_id}
    try:
        for n, part in enumerate(parts):
            await sleep(len(part) / speed)
            async with asyncio.timeout(PIECE_TIMEOUT):
                if n == len(parts) - 1:
                    await story.end(part)
                else:
                    await story.write(part)
    except Exception as exc:  # narration is a bonus: the final events go out regardless
        log.warning(
            "narration %s stopped at piece %d: %s: %s",
            story.stream_id,
            story.index,
            type(exc).__name__,
            exc,
            extra=extra,
        )
        return False
    return True
