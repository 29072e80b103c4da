"""A node's ordered view of one party's stream over Redis pub/sub: gap repair, else resync.

Redis pub/sub is at most once (docs/redis.md: a subscriber evicted by its output-buffer limit, or
cut by a blip, loses messages for good). So a node never trusts it to be complete: it tracks the
``(epoch, seq)`` it delivered last and

- delivers an event only if it is the next one (``seq == last + 1``) of the same epoch;
- drops an event it already delivered (an overlap with a repair);
- on a jump, or after a pub/sub reconnect, fetches the missing events from the party's history
  (``range.lua``) and delivers them in order before any later live event (those wait in
  ``pending``);
- when history cannot fill the gap (the epoch changed: Redis was flushed or restarted; or the gap
  was trimmed away), calls ``on_resync`` on its listeners (every client reconnects and takes a
  snapshot) and starts again from the party's current head. It never delivers out of order.

Wire format on ``party:<party_id>``, JSON only (never pickle: docs/security.md)::

    {"epoch":"<epoch>","event":<the event's envelope, seq first>}     written by _lib.lua append()
    {"epoch":"<epoch>","lengths":[<bytes>, ...],"events":[<envelope>, ...]}
                                          written by publish_many.lua: consecutive events of one
                                          atomic step, sliced by their lengths (decoded once per
                                          node, delivered in one go: one write per member)
    {"direct":"<character_id>","data":<a system.error envelope>}     written by encode_direct()
    {"transient":[<envelope>, ...]}       written by _lib.lua publish_transient(): action.accepted,
                                          action.failed, narration.delta (core/transient.py)

Transient messages are handed to the listeners as they arrive (decoded once per node): they are
not sequenced, so they neither wait for a repair nor cause one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from party_sync.backends.base import PartyListener
from party_sync.core.events import Event
from party_sync.core.limits import RateGate
from party_sync.core.transient import Transient, from_message
from party_sync.protocol.errors import BackendUnavailable

log = logging.getLogger(__name__)

_EVENT_PREFIX = b'{"epoch":"'
_TRANSIENT_PREFIX = b'{"transient":['
_EVENT_SEPARATOR = b'","event":'
_LENGTHS_SEPARATOR = b'","lengths":['
_EVENTS_SEPARATOR = b'],"events":['

#: Epochs of events a party's channel carried that this deployment's Redis does not hold, kept
#: per party (their events are dropped at once, not looked for in history again), at most.
FOREIGN_EPOCHS = 8
#: Seconds between WARNINGs (each with a count) about such events, for every party of a node.
FOREIGN_LOG_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class Sequenced:
    epoch: str
    event: Event


@dataclass(frozen=True, slots=True)
class Direct:
    character_id: str
    data: bytes


def event_from(party_id: str, data: bytes) -> Event:
    """An ``Event`` from its encoded envelope (as published and as kept in history)."""
    message = orjson.loads(data)
    return Event(
        party_id, message["seq"], message["type"], message["payload"], message["trace_id"], data
    )


def encode_direct(character_id: str, data: bytes) -> bytes:
    return b'{"direct":' + orjson.dumps(character_id) + b',"data":' + data + b"}"


def _events(raw: bytes, cut: int) -> list[bytes]:
    """The events of a message of several (``publish_many.lua``), sliced by their lengths."""
    if not raw.startswith(_LENGTHS_SEPARATOR, cut):
        raise ValueError("not an event message")
    start = cut + len(_LENGTHS_SEPARATOR)
    end = raw.index(b"]", start)
    at = end + len(_EVENTS_SEPARATOR)
    if raw[end:at] != _EVENTS_SEPARATOR:
        raise ValueError("not an event message")
    out = []
    for length in raw[start:end].split(b","):
        stop = at + int(length)
        out.append(raw[at:stop])
        at = stop + 1  # past the comma between two events, or the closing bracket
    if at != len(raw) - 1:  # the closing brace is all that is left
        raise ValueError("the lengths do not match the events")
    return out


def decode(
    party_id: str, raw: bytes
) -> Sequenced | tuple[Sequenced, ...] | Direct | list[Transient] | None:
    """Parse one bus message; None (logged) for anything that is not ours."""
    try:
        if raw.startswith(_TRANSIENT_PREFIX):
            items = [from_message(m) for m in orjson.loads(raw)["transient"]]
            return [item for item in items if item is not None]
        if raw.startswith(_EVENT_PREFIX):
            cut = raw.index(b'"', len(_EVENT_PREFIX))
            epoch = raw[len(_EVENT_PREFIX) : cut].decode()
            if raw.startswith(_EVENT_SEPARATOR, cut):
                data = raw[cut + len(_EVENT_SEPARATOR) : -1]
                return Sequenced(epoch, event_from(party_id, data))
            return tuple(Sequenced(epoch, event_from(party_id, d)) for d in _events(raw, cut))
        message = orjson.loads(raw)
        return Direct(message["direct"], orjson.dumps(message["data"]))
    except (ValueError, KeyError, TypeError):
        log.warning(
            "ignored a malformed message on the party channel", extra={"party_id": party_id}
        )
        return None


#: ``(epoch or "", top seq, events after the asked seq or None when they cannot all be given)``.
RangeReply = tuple[str, int, list[bytes] | None]


class StreamSource(Protocol):
    """Where a stream repairs itself from (the backend's ``range.lua`` and ``head.lua``)."""

    async def range(self, party_id: str, epoch: str, after: int) -> RangeReply: ...

    async def head(self, party_id: str) -> tuple[str, int]: ...


class PartyStream:
    """One party's delivery on this node: every local listener gets the events in seq order."""

    def __init__(
        self,
        party_id: str,
        source: StreamSource,
        *,
        count_gap: Callable[[str], None],
        max_pending: int,
        spawn: Callable[[Awaitable[None]], asyncio.Task[None]],
        foreign_log: RateGate,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.party_id = party_id
        self.listeners: list[PartyListener] = []
        self.epoch: str | None = None  # None until the first catch-up found the head
        self.last = 0
        self.ready = False  # False while catching up: live events wait in ``pending``
        self.closed = False
        self.pending: deque[Sequenced | list[Transient]] = deque()
        self._source = source
        self._count_gap = count_gap
        self._max_pending = max_pending
        self._spawn = spawn
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._foreign: list[str] = []  # epochs this deployment's Redis does not hold
        self._foreign_log = foreign_log  # the node's: one WARNING a minute for all its parties
        self._monotonic = monotonic

    # -- from the bus ---------------------------------------------------------------------------
    def feed(self, raw: bytes) -> None:
        """A message from the party channel (called by the bus's reader, in arrival order)."""
        message = decode(self.party_id, raw)
        if isinstance(message, Direct):
            for listener in list(self.listeners):
                listener.on_direct(message.character_id, message.data)
        elif isinstance(message, list):
            if self.ready:
                self._tell(message)
            else:  # in channel order with the events being repaired (e.g. a result after it)
                self.pending.append(message)
        elif isinstance(message, tuple):  # consecutive events of one step (publish_many.lua)
            for one in message:
                self._live(one)
        elif message is not None:
            self._live(message)

    def _live(self, message: Sequenced) -> None:
        """A live event: delivered if it is the next one, else kept and the gap repaired."""
        if self.ready and self._apply(message):
            return
        if message.epoch in self._foreign:
            return  # not ours (``_skip_unreachable``): no repair, nothing held back for it
        self.pending.append(message)
        if len(self.pending) > self._max_pending:
            self.pending.clear()  # the catch-up fetches them from history instead
        if self.ready:
            self.ready = False
            log.info(
                "pub/sub gap: repairing from history",
                extra={
                    "party_id": self.party_id,
                    "last_seq": self.last,
                    "seq": message.event.seq,
                    "trace_id": message.event.trace_id,  # the event that showed the gap
                },
            )
            self.catch_up_soon()

    def catch_up_soon(self) -> None:
        """Continuity is in doubt (a gap, a pub/sub reconnect): repair in the background."""
        self.ready = False
        if self._task is None or self._task.done():
            self._task = self._spawn(self.catch_up(initial=False))
        else:
            self._again = True  # a catch-up is running: it must look at history once more

    # -- catching up ----------------------------------------------------------------------------
    async def start(self) -> None:
        """The first catch-up, right after the subscription was confirmed: find the head."""
        self._task = self._spawn(self.catch_up(initial=True))
        await asyncio.shield(self._task)

    async def catch_up(self, *, initial: bool) -> None:
        """Deliver what history has after ``last``, then the pending live events, then go live.

        ``initial`` (the first subscription): errors propagate. Otherwise retry until Redis
        answers or the stream is closed.
        """
        delay = 0.05
        fruitless = 0  # looks in a row that delivered nothing
        while not self.closed:
            if fruitless > 1:
                # Never a busy loop. (Memory probe: under eviction a live message of an epoch
                # Redis no longer had stayed first in line, and this loop read history about
                # 2,500 times a second for minutes; the party's new connections on that node
                # never got their hello.)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            self._again = False
            before = (self.epoch, self.last)
            try:
                epoch, top, events = await self._source.range(
                    self.party_id, self.epoch or "", self.last
                )
                if events is None and not epoch:  # the party has no history: start one
                    epoch, top = await self._source.head(self.party_id)
            except BackendUnavailable:
                if initial:
                    raise
                fruitless = max(fruitless + 1, 2)  # a pause before each try while it is away
                continue
            if events is None:
                if self._restart(epoch, top):
                    fruitless += 1
                    continue  # a new epoch: deliver it from its first event
            elif events:
                delivered = self.last
                for data in events:
                    self._apply(Sequenced(epoch, event_from(self.party_id, data)))
                delivered = self.last - delivered
                if delivered and not initial:
                    self._count_gap("repaired")
                    log.info(
                        "pub/sub gap repaired from history",
                        extra={"party_id": self.party_id, "events": delivered, "seq": self.last},
                    )
            if self._drain() and not self._again:
                self.ready = True
                return
            if self.epoch == before[0] and self.last > before[1]:
                fruitless, delay = 0, 0.05
                continue
            fruitless += 1
            if fruitless > 2:  # history, read again, still does not lead to what waits
                self._skip_unreachable()
                if self._drain() and not self._again:
                    self.ready = True
                    return

    def _restart(self, epoch: str, top: int) -> bool:
        """History cannot give what is missing. True if the stream should read ``epoch`` anew.

        - First catch-up: start at the head (what came before is in the listeners' snapshots).
        - Another epoch (Redis lost the history: flush, restart): clients of the old one resync;
          the stream goes on from the new epoch's first event, so that connections opened in it
          meanwhile miss nothing.
        - Same epoch, gap trimmed away or too large: clients resync; go on from the head.
        """
        if self.epoch is None:
            self.epoch, self.last = epoch, top
            return False
        self._count_gap("resync")
        log.warning(
            "party stream lost continuity: clients resync",
            extra={"party_id": self.party_id, "epoch": epoch, "last_seq": self.last},
        )
        moved = epoch if epoch != self.epoch else None
        for listener in list(self.listeners):
            listener.on_resync(moved)
        if moved is not None:
            self.epoch, self.last = epoch, 0
            return True
        self.last = top
        return False

    def _skip_unreachable(self) -> None:
        """History, read twice, does not lead to the first live message waiting: drop waiting
        messages of another epoch (a lost one; a new one is read from history when its next
        event shows it), and past a gap history cannot fill (Redis lost what lies between:
        eviction), the listeners resync and the stream goes on from that message."""
        pending = self.pending
        while pending:
            first = pending[0]
            if isinstance(first, list):
                pending.popleft()
                self._tell(first)
            elif first.epoch != self.epoch:
                pending.popleft()
                self._not_ours(first)
            elif first.event.seq <= self.last + 1:
                # delivered already, or the next one (``_drain``'s): it waited behind another
                # epoch's (cluster probe: a master resumed after its replica took over ran the
                # script calls queued for it and published their events, of its lost epoch;
                # the live events that came behind them, which history had given meanwhile,
                # were taken for a gap history could not fill, and the party's clients resynced)
                return
            else:
                self._count_gap("resync")
                log.warning(
                    "party stream: history lacks what precedes a live event: clients resync",
                    extra={
                        "party_id": self.party_id,
                        "last_seq": self.last,
                        "seq": first.event.seq,
                    },
                )
                for listener in list(self.listeners):
                    listener.on_resync()
                self.last = first.event.seq - 1
                return

    def _not_ours(self, message: Sequenced) -> None:
        """An event of an epoch that history does not hold: an epoch Redis lost, or another
        deployment's, publishing on the same ``party:<party_id>`` channel (pub/sub channels are
        the server's, whatever the database number: new user probe, two deployments on one
        Redis on databases 0 and 2). Its later events are dropped at once, and the operator is
        told: such a deployment's unsequenced messages (action.accepted, narration, refusals)
        reach this one's players too."""
        if message.epoch in self._foreign:
            return
        self._foreign.append(message.epoch)
        del self._foreign[:-FOREIGN_EPOCHS]
        count = self._foreign_log.admit(self._monotonic())
        if count is not None:
            log.warning(
                "party:%s carries events of an epoch this deployment's Redis does not hold "
                "(dropped): a lost epoch's, published late (a Redis Cluster master resumed "
                "after its replica took over runs what was queued for it), or another "
                "deployment publishing on the same channel? Deployments that share a Redis "
                "server, whatever their database numbers, must use different party ids "
                "(docs/redis.md); %d such epoch(s) on this node since the last line",
                self.party_id,
                count + 1,
                extra={"party_id": self.party_id, "epoch": message.epoch},
            )

    def _tell(self, items: list[Transient]) -> None:
        for listener in list(self.listeners):
            try:
                listener.on_transient(items)
            except Exception:  # one broken listener must not starve the others
                log.exception("listener failed", extra={"party_id": self.party_id})

    def _drain(self) -> bool:
        """Deliver pending live messages in order; False at the first event that does not
        follow."""
        while self.pending:
            message = self.pending.popleft()
            if isinstance(message, list):
                self._tell(message)
                continue
            if not self._apply(message):
                self.pending.appendleft(message)
                return False
        return True

    def _apply(self, message: Sequenced) -> bool:
        """Deliver if next, drop if already delivered; False on a gap or another epoch."""
        if message.epoch != self.epoch:
            return False
        seq = message.event.seq
        if seq <= self.last:
            return True
        if seq != self.last + 1:
            return False
        self.last = seq
        for listener in list(self.listeners):
            try:
                listener.on_event(message.event)
            except Exception:  # one broken listener must not starve the others
                log.exception("listener failed", extra={"trace_id": message.event.trace_id})
        return True

    def close(self) -> None:
        self.closed = True
        self.pending.clear()
        if self._task is not None:
            self._task.cancel()
