"""One client connection as the party core sees it: what it is bound to, where its stream is.

No socket here: the gateway's ``Session`` extends this with the transport's sink. The core
decides what a connection receives; the gateway sends it.

Until ``go_live`` a connection is *syncing*: live events are buffered while its ``system.hello``
(and any replay) is prepared, then delivered in seq order with duplicates dropped, so the stream
a client sees starts exactly after the hello's ``seq`` (docs/protocol.md, "Resuming"). Transient
messages (``core.transient``) are buffered with them, in arrival order, and delivered unless the
hello already told them: a narration piece the hello's text holds, a piece of a stream the hello
does not know that is not its first, an ``action.accepted`` whose result the hello includes.
"""

from __future__ import annotations

from enum import Enum

from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.core.limits import ConnectionLimits
from party_sync.core.sequence import SeqTracker, SeqVerdict
from party_sync.core.transient import Transient
from party_sync.protocol import types as t


class Offer(Enum):
    """What to do with a party event offered to a connection."""

    SEND = "send"  # the next event: send it now
    HOLD = "hold"  # syncing, buffered (or the connection is closed): nothing now
    DROP = "drop"  # a duplicate (a replay overlap): nothing
    GAP = "gap"  # events are missing before it: the connection must resync


#: Final refusals a connection remembers having been told (``Connection.tell_once``): enough for
#: a client that has every message refused at the default rate limit (30/s, burst 60) until the
#: action's deadline look (10 s) and more. 16 were forgotten by a client acting six times a second,
#: most of it refused, before its action's deadline: the refusal it had was sent to it again at
#: the deadline (Cluster and Sentinel probe). Memory only for connections that were refused.
TOLD_KEEP = 512


class Connection:
    """A connection bound to its token's party, run and character (``binding``)."""

    __slots__ = (
        "binding",
        "buffer",
        "character_id",
        "closed",
        "epoch",
        "expires_at",
        "id",
        "limits",
        "party_id",
        "told",
        "tracker",
    )

    def __init__(
        self, connection_id: str, binding: Binding, limits: ConnectionLimits, expires_at: float
    ) -> None:
        self.id = connection_id
        self.binding = binding
        # copied out of ``binding`` (never rebound): read on every action and fan-out, where a
        # property costs a Python call each time
        self.party_id = binding.party_id
        self.character_id = binding.character_id
        self.limits = limits
        self.expires_at = expires_at
        self.tracker = SeqTracker(0)
        self.buffer: list[Event | Transient] | None = []  # None once live
        self.closed = False
        #: The party history's epoch of its hello (before it: the one a resync while it opened
        #: said the party's stream went on in, which its hello must be of; else None)
        self.epoch: str | None = None
        #: The actions whose final refusal reached this connection unasked (``tell_once``)
        self.told: dict[str, None] | None = None

    def tell_once(self, action_id: str) -> bool:
        """True the first time the final refusal of ``action_id`` comes to this connection from
        the character's channel; False after (the last ``TOLD_KEEP`` actions are remembered).
        A refusal goes there from the node that made it, and again at the action's deadline
        from the node that accepted it when its sender had moved to another node meanwhile:
        that node cannot know the sender was told."""
        told = self.told
        if told is None:
            told = self.told = {}
        elif action_id in told:
            return False
        told[action_id] = None
        if len(told) > TOLD_KEEP:
            del told[next(iter(told))]
        return True

    def offer(self, event: Event) -> Offer:
        """Offer the next party event (``PartySessions`` inlines the common case)."""
        if self.closed:
            return Offer.HOLD
        if self.buffer is not None:
            self.buffer.append(event)
            return Offer.HOLD
        verdict = self.tracker.observe(event.seq)
        if verdict is SeqVerdict.DELIVER:
            return Offer.SEND
        # a gap: the backend repairs gaps before delivering; reaching here means it could not
        return Offer.GAP if verdict is SeqVerdict.GAP else Offer.DROP

    def go_live(
        self, last_seq: int, streams: dict[str, int] | None = None
    ) -> tuple[list[bytes], bool]:
        """The client holds everything up to ``last_seq`` and, of each open narration stream in
        ``streams``, the pieces up to its index: the buffered frames to send after that, and
        whether a gap was met among them (then the connection must resync)."""
        self.tracker = SeqTracker(last_seq)
        buffered, self.buffer = self.buffer or [], None
        known = dict(streams or {})
        told = {  # actions whose result the hello includes: their action.accepted is stale
            item.payload["action_id"]
            for item in buffered
            if type(item) is Event and item.type == t.ACTION_RESULT and item.seq <= last_seq
        }
        frames: list[bytes] = []
        for item in buffered:
            if type(item) is Transient:
                if item.type == t.NARRATION_DELTA:
                    last = known.get(item.key)
                    if (item.position == 0) if last is None else item.position > last:
                        known[item.key] = item.position
                        frames.append(item.data)
                elif item.type != t.ACTION_ACCEPTED or item.key not in told:
                    frames.append(item.data)
                continue
            assert type(item) is Event
            offer = self.offer(item)
            if offer is Offer.SEND:
                frames.append(item.data)
            elif offer is Offer.GAP:
                return frames, True
        return frames, False
