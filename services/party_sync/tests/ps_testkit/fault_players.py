"""The fault tier's players: ``party_sync.client.PartyClient``s that act in a loop, retry, resume,
and record every frame they send and receive (``fault_history.ClientHistory``).

The client reconnects, resumes and resends by itself; the only thing added here is a
``Transport`` that records and fails over: it is given every node's URL (its own node first) and
tries the next one when a connection cannot be made, so a killed node's players move to another.
A player acts only on what its client shows, as a player on the demo page: it waits for a scene
with options, then picks ``onward`` (the fault tier's campaign offers it in every scene, so every
action is valid whatever a player has seen), except every ``REFUSED_EVERY``-th action: an option
no scene offers (a stale button), which the engine refuses. After any refusal a player goes on
with a new ``action_id``: a refusal guarantees the action was not and will not be applied, so that
is what a real player does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from party_sync.client import ActionFailed, Backoff, ClientClosed, PartyClient
from party_sync.client.transport import (
    AiohttpTransport,
    Connection,
    HandshakeRejected,
    TransportError,
)

from ps_testkit.fault_history import ClientHistory, Frame
from ps_testkit.servers import token

Clock = Callable[[], float]

#: How long a player waits for one action's answer before giving up on it (client side only:
#: the history check still counts the action; a correct server answers within action_timeout).
GIVE_UP = 10.0
#: Pause after an answered action, and after a refusal before trying again (workload pacing).
THINK = 0.25
RETRY_PAUSE = 0.3
#: Every this many actions, a player picks an option no scene offers (a stale button), so the
#: engine refuses it (``action_rejected``): refusals must reach their sender as surely as results.
REFUSED_EVERY = 4
NO_SUCH_OPTION = "wander"


class RecordingConnection:
    """One WebSocket: every frame in and out, and the close, go to the client's history."""

    def __init__(self, inner: Connection, history: ClientHistory, conn: int, clock: Clock) -> None:
        self._inner = inner
        self._history = history
        self._conn = conn
        self._clock = clock
        self._closed_by_us = False

    @property
    def close_code(self) -> int | None:
        return self._inner.close_code

    @property
    def close_reason(self) -> str:
        return self._inner.close_reason

    def _add(self, kind: Any, message: Mapping[str, Any] | None = None, **extra: Any) -> None:
        self._history.frames.append(Frame(self._clock(), self._conn, kind, message, **extra))

    async def receive(self) -> str | bytes | None:
        raw = await self._inner.receive()
        if raw is None:
            if not self._closed_by_us:
                self._add("close", code=self._inner.close_code)
            return None
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            message = {"type": "<not json>", "raw": str(raw)[:200]}
        self._add("recv", message)
        return raw

    async def send(self, text: str) -> None:
        await self._inner.send(text)  # raises TransportError if gone: then nothing was sent
        self._add("sent", orjson.loads(text))

    async def close(self, code: int = 1000) -> None:
        """The client closes (recorded with its own code, not the 1006 aiohttp then reports)."""
        if not self._closed_by_us:
            self._closed_by_us = True
            self._add("close", code=code)
        await self._inner.close(code)


class FailoverTransport:
    """aiohttp WebSockets to the first of ``urls`` that accepts, starting with the last that did;
    every connection is recorded in ``history``."""

    def __init__(self, urls: Sequence[str], history: ClientHistory, clock: Clock) -> None:
        self.urls = list(urls)
        self.history = history
        self._clock = clock
        self._index = 0
        self._connections = 0
        self._inner = AiohttpTransport(connect_timeout=3.0)

    async def connect(self, url: str, *, token: str, params: Mapping[str, str]) -> Connection:
        error: Exception = TransportError("no URL")
        for step in range(len(self.urls)):
            index = (self._index + step) % len(self.urls)
            try:
                inner = await self._inner.connect(self.urls[index], token=token, params=params)
            except TransportError as exc:
                error = exc
                continue
            except HandshakeRejected as exc:
                if exc.status < 500:
                    raise  # the client decides (refresh the token, or stop)
                error = exc
                continue
            self._index = index
            conn = self._connections
            self._connections += 1
            self.history.frames.append(
                Frame(self._clock(), conn, "open", {"params": dict(params)}, url=self.urls[index])
            )
            return RecordingConnection(inner, self.history, conn, self._clock)
        if isinstance(error, HandshakeRejected):
            raise error
        raise TransportError(f"no node accepted: {error}")

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one ``send_action`` call ended with, as the player saw it."""

    action_id: str
    started: float
    ended: float
    result: str  # "result", an error code, "gave_up" or "client_closed"


class Player:
    """One character: a ``PartyClient`` with a recording, failing-over transport, and a loop of
    actions (``start_playing`` / ``stop_playing``)."""

    def __init__(
        self,
        character: str,
        urls: Sequence[str],
        *,
        party: str,
        run: str,
        clock: Clock = time.monotonic,
    ) -> None:
        self.character = character
        self.history = ClientHistory(character)
        self.clock = clock
        self.transport = FailoverTransport(urls, self.history, clock)
        self.client = PartyClient(
            urls[0],
            token=token(character, party=party, run=run),
            transport=self.transport,
            backoff=Backoff(base=0.1, cap=1.0),
        )
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._count = 0

    async def connect(self, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            await self.client.connect()

    def start_playing(self) -> None:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._play(), name=self.character)

    async def stop_playing(self) -> None:
        """Stop after the action in progress (answered, or given up after ``GIVE_UP``)."""
        self._stop.set()
        if self._task is not None:
            async with asyncio.timeout(GIVE_UP + 5):
                await self._task
            self._task = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.client.close()

    def successes_since(self, since: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == "result" and o.ended >= since]

    async def _offered(self) -> str | None:
        """The option to pick, once the client's scene offers one (as a player on the demo page
        can only press a button it sees: with no scene, no action); None once stopped."""
        while not self._stop.is_set():
            scene = self.client.state.scene or {}
            options = [str(o["id"]) for o in scene.get("options") or ()]
            if options:
                return "onward" if "onward" in options else options[0]
            with contextlib.suppress(TimeoutError):  # polling the client's state, cut short by stop
                await asyncio.wait_for(self._stop.wait(), 0.05)
        return None

    async def _play(self) -> None:
        while not self._stop.is_set():
            option = await self._offered()
            if option is None:
                return
            self._count += 1
            if self._count % REFUSED_EVERY == 0:
                option = NO_SUCH_OPTION  # a stale button: the engine refuses it
            action_id = f"{self.character}-{self._count:04d}"
            started = self.clock()
            try:
                async with asyncio.timeout(GIVE_UP):
                    await self.client.send_action("choice", {"option": option}, action_id=action_id)
                result = "result"
            except ActionFailed as exc:
                result = exc.code
            except TimeoutError:
                result = "gave_up"
            except ClientClosed:
                self.outcomes.append(Outcome(action_id, started, self.clock(), "client_closed"))
                return
            self.outcomes.append(Outcome(action_id, started, self.clock(), result))
            with contextlib.suppress(TimeoutError):  # pacing, cut short by stop_playing
                await asyncio.wait_for(
                    self._stop.wait(), THINK if result == "result" else RETRY_PAUSE
                )


def state_view(client: PartyClient) -> dict[str, Any]:
    """A client's folded state in the shape of a ``system.hello`` payload (for ``converged``)."""
    state = client.state
    return {
        "epoch": state.epoch,
        "seq": state.seq,
        "status": state.status,
        "run_status": state.run_status,
        "members": [
            {"character_id": m.character_id, "display_name": m.display_name, "online": m.online}
            for m in state.members.values()
        ],
        "scene": state.scene,
        "combat": state.combat,
        "party_state": state.party_state,
        "vote": state.vote,
    }
