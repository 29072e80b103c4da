"""The benchmark's in-process engine: it answers every action at once.

``BenchEngine`` implements ``party_sync.engine.interface.Engine``: each accepted action is answered
with an ``action.result`` then a ``scene.update`` (scene number + 1), both carrying the action's
``trace_id`` (the load generator correlates on it). ``answer`` is the game logic alone, shared with
the python-socketio peer (``bench/peers/socketio_server.py``) so both run the same engine.

The narration scenario (``bench/loadgen.py --scenario narration``) drives it with control actions:
an ``action.request`` whose payload holds ``"bench_narration": {"op": "start", ...}`` makes the
engine narrate to that party (``PartyNarrator``: ``party_sync.engine.Narration`` streams, one at a
time, ``rate`` pieces a second on a fixed timeline) until ``{"op": "stop"}``, whose
``action.result`` carries what the engine wrote (``state.scene_flags``: streams, pieces, errors):
the truth the load generator checks every member against. Each piece's text ends with
``[<write µs>+<lag µs>]``: when the engine wrote it (``time.monotonic``, the clock every process
of the host shares) and how late that was against the piece's due time on the timeline.

Run party_sync with it: ``party-sync serve --engine bench.engine:create_engine`` (with the
repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping
from typing import Any

from party_sync.engine.interface import (
    ActionRequest,
    EventPublisher,
    JoinNotice,
    Narration,
    RestateNotice,
    publish_all,
)
from party_sync.protocol.types import PARTY_ACTOR

from bench.common import stamp

#: A narration of realistic length (the scene text a player reads), ~150 bytes.
_NARRATION = (
    "Black water laps at a gate of rusted iron. Beyond it, the stair descends into the "
    "flooded crypt. Something scrapes against the bars."
)
_OPTIONS = (
    {"id": "open-gate", "label": "Force the rusted gate"},
    {"id": "search-walls", "label": "Search the walls for a hidden lever"},
    {"id": "turn-back", "label": "Turn back to Millbrook"},
)


class BenchLogic:
    """Per-party scene counters and the two payloads of an answer; no I/O."""

    __slots__ = ("_scenes",)

    def __init__(self) -> None:
        self._scenes: dict[str, int] = {}

    def answer(
        self, party_id: str, action_id: str, character_id: str, action_type: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(action.result payload, scene.update payload)`` for one action."""
        scene_number = self._scenes.get(party_id, 0) + 1
        self._scenes[party_id] = scene_number
        result = {
            "action_id": action_id,
            "character_id": character_id,
            "action_type": action_type,
            "outcome": "success",
            "state": _state(character_id, {"gate_seen": True}),
            "roll": {"die": "d20", "value": 12, "modifier": 3, "total": 15, "difficulty": 14},
            "narration": "Aria's fingers find a loose stone. Behind it, a corroded lever.",
        }
        return result, _scene(scene_number)

    def current_scene(self, party_id: str) -> dict[str, Any] | None:
        """The party's current ``scene.update`` payload (None before its first action)."""
        scene_number = self._scenes.get(party_id)
        return None if scene_number is None else _scene(scene_number)


def _state(character_id: str, flags: dict[str, Any]) -> dict[str, Any]:
    """The actor's state after an action: a party-level action's (a vote's decision, character
    ``party``) has no hit points (``party_action_state``), a character's has."""
    if character_id == PARTY_ACTOR:
        return {"effects": [], "scene_flags": flags}
    return {"hp": 18, "max_hp": 20, "effects": [], "scene_flags": flags}


def _scene(scene_number: int) -> dict[str, Any]:
    return {
        "scene_number": scene_number,
        "scene_id": f"scene-{scene_number}",
        "title": "The Sunken Gate",
        "narration": _NARRATION,
        "options": [dict(option) for option in _OPTIONS],
        "kind": "story",
        "difficulty": 14,
    }


#: The payload key of the narration scenario's control actions.
NARRATION_KEY = "bench_narration"
#: Words of the narration pieces (a piece is 3 to 8 of them, as a language model's chunks are).
_WORDS = tuple(
    (
        _NARRATION.replace(".", "").replace(",", "").lower()
        + " the torchlight flickers over wet stone while distant bells toll and the river "
        "rises beneath a broken bridge where shadows gather"
    ).split()
)
#: A stream is ended before its text would pass this many characters (party_sync's limit is
#: 20,000 per stream: ``MAX_NARRATION_CHARS``).
STREAM_CHAR_BUDGET = 19_000
#: The longest a party narrates without a stop (a load generator that died).
MAX_NARRATION_SECONDS = 600.0


class PartyNarrator:
    """One party's live narration: streams of pieces at ``rate`` a second, one at a time.

    The pieces follow a fixed timeline (piece n is due at ``start + n / rate``, ``start`` a
    random phase within the first interval): a piece written late (the loop was busy) is written
    as soon as possible, and its stamp says how late. A stream has ``min_pieces`` to
    ``max_pieces`` pieces (fewer if its text would pass ``STREAM_CHAR_BUDGET``); the last one
    carries ``done``, then a new stream starts. On ``stop`` the next due piece ends the stream.
    """

    def __init__(
        self,
        publisher: EventPublisher,
        party_id: str,
        control: Mapping[str, Any],
        *,
        trace_id: str,
    ) -> None:
        self.publisher = publisher
        self.party_id = party_id
        self.rate = float(control.get("rate", 30.0))
        self.min_pieces = int(control.get("min_pieces", 150))
        self.max_pieces = int(control.get("max_pieces", 300))
        self.tag = str(control.get("tag", "s"))
        self.seconds = min(float(control.get("max_seconds", 60.0)), MAX_NARRATION_SECONDS)
        if not (self.rate > 0 and 1 <= self.min_pieces <= self.max_pieces):
            raise ValueError(f"bad narration control: {dict(control)}")
        self.trace_id = trace_id
        self.rng = random.Random(f"{control.get('seed', 0)}:{party_id}")
        self.streams = 0
        self.pieces = 0
        self.errors = 0
        self.first_error = ""
        self.lag_max = 0.0
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self, patience: float = 10.0) -> None:
        """End the current stream at its next piece and wait for it (bounded)."""
        self.stopping = True
        if self.task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), patience)
            if not self.task.done():
                self.task.cancel()
                self._error("the narration did not stop in time")

    def report(self) -> dict[str, Any]:
        """What the engine wrote: the ``scene_flags`` of the stop action's result."""
        return {
            "narration_streams": self.streams,
            "narration_pieces": self.pieces,
            "narration_errors": self.errors,
            "narration_error": self.first_error[:200],
            "narration_lag_max_us": int(self.lag_max * 1e6),
        }

    def _error(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text

    def _words(self) -> str:
        return " ".join(self.rng.choices(_WORDS, k=self.rng.randint(3, 8)))

    async def run(self) -> None:
        clock = time.monotonic
        interval = 1.0 / self.rate
        begin = clock() + self.rng.random() * interval
        deadline = begin + self.seconds
        n = 0  # pieces of this party so far, over every stream: the timeline's position
        try:
            while not self.stopping:
                length = self.rng.randint(self.min_pieces, self.max_pieces)
                # Not under the control action: its result ("started") is published at once,
                # and party_sync refuses a piece of an answered action's narration (it is over
                # with its action). The streams are the party's own narration, which costs
                # party_sync the same per piece.
                story = Narration(
                    self.publisher,
                    self.party_id,
                    f"{self.tag}-{self.streams}",
                    trace_id=self.trace_id,
                )
                self.streams += 1
                chars = 0
                for i in range(length):
                    due = begin + n * interval
                    n += 1
                    delay = due - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    now = clock()
                    text = f"{self._words()} {stamp(now, due)} "
                    chars += len(text)
                    last = (
                        i == length - 1
                        or self.stopping
                        or now >= deadline
                        or chars + 100 > STREAM_CHAR_BUDGET
                    )
                    self.lag_max = max(self.lag_max, now - due)
                    try:
                        if last:
                            await story.end(text)
                        else:
                            await story.write(text)
                    except Exception as exc:  # counted: the load generator fails the step
                        self._error(f"{type(exc).__name__}: {exc}")
                        break
                    self.pieces += 1
                    if last:
                        break
                if clock() >= deadline:
                    self.stopping = True
        except Exception as exc:
            self._error(f"{type(exc).__name__}: {exc}")


class BenchEngine:
    """party_sync's ``Engine`` over ``BenchLogic``: publishes the result and the scene (one step).

    Actions carrying ``NARRATION_KEY`` control the narration scenario instead (see the module's
    docstring): answered by an ``action.result`` only.
    """

    def __init__(self) -> None:
        self.logic = BenchLogic()
        self._publisher: EventPublisher | None = None
        self._narrators: dict[str, PartyNarrator] = {}

    async def start(self, publisher: EventPublisher) -> None:
        self._publisher = publisher

    async def handle_action(self, action: ActionRequest) -> None:
        publisher = self._publisher
        assert publisher is not None, "handle_action() before start()"
        control = action.payload.get(NARRATION_KEY)
        if control is not None:
            await self._narration(publisher, action, control)
            return
        result, scene = self.logic.answer(
            action.party_id, action.action_id, action.character_id, action.action_type
        )
        # both in one step: one script call and one pub/sub message in Redis mode
        events = (("action.result", result), ("scene.update", scene))
        await publish_all(publisher, action.party_id, events, trace_id=action.trace_id)

    async def _narration(
        self, publisher: EventPublisher, action: ActionRequest, control: Any
    ) -> None:
        """Start or stop a party's narration; answer with an ``action.result`` (flags)."""
        op = control.get("op") if isinstance(control, Mapping) else None
        party = action.party_id
        running = self._narrators.pop(party, None)
        if running is not None:  # a start while running (a lost stop) ends the old one first
            await running.stop()
        if op == "start":
            narrator = PartyNarrator(publisher, party, control, trace_id=action.trace_id)
            self._narrators[party] = narrator
            narrator.start()
            flags: dict[str, Any] = {"narration": "started"}
        elif op == "stop":
            flags = (
                running.report()
                if running is not None
                else {"narration_errors": 1, "narration_error": "stop without a start"}
            )
        else:
            flags = {"narration_errors": 1, "narration_error": f"unknown op {op!r}"}
        result = {
            "action_id": action.action_id,
            "character_id": action.character_id,
            "action_type": action.action_type,
            "outcome": "success",
            "state": _state(action.character_id, flags),
        }
        await publisher.publish(party, "action.result", result, trace_id=action.trace_id)

    async def handle_join(self, notice: JoinNotice) -> None:
        return None

    async def handle_restate(self, notice: RestateNotice) -> None:
        """party_sync lost the party's state: publish its current scene again (idempotent)."""
        scene = self.logic.current_scene(notice.party_id)
        if scene is not None and self._publisher is not None:
            await self._publisher.publish(
                notice.party_id, "scene.update", scene, trace_id=notice.trace_id
            )

    async def close(self) -> None:
        for narrator in self._narrators.values():
            if narrator.task is not None:
                narrator.task.cancel()
        self._narrators.clear()


def create_engine() -> BenchEngine:
    """The factory named on the command line (``--engine bench.engine:create_engine``)."""
    return BenchEngine()
