"""The embedded backend: one process, all state in memory. The default with no Redis configured.

It is a real product backend, not a test double: every operation is synchronous code over the pure
core (so each is atomic), events are delivered to listeners inline and in order, and parties that
have been idle longer than ``idle_party_ttl`` are forgotten (a later connection starts a new epoch,
so no client trusts a seq from the forgotten history), with any vote decision not yet handed to the
engine, as a Redis party's ``unapplied`` expires with its ``meta``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from party_sync.backends.base import (
    BackendSettings,
    PartyListener,
    another_actor,
    checked_body,
    warn_result_after_refusal,
)
from party_sync.backends.memory_admin import MemoryAdmin
from party_sync.backends.memory_party import MemoryParty
from party_sync.core import votes
from party_sync.core.actions import Claim, Decision, Sweep, Verdict
from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.core.presence import announce_again
from party_sync.core.published import repeated, replayed, shape, unpublished
from party_sync.core.snapshot import Snapshot
from party_sync.core.transient import (
    GONE,
    Outcome,
    Piece,
    Transient,
    accepted,
    closing_piece,
    failed,
)
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import InvalidEvent, VoteConflict

log = logging.getLogger(__name__)


def _decoded(party_id: str, data: bytes) -> Event:
    message = codec.decode(data)
    return Event(
        party_id, message["seq"], message["type"], message["payload"], message["trace_id"], data
    )


def _kept(party_id: str, body: bytes) -> Event:
    """A kept ``vote.finished`` body (no seq) as ``unapplied_votes`` hands it over: seq 0."""
    message = codec.decode(body)
    return Event(party_id, 0, message["type"], message["payload"], message["trace_id"], body)


class _Subscription:
    def __init__(self, detach: Callable[[], None]) -> None:
        self._detach: Callable[[], None] | None = detach

    async def close(self) -> None:
        if self._detach is not None:
            self._detach()
            self._detach = None


class MemoryBackend:
    """All parties of one process."""

    name = "memory"

    def __init__(self, settings: BackendSettings | None = None) -> None:
        self.settings = settings or BackendSettings()
        self._parties: dict[str, MemoryParty] = {}
        self._runs: dict[str, set[str]] = {}  # campaign_run_id → party ids
        self.admin = MemoryAdmin(self._parties)  # the operators' view (AdminView)

    def clock(self) -> float:
        return time.time()

    def clock_known(self) -> bool:
        return True  # the machine's clock is the deployment's

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._parties.clear()

    async def ready(self) -> bool:
        return True

    def _party(self, party_id: str, now: float = 0.0) -> MemoryParty:
        party = self._parties.get(party_id)
        if party is None:
            party = self._parties[party_id] = MemoryParty(party_id, self.settings, now)
        return party

    # -- the stream -------------------------------------------------------------------------
    def _publish(
        self,
        party: MemoryParty,
        message: dict[str, Any],
        now: float,
        body: bytes | None = None,
        key: str | None = None,
    ) -> Event:
        seq = party.log.top_seq + 1
        type_, payload = message["type"], message["payload"]
        if type_ == t.ACTION_RESULT:
            _same_actor(party, payload)  # (a late copy's too: the first named the action's)
            earlier = party.ledger.result_of(payload["action_id"])
            if earlier is not None:  # idempotent: a redelivered action's result is not re-sent
                return _decoded(party.party_id, earlier)
        elif key is not None:
            first = party.published.first(key, now, shape([message]))  # (may raise)
            if first is not None:  # published under this key already: that one stands
                again = codec.encode(message) if body is None else body
                return repeated(party.party_id, first, message, again)
        if body is None:  # raises (unencodable, too large) before anything is recorded
            body = checked_body(message, self.settings.max_event_bytes)  # (or publish_many)
        party.projection.apply(type_, payload, seq)  # raises before anything is recorded
        data = codec.with_seq(body, seq)
        party.log.append(data, now)
        party.last_active = now
        refused = type_ == t.ACTION_RESULT and party.ledger.complete(
            payload["action_id"], payload["character_id"], data, now
        )
        if key is not None and type_ != t.ACTION_RESULT:
            party.published.record(key, seq, now, shape([message]))
        if refused:
            warn_result_after_refusal(log, message["trace_id"], payload["action_id"])
        event = Event(party.party_id, seq, type_, payload, message["trace_id"], data)
        for listener in list(party.listeners):
            try:
                listener.on_event(event)
            except Exception:  # one broken listener must not starve the others
                log.exception("listener failed", extra={"trace_id": event.trace_id})
        return event

    async def publish(
        self, party_id: str, message: dict[str, Any], now: float, *, key: str | None = None
    ) -> Event:
        if key is not None and message["type"] == t.ACTION_RESULT:  # the key's, then the action's
            return (await self.publish_many(party_id, [message], now, key=key))[0]
        return self._publish(self._party(party_id, now), message, now, key=key)

    async def publish_many(
        self,
        party_id: str,
        messages: Sequence[dict[str, Any]],
        now: float,
        *,
        key: str | None = None,
    ) -> list[Event]:
        """One atomic step (no await between the events): each is delivered inline, so all in
        this tick. Checked first: an event that cannot be encoded records none of them."""
        limit = self.settings.max_event_bytes  # (checked: raises before anything is recorded)
        bodies = [checked_body(m, limit) for m in messages]
        party = self._party(party_id, now)
        if key is not None and len(messages) == 1 and messages[0]["type"] != t.ACTION_RESULT:
            return [self._publish(party, messages[0], now, bodies[0], key=key)]  # as publish
        # the key first (a retry of a published call gets its seqs, whatever it holds), then a
        # late copy of an answer (as publish_many.lua)
        request = "" if key is None else shape(messages)
        first = None if key is None else party.published.first(key, now, request)  # (may raise)
        if first is not None:  # the call under this key was published: each event's seq in it
            return [
                repeated(party_id, first + i, m, body)
                for i, (m, body) in enumerate(zip(messages, bodies, strict=True))
            ]
        earlier = replayed(messages, party.ledger.result_of)
        if earlier is not None:  # a late copy of an answer published whole already
            _same_actors(party, messages)  # (a copy names the actions' characters, as the first)
            return [
                _decoded(party_id, data) if data is not None else unpublished(party_id, m, body)
                for m, body, data in zip(messages, bodies, earlier, strict=True)
            ]
        _same_actors(party, messages)  # (as publish_many.lua: before anything is recorded)
        top = party.log.top_seq
        events = [self._publish(party, messages[i], now, body) for i, body in enumerate(bodies)]
        if key is not None and party.log.top_seq > top:  # the first event it sequenced
            party.published.record(key, top + 1, now, request)
        return events

    async def publish_run(self, campaign_run_id: str, message: dict[str, Any]) -> None:
        """Nothing to do: in one process nobody listens on the run channel (the parties of the
        run got the message through ``publish``); Redis mode publishes it for other services."""

    async def subscribe(self, party_id: str, listener: PartyListener) -> _Subscription:
        party = self._party(party_id)
        party.listeners.append(listener)

        def detach() -> None:
            if listener in party.listeners:
                party.listeners.remove(listener)

        return _Subscription(detach)

    async def send_direct(self, party_id: str, character_id: str, data: bytes) -> None:
        party = self._parties.get(party_id)
        if party is not None:
            for listener in list(party.listeners):
                listener.on_direct(character_id, data)

    async def run_parties(self, campaign_run_id: str) -> list[str]:
        return sorted(p for p in self._runs.get(campaign_run_id, ()) if p in self._parties)

    async def snapshot(self, party_id: str, now: float | None = None) -> Snapshot:
        return self._party(party_id).snapshot(time.time() if now is None else now)

    @staticmethod
    def _tell(party: MemoryParty, items: Sequence[Transient]) -> None:
        """Deliver transient messages to the party's listeners, inline and in order."""
        for listener in list(party.listeners):
            try:
                listener.on_transient(items)
            except Exception:  # one broken listener must not starve the others
                log.exception("listener failed", extra={"party_id": party.party_id})

    async def replay(
        self, party_id: str, point: ResumePoint, max_replay: int
    ) -> Sequence[bytes] | None:
        party = self._parties.get(party_id)
        if party is None:
            return None
        return party.log.replay(point, max_replay)

    # -- presence ---------------------------------------------------------------------------
    async def connect(
        self, binding: Binding, connection_id: str, now: float, trace_id: str
    ) -> Event | None:
        party = self._party(binding.party_id, now)
        self._runs.setdefault(binding.campaign_run_id, set()).add(binding.party_id)
        party.run_id = binding.campaign_run_id
        party.presence.connect(binding.character_id, connection_id, now)
        party.last_active = now
        if party.projection.is_online(binding.character_id):
            return None
        payload = {"character_id": binding.character_id, "display_name": binding.display_name}
        return self._publish(
            party, codec.envelope(t.PARTY_JOIN, payload, ts=now, trace_id=trace_id), now
        )

    async def hand_over_grace(self, binding: Binding, since: float) -> None:
        return None  # no other node: the process and its presence end with the drain

    async def disconnect(
        self, binding: Binding, connection_id: str, now: float, *, handover: bool = False
    ) -> bool:
        # (handover: no other node; the process and its presence end with the drain)
        party = self._party(binding.party_id, now)
        party.last_active = now
        return party.presence.disconnect(binding.character_id, connection_id, now)

    def _leave(
        self, party: MemoryParty, character_id: str, reason: str, now: float, trace_id: str
    ) -> Event:
        payload = {"character_id": character_id, "reason": reason}
        return self._publish(
            party, codec.envelope(t.PARTY_LEAVE, payload, ts=now, trace_id=trace_id), now
        )

    async def settle(
        self, binding: Binding, now: float, trace_id: str, since: float | None = None
    ) -> Event | None:
        party = self._parties.get(binding.party_id)
        if party is None:
            return None
        cid = binding.character_id
        if since is not None and not party.presence.grace_is_current(cid, since):
            return None
        if party.presence.is_connected(cid, now) or not party.projection.is_online(cid):
            return None
        return self._leave(party, cid, t.LEAVE_DISCONNECTED, now, trace_id)

    async def leave(self, binding: Binding, now: float, trace_id: str) -> Event | None:
        party = self._parties.get(binding.party_id)
        if party is None or binding.character_id not in party.projection.members:
            return None
        party.presence.mark_left(binding.character_id, now)
        return self._leave(party, binding.character_id, t.LEAVE_LEFT, now, trace_id)

    async def refresh(self, connections: Sequence[tuple[Binding, str]], now: float) -> list[Event]:
        events: list[Event] = []
        for binding, connection_id in connections:
            party = self._party(binding.party_id, now)
            cid = binding.character_id
            party.presence.refresh(cid, connection_id, now)
            online = party.projection.is_online(cid)
            if announce_again(online=online, left=party.presence.has_left(cid, now)):
                party.run_id = binding.campaign_run_id
                self._runs.setdefault(binding.campaign_run_id, set()).add(binding.party_id)
                payload = {"character_id": cid, "display_name": binding.display_name}
                message = codec.envelope(t.PARTY_JOIN, payload, ts=now)
                events.append(self._publish(party, message, now))
        return events

    async def expire(self, now: float) -> list[Event]:
        events: list[Event] = []
        for party_id, party in list(self._parties.items()):
            party.published.collect(now)
            # by character id, as expire.lua does: simultaneous leaves get the same seqs on both
            for character_id in sorted(party.presence.expire(now)):
                if party.projection.is_online(character_id):
                    trace_id = codec.new_trace_id()
                    events.append(self._leave(party, character_id, t.LEAVE_EXPIRED, now, trace_id))
            idle = now - party.last_active > self.settings.idle_party_ttl
            if idle and not party.listeners and not party.presence.connection_count(now):
                # its unapplied decisions go with it (Redis: ``unapplied`` expires with ``meta``)
                del self._parties[party_id]
                for run_id, parties in list(self._runs.items()):
                    parties.discard(party_id)
                    if not parties:  # a run with no party left is forgotten (Redis: its key
                        del self._runs[run_id]  # expires with its last party)
        return events

    # -- votes ------------------------------------------------------------------------------
    async def party_run(self, party_id: str) -> str | None:
        party = self._parties.get(party_id)
        return party.run_id if party is not None else None

    async def start_vote(
        self, party_id: str, spec: votes.VoteSpec, campaign_run_id: str, now: float, trace_id: str
    ) -> Event:
        party = self._party(party_id, now)
        conflict = votes.start_conflict(party.vote, spec)
        if conflict is not None:
            raise VoteConflict(conflict)
        vote = votes.open_vote(spec, now, trace_id, campaign_run_id)
        payload = votes.started_payload(vote, codec.rfc3339(vote.deadline))
        event = self._publish(
            party, codec.envelope(t.VOTE_STARTED, payload, ts=now, trace_id=trace_id), now
        )
        party.vote = vote
        return event

    async def cast_vote(
        self, party_id: str, character_id: str, vote_id: str, option: str, now: float, trace_id: str
    ) -> tuple[votes.CastRefusal | None, list[Event]]:
        party = self._parties.get(party_id)
        vote = party.vote if party is not None else None
        refusal = votes.cast(vote, vote_id, character_id, option, now)
        if refusal is not None or party is None or vote is None:
            return refusal or votes.CastRefusal.UNKNOWN, []
        online = party.projection.online()
        update = votes.update_payload(vote, online)
        events = [
            self._publish(
                party, codec.envelope(t.VOTE_UPDATE, update, ts=now, trace_id=trace_id), now
            )
        ]
        if votes.due(vote, online, now) == "all_voted":
            events.append(self._finish(party, vote, "all_voted", now))
        return None, events

    def _finish(self, party: MemoryParty, vote: votes.Vote, reason: str, now: float) -> Event:
        """Publish ``vote.finished`` and keep its body (by vote id, as Redis keeps it in
        ``unapplied``) until its action was handed to the engine: a decision announced is never
        lost, whatever votes come after it, unless the whole party is forgotten (``expire``)."""
        outcome = votes.decide(vote, reason)
        payload = votes.finished_payload(vote, outcome)
        message = codec.envelope(t.VOTE_FINISHED, payload, ts=now, trace_id=vote.trace_id)
        event = self._publish(party, message, now)
        party.unapplied[vote.vote_id] = (now, codec.encode(message))
        return event

    async def unapplied_votes(self, now: float, older_than: float) -> list[Event]:
        """What Redis hands over, in its order: parties by their last vote's deadline (then id,
        the vote index's order), each party's decisions oldest first (then by vote id); each one
        the kept ``vote.finished`` body, seq 0 (not re-sequenced)."""
        waiting = [(p.vote.deadline, i) for i, p in self._parties.items() if p.vote and p.unapplied]
        events: list[Event] = []
        for _, party_id in sorted(waiting):
            kept = self._parties[party_id].unapplied
            for at, _, body in sorted((at, v, body) for v, (at, body) in kept.items()):
                if at <= now - older_than:
                    events.append(_kept(party_id, body))
        return events

    async def mark_vote_applied(self, party_id: str, vote_id: str) -> None:
        party = self._parties.get(party_id)
        if party is not None:  # nothing to do for an open, unknown or already marked vote
            party.unapplied.pop(vote_id, None)

    async def finish_vote(self, party_id: str, vote_id: str, now: float) -> Event | None:
        party = self._parties.get(party_id)
        vote = party.vote if party is not None else None
        if party is None or vote is None or vote.vote_id != vote_id:
            return None
        online = party.projection.online()
        reason = votes.due(vote, online, now)  # the deadline, or all still online voted
        if reason is None:
            told = party.projection.vote
            update = votes.recount(vote, online, None if told is None else told.get("eligible"))
            if update is not None:
                message = codec.envelope(t.VOTE_UPDATE, update, ts=now, trace_id=vote.trace_id)
                self._publish(party, message, now)
            return None
        return self._finish(party, vote, reason, now)

    async def due_votes(self, now: float) -> list[tuple[str, str]]:
        return [
            (party_id, party.vote.vote_id)
            for party_id, party in self._parties.items()
            if party.vote is not None and votes.due(party.vote, (), now) == "timeout"
        ]

    async def vote_run(self, party_id: str, vote_id: str) -> str | None:
        """The campaign run a vote's decision goes to: the vote's own, or the party's (a decision
        kept after a newer vote started: the party's current vote is another one)."""
        party = self._parties.get(party_id)
        if party is None:
            return None
        if party.vote is None or party.vote.vote_id != vote_id:
            return party.run_id
        return party.vote.campaign_run_id or party.run_id

    # -- actions ----------------------------------------------------------------------------
    async def begin_action(
        self,
        party_id: str,
        character_id: str,
        action_id: str,
        now: float,
        timed: bool = True,
        action_type: str = "choice",
        trace_id: str = "",
        claimed: bool = False,
        deadline_in: float | None = None,
    ) -> Verdict:
        party = self._party(party_id, now)
        verdict = party.ledger.begin(
            character_id, action_id, now, timed, action_type, claimed, deadline_in
        )
        if verdict.decision is Decision.ACCEPT and party.listeners:
            self._tell(party, [accepted(action_id, character_id, action_type, trace_id, now)])
        return verdict

    def _failed(
        self,
        party: MemoryParty,
        action_id: str,
        character_id: str | None,
        refusal: bytes,
        now: float,
    ) -> None:
        """Tell every member that the action's final answer is ``refusal``."""
        notice = failed(action_id, character_id, refusal, now) if character_id else None
        if notice is not None and party.listeners:
            self._tell(party, [notice])

    async def claim_action(
        self,
        party_id: str,
        action_id: str,
        now: float,
        refusal: bytes,
        deadline: float | None,
        claimer: str | None = None,  # one process: nobody to take over from
    ) -> tuple[Claim, bytes | str | None]:
        party = self._parties.get(party_id)
        if party is None:  # the party's state is gone: the action may start unless it is late
            late = deadline is not None and now > deadline
            return (Claim.EXPIRED if late else Claim.START), None
        character_id = party.ledger.character_of(action_id)
        claim, answer = party.ledger.claim(action_id, now, refusal, deadline)
        if claim is Claim.EXPIRED and character_id is not None:
            self._failed(party, action_id, character_id, refusal, now)
            return claim, character_id
        return claim, answer

    async def action_claimer(self, party_id: str, action_id: str) -> str | None:
        return None  # one process: nobody to take over from

    async def action_answered(self, party_id: str, action_id: str) -> bool:
        party = self._parties.get(party_id)
        return party is not None and party.ledger.answered(action_id)

    async def time_out_action(
        self, party_id: str, action_id: str, now: float, refusal: bytes
    ) -> tuple[Sweep, bytes | None]:
        party = self._parties.get(party_id)
        if party is None:
            return Sweep.GONE, None
        character_id = party.ledger.character_of(action_id)
        outcome, answer = party.ledger.time_out(action_id, now, refusal)
        if outcome is Sweep.TIMED_OUT:
            self._failed(party, action_id, character_id, refusal, now)
        return outcome, answer

    async def refuse_action(
        self, party_id: str, action_id: str, character_id: str, refusal: bytes, now: float
    ) -> str | None:
        party = self._party(party_id, now)
        owner = party.ledger.character_of(action_id) or character_id
        told = party.presence.is_connected(owner, now)  # (a live connection: it reaches it)
        if not party.ledger.refuse(action_id, owner, refusal, now, told):
            return None
        self._failed(party, action_id, owner, refusal, now)
        return owner

    async def node_alive(self, node_id: str) -> bool:
        return True  # one process: its in-process engine's actions die with it, and so does this

    async def take_over(self, party_id: str, action_id: str, gone: str, now: float) -> bool:
        return False  # never asked: this backend reports no claimer

    # -- narration --------------------------------------------------------------------------
    async def narrate(self, party_id: str, pieces: Sequence[Piece], now: float) -> list[Outcome]:
        party = self._party(party_id, now)
        party.last_active = now
        ledger = party.ledger
        outcomes = [
            party.narration.take(
                p, now, p.action_id is not None and ledger.result_of(p.action_id) is not None
            )
            for p in pieces
        ]
        taken = [p.transient() for p, o in zip(pieces, outcomes, strict=True) if o is Outcome.TAKEN]
        if taken:
            self._tell(party, taken)
        return outcomes

    async def close_narration(
        self,
        party_id: str,
        stream_id: str,
        now: float,
        trace_id: str,
        action_id: str | None = None,
    ) -> float | str | None:
        party = self._parties.get(party_id)
        if party is None:
            return GONE
        answered = action_id is not None and party.ledger.result_of(action_id) is not None
        closed = party.narration.close_idle(stream_id, now, action_id if answered else None)
        if not isinstance(closed, tuple):
            return closed
        index, action_id = closed
        self._tell(party, [closing_piece(stream_id, index, action_id, trace_id, now).transient()])
        return None


def _same_actors(party: MemoryParty, messages: Sequence[Mapping[str, Any]]) -> None:
    """``_same_actor`` for each ``action.result`` of ``messages``."""
    for message in messages:
        if message["type"] == t.ACTION_RESULT:
            _same_actor(party, message["payload"])


def _same_actor(party: MemoryParty, payload: Mapping[str, Any]) -> None:
    """``InvalidEvent`` for an ``action.result`` naming another character than its action's."""
    owner = party.ledger.actor_of(payload["action_id"])
    if owner is not None and owner != payload["character_id"]:
        raise InvalidEvent(another_actor(payload, owner))
