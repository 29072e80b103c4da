"""A party's whole life through the party core, in virtual time: no socket, no sleep.

A small driver carries out the core's commands against the real in-memory backend (its methods
are coroutines that finish without waiting, so each is run to its end at once), feeds every
answer back, and moves the clock by hand: a 30-second vote or a 10-second grace takes no time.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.backends.base import BackendSettings
from party_sync.backends.memory import MemoryBackend
from party_sync.core import transient, votes
from party_sync.core.actions import Claim, Decision, Verdict
from party_sync.core.binding import Binding
from party_sync.core.commands import (
    Announce,
    ApplyVote,
    BeginAction,
    CastVote,
    Close,
    CloseNarration,
    Command,
    Connect,
    Disconnect,
    FailAction,
    FinishVote,
    HandOverGrace,
    Leave,
    PendingAction,
    Refresh,
    Refused,
    Send,
    SendDirect,
    Settle,
    Submit,
    SubmitVote,
    SweepVotes,
    TimeOut,
    Unsubscribe,
)
from party_sync.core.connection import Connection
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.core.limits import ConnectionLimits, LimitPolicy
from party_sync.core.session import OVERDUE_GRACE, PartySessions, Rules
from party_sync.core.transient import Transient
from party_sync.protocol import codec
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable, CloseCode
from party_sync.protocol.schemas import Contracts

T = TypeVar("T")
C = TypeVar("C", bound=Command)
T0 = 1_800_000_000.0
RULES = Rules(action_timeout=5.0, presence_grace=10.0, presence_ttl=30.0)
CONTRACTS = Contracts()


def done(coro: Coroutine[Any, Any, T]) -> T:
    """Run a memory-backend coroutine that never waits."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise AssertionError("the memory backend waited")


class Meter:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.latencies: list[float] = []

    def received(self, type_: str) -> None:
        self.count("in", type_)

    def sent(self, type_: str, recipients: int = 1) -> None:
        self.counts[("out", type_)] = self.counts.get(("out", type_), 0) + recipients

    def count(self, family: str, label: str) -> None:
        self.counts[(family, label)] = self.counts.get((family, label), 0) + 1

    def connections(self, count: int) -> None:
        self.count("gauge", "connections")

    def engine_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def overdue(self, party_id: str, action_id: str, trace_id: str) -> None:
        self.count("overdue", action_id)

    def forgotten(self, party_id: str, action_id: str, trace_id: str) -> None:
        self.count("forgotten", action_id)


class Node:
    """The gateway's job, synchronously: commands in, backend calls, answers fed back."""

    def __init__(self, backend: MemoryBackend | None = None, rules: Rules = RULES) -> None:
        self.now = T0
        self.backend = backend or MemoryBackend(
            BackendSettings(action_timeout=rules.action_timeout)
        )
        self.meter = Meter()
        self.core = PartySessions(rules, CONTRACTS, self.meter)
        self.frames: dict[str, list[dict[str, Any]]] = {}
        self.closes: dict[str, tuple[int, str]] = {}
        self.engine: list[PendingAction] = []  # actions handed to the engine
        self.announced: list[Announce] = []
        self.refused: list[str] = []
        self.handed_over: list[tuple[str, float]] = []  # graces running at a drain
        self.unavailable = False  # the backend fails every call while set
        self.subscribed: set[str] = set()
        self.ids = itertools.count(1)
        self.core.start(self.now)

    # -- the driver -----------------------------------------------------------------------------
    def recorded(self, kind: type[C]) -> list[C]:
        """From now on, every command of class ``kind`` the node carries out, in order."""
        seen: list[C] = []
        step = self.step

        def recording(c: Command) -> list[Command]:
            if isinstance(c, kind):
                seen.append(c)
            return step(c)

        self.step = recording  # type: ignore[method-assign]
        return seen

    def run(self, commands: list[Command]) -> None:
        for command in commands:
            self.run(self.step(command))

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.unavailable:
            coro.close()
            raise BackendUnavailable("down")
        return done(coro)

    def step(self, c: Command) -> list[Command]:
        core, b = self.core, self.backend
        if isinstance(c, Send):
            for conn in c.to:
                if conn.id not in self.closes:
                    self.frames.setdefault(conn.id, []).append(orjson.loads(c.data))
            return []
        if isinstance(c, Close):
            self.closes.setdefault(c.conn.id, (c.code, c.reason))
            return []
        if isinstance(c, Refused):
            self.refused.append(c.code.value)
            return []
        if isinstance(c, Unsubscribe):
            self.subscribed.discard(c.party_id)
            return []
        if isinstance(c, Announce):
            self.announced.append(c)
            return []
        if isinstance(c, Connect):
            if c.conn.party_id not in self.subscribed:
                self.subscribed.add(c.conn.party_id)
                done(b.subscribe(c.conn.party_id, Listener(self, c.conn.party_id)))
            try:
                join = self.call(b.connect(c.conn.binding, c.conn.id, c.now, c.trace_id))
                snap = self.call(b.snapshot(c.conn.party_id, c.now))
            except BackendUnavailable:
                return core.open_failed(c.conn, self.now)
            # a resume is always answered with the snapshot here (no replay)
            return core.opened(
                c.conn, join=join, snapshot=snap, replay=None, resume=c.resume, now=self.now
            )
        if isinstance(c, Disconnect):
            try:
                last = self.call(b.disconnect(c.conn.binding, c.conn.id, c.now))
            except BackendUnavailable:
                return []
            return core.disconnected(c.conn, last, c.now, c.handover)
        if isinstance(c, HandOverGrace):
            self.handed_over.append((c.binding.character_id, c.since))
            self.call(b.hand_over_grace(c.binding, c.since))
            return []
        if isinstance(c, Settle):
            try:
                left = self.call(b.settle(c.binding, c.now, c.trace_id, c.since))
                return core.settled(left is not None)
            except BackendUnavailable:
                return core.settle_failed()
        if isinstance(c, BeginAction):
            p = c.message.payload
            try:
                verdict = self.call(
                    b.begin_action(
                        c.conn.party_id,
                        p["character_id"],
                        p["action_id"],
                        c.now,
                        True,
                        p["action_type"],
                        c.message.trace_id,
                        deadline_in=c.deadline_in,
                    )
                )
            except BackendUnavailable:
                verdict = None
            return core.action_verdict(c, verdict)
        if isinstance(c, Submit):
            if self.unavailable:
                return core.submit_failed(c, unavailable=True)
            self.engine.append(c.action)
            return []
        if isinstance(c, SubmitVote):
            try:
                if c.action is not None:
                    self.engine.append(c.action)
                self.call(b.mark_vote_applied(c.finished.party_id, c.finished.payload["vote_id"]))
            except BackendUnavailable:
                return core.vote_failed(c, self.now)
            return core.vote_applied(c.finished)
        if isinstance(c, FailAction):
            return []
        if isinstance(c, TimeOut):
            a = c.action
            try:
                outcome, answer = self.call(
                    b.time_out_action(a.party_id, a.action_id, c.now, c.refusal)
                )
            except BackendUnavailable:
                return core.time_out_failed(c)
            return core.timed_out(c, outcome, answer)
        if isinstance(c, SendDirect):
            done(b.send_direct(c.party_id, c.character_id, c.data))
            return []
        if isinstance(c, Leave):
            return core.left(c, self.call(b.leave(c.conn.binding, c.now, c.message.trace_id)))
        if isinstance(c, CastVote):
            p = c.message.payload
            refusal, events = self.call(
                b.cast_vote(
                    c.conn.party_id, c.conn.character_id, p["vote_id"], p["option"], c.now, "t"
                )
            )
            return core.vote_cast(c, refusal, events)
        if isinstance(c, FinishVote):
            try:
                event = self.call(b.finish_vote(c.party_id, c.vote_id, c.now))
            except BackendUnavailable:
                return core.vote_failed(c, self.now)
            return core.vote_finished(c, event)
        if isinstance(c, ApplyVote):
            f = c.finished
            try:
                run = self.call(b.vote_run(f.party_id, f.payload["vote_id"]))
                verdict = self.call(
                    b.begin_action(
                        f.party_id,
                        t.PARTY_ACTOR,
                        f.payload["applied"]["action_id"],
                        c.now,
                        timed=False,
                    )
                )
            except BackendUnavailable:
                return core.vote_failed(c, self.now)
            return core.vote_verdict(c, run, verdict)
        if isinstance(c, CloseNarration):
            try:
                again = self.call(b.close_narration(c.party_id, c.stream_id, c.now, c.trace_id))
            except BackendUnavailable:
                return core.narration_failed(c)
            return core.narration_looked(c, again)
        if isinstance(c, Refresh):
            try:
                rejoined = self.call(b.refresh(c.connections, c.now))
                if c.sweep:
                    self.call(b.expire(c.now))
            except BackendUnavailable:
                return core.refreshed(c, None, ok=False)
            return core.refreshed(c, rejoined, ok=True)
        assert isinstance(c, SweepVotes)
        try:
            due = self.call(b.due_votes(c.now))
            unapplied = self.call(b.unapplied_votes(c.now, c.unapplied_after))
            out = core.votes_swept(c, due, unapplied)
        except BackendUnavailable:
            out = []
        core.tick_done(c.now)
        return out

    # -- what happens ---------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Move the clock, reaching every deadline on the way in order (as the gateway's timer)."""
        end = self.now + seconds
        while True:
            due = self.core.deadlines.next_due()
            if due is None or due > end:
                break
            self.now = max(self.now, due)
            for commands in self.core.deadlines_reached(self.now):
                self.run(commands)
        self.now = end

    def join(
        self,
        character: str,
        party: str = "p1",
        expires_in: float = 3600.0,
        resume: ResumePoint | None = None,
    ) -> Connection:
        binding = Binding(party, "r1", character, character.title())
        conn = Connection(
            f"n.{next(self.ids)}", binding, ConnectionLimits(LimitPolicy()), self.now + expires_in
        )
        self.run(self.core.open(conn, resume, self.now))
        return conn

    def lose(self, conn: Connection) -> None:
        self.run(self.core.connection_lost(conn, self.now))

    def send(self, conn: Connection, message: dict[str, Any]) -> None:
        self.run(self.core.receive(conn, orjson.dumps(message), self.now))

    def act(
        self, conn: Connection, action_id: str, character: str | None = None, run: str = "r1"
    ) -> None:
        self.send(conn, action(action_id, character or conn.character_id, run))

    def start(self, pending: PendingAction) -> None:
        """An engine host claims the action (START), and has said nothing yet."""
        claim, _ = done(
            self.backend.claim_action(
                pending.party_id, pending.action_id, self.now, b"{}", pending.deadline
            )
        )
        assert claim is Claim.START

    def answer(self, pending: PendingAction) -> None:
        """The engine claims the action and publishes its result (an engine host's job)."""
        self.start(pending)
        result = codec.envelope(
            t.ACTION_RESULT,
            {
                "action_id": pending.action_id,
                "character_id": pending.character_id,
                "outcome": "success",
                "summary": "done",
                "effects": [],
            },
            ts=self.now,
            trace_id=pending.trace_id,
        )
        done(self.backend.publish(pending.party_id, result, self.now))

    def types(self, conn: Connection) -> list[str]:
        return [f["type"] for f in self.frames.get(conn.id, [])]

    def last(self, conn: Connection) -> dict[str, Any]:
        return self.frames[conn.id][-1]

    def members(self, party: str = "p1") -> dict[str, bool]:
        return {m["character_id"]: m["online"] for m in done(self.backend.snapshot(party)).members}


class Listener:
    def __init__(self, node: Node, party_id: str) -> None:
        self.node, self.party_id = node, party_id

    def on_event(self, event: Event) -> None:
        to, rest = self.node.core.event_received(event, self.node.now)
        self.node.run([Send(event.data, to), *rest])

    def on_direct(self, character_id: str, data: bytes) -> None:
        self.node.run(self.node.core.direct_received(self.party_id, character_id, data))

    def on_resync(self, epoch: str | None = None) -> None:
        self.node.run(self.node.core.resync(self.party_id, epoch))

    def on_transient(self, items: Sequence[Transient]) -> None:
        self.node.run(self.node.core.transient_received(self.party_id, items, self.node.now))


def action(action_id: str, character: str, run: str = "r1") -> dict[str, Any]:
    return {
        "type": t.ACTION_REQUEST,
        "trace_id": f"t-{action_id}",
        "payload": {
            "action_id": action_id,
            "character_id": character,
            "campaign_run_id": run,
            "action_type": "skill_check",
            "payload": {"skill": "perception"},
        },
    }


def error_code(frame: dict[str, Any]) -> str:
    assert frame["type"] == t.ERROR, frame
    return str(frame["payload"]["code"])


# -- presence ------------------------------------------------------------------------------------
def test_a_join_says_hello_announces_the_character_and_arms_its_token_expiry() -> None:
    node = Node()
    aria = node.join("aria")
    assert node.types(aria) == [t.HELLO]  # its own join is in the hello's snapshot
    assert node.members() == {"aria": True}
    assert [a.binding.character_id for a in node.announced] == ["aria"]
    assert node.core.deadlines.due_at(*_token(aria)) == aria.expires_at


def _token(conn: Connection) -> tuple[Any, str]:
    from party_sync.core.deadlines import Kind

    return Kind.TOKEN, conn.id


def test_a_resync_into_a_new_epoch_keeps_the_connections_already_in_it() -> None:
    """Engine probe: after Redis lost a party (FLUSHALL), a player's first connection, whose
    own join began the new epoch, was closed 4003 before or right after its hello (3 runs of 4):
    the stream, meeting the new epoch, resynced every connection. Now only those whose hello was
    of the lost epoch resync; one still opening keeps going, nothing of the lost epoch buffered,
    and resyncs only if its own snapshot turns out to be of the lost epoch."""
    from dataclasses import replace

    node = Node()
    aria, borin = node.join("aria"), node.join("borin")
    new = aria.epoch
    assert new is not None and borin.epoch == new
    borin.epoch = "lost"  # (its hello was of the history Redis lost)
    opening, late = (
        Connection(
            f"n.{c}", Binding("p1", "r1", c, c.title()), ConnectionLimits(LimitPolicy()), T0 + 60
        )
        for c in ("cora", "dain")
    )
    for conn in (opening, late):
        assert [type(c) for c in node.core.open(conn, None, node.now)] == [Connect]
        assert conn.buffer is not None
        conn.buffer.append(Event("p1", 57, t.SCENE_UPDATE, {}, "t57", b"{}"))  # of the lost epoch
    node.run(node.core.resync("p1", new))
    assert aria.id not in node.closes  # opened in the new epoch: stays
    assert node.closes[borin.id][0] == CloseCode.RESYNC
    assert opening.id not in node.closes and late.id not in node.closes
    snapshot = done(node.backend.snapshot("p1", node.now))
    assert snapshot.epoch == new
    node.run(
        node.core.opened(
            opening, join=None, snapshot=snapshot, replay=None, resume=None, now=node.now
        )
    )
    assert node.types(opening) == [t.HELLO] and opening.id not in node.closes
    old = replace(snapshot, epoch="lost")  # its snapshot was read before the loss
    node.run(
        node.core.opened(late, join=None, snapshot=old, replay=None, resume=None, now=node.now)
    )
    assert node.types(late) == [t.HELLO] and node.closes[late.id][0] == CloseCode.RESYNC
    node.run(node.core.resync("p1"))  # a gap in one epoch: every connection resyncs
    assert node.closes[aria.id][0] == CloseCode.RESYNC
    assert node.closes[opening.id][0] == CloseCode.RESYNC


def test_a_lost_connection_leaves_only_after_the_grace_period() -> None:
    node = Node()
    aria, borin = node.join("aria"), node.join("borin")
    node.lose(aria)
    node.advance(9.9)
    assert node.members() == {"aria": True, "borin": True}  # a page reload would be back by now
    node.advance(0.2)
    assert node.members() == {"aria": False, "borin": True}
    assert node.types(borin)[-1] == t.PARTY_LEAVE
    assert node.meter.counts[("settles", "left")] == 1


def test_a_reconnect_within_the_grace_period_stays_online() -> None:
    node = Node()
    node.join("borin")
    aria = node.join("aria")
    node.lose(aria)
    node.advance(5)
    node.join("aria")
    node.advance(20)
    assert node.members() == {"aria": True, "borin": True}
    assert node.meter.counts[("settles", "stayed")] == 1


def test_a_second_blip_while_the_first_grace_runs_out_is_no_leave_and_no_join() -> None:
    """The first blip's grace ends while a second blip is under way: void, since the player
    came back after it began (it announced leave and join for a player away 0.3 s)."""
    node = Node()
    borin = node.join("borin")
    aria = node.join("aria")
    node.lose(aria)
    node.advance(0.2)
    aria = node.join("aria")
    node.advance(9.6)
    node.lose(aria)  # at 9.8: the first grace ends at 10
    node.advance(0.3)
    assert node.members() == {"aria": True, "borin": True}
    node.join("aria")  # back at 10.1
    node.advance(20)
    assert node.members() == {"aria": True, "borin": True}
    assert t.PARTY_LEAVE not in node.types(borin)


def test_a_close_after_a_blip_leaves_a_whole_grace_after_the_close() -> None:
    node = Node()
    node.join("borin")
    aria = node.join("aria")
    node.lose(aria)
    node.advance(0.2)
    aria = node.join("aria")
    node.advance(1.7)
    node.lose(aria)  # at 1.9: the player closed the game
    node.advance(9.9)  # 11.8: the first grace is over (10), the second is not (11.9)
    assert node.members() == {"aria": True, "borin": True}
    node.advance(0.2)
    assert node.members() == {"aria": False, "borin": True}


def test_the_last_connection_of_a_party_drops_its_subscription() -> None:
    node = Node()
    aria = node.join("aria")
    assert node.subscribed == {"p1"}
    node.lose(aria)
    assert node.subscribed == set() and node.core.parties == {}


# -- actions -------------------------------------------------------------------------------------
def test_an_accepted_action_is_submitted_and_its_result_fanned_out_to_the_party() -> None:
    node = Node()
    aria, borin = node.join("aria"), node.join("borin")
    node.act(aria, "a1")
    (pending,) = node.engine
    assert (pending.action_id, pending.deadline) == ("a1", node.now + 5.0)
    node.now += 0.25
    node.answer(pending)
    assert node.types(aria)[-1] == node.types(borin)[-1] == t.ACTION_RESULT
    assert node.core.pending == {} and node.meter.latencies == [0.25]
    node.advance(60)  # its deadline was cancelled: nothing is sent at it
    assert node.types(aria)[-1] == t.ACTION_RESULT


def test_a_repeated_action_gets_its_first_answer_or_waits_for_it() -> None:
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    node.act(aria, "a1")  # still running
    assert error_code(node.last(aria)) == "action_in_flight"
    node.act(aria, "a2")  # one at a time
    assert error_code(node.last(aria)) == "character_busy"
    node.answer(node.engine[0])
    first = node.last(aria)
    node.act(aria, "a1")  # done: the same result (same seq), to the sender only
    assert node.last(aria) == first and len(node.engine) == 1


def test_forbidden_actions_are_refused_before_the_backend_is_asked() -> None:
    node = Node()
    aria = node.join("aria")
    node.join("borin")
    node.act(aria, "a1", character="borin")
    assert error_code(node.last(aria)) == "forbidden"
    node.act(aria, "a2", run="another-run")
    assert error_code(node.last(aria)) == "forbidden"
    node.act(aria, "vote:v1")
    assert error_code(node.last(aria)) == "forbidden"
    assert node.engine == [] and node.refused == ["forbidden"] * 3


def test_a_refusal_is_logged_with_the_trace_id_its_player_was_given(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ops probe: a message sent without a ``trace_id`` got a ``system.error`` with one made for
    it, and the "message refused" log line had none (nor the action's id): the id a player
    reports could not be found in the logs."""
    node = Node()
    aria = node.join("aria")
    untraced = action("a1", "borin")
    del untraced["trace_id"]
    with caplog.at_level(logging.INFO, logger="party_sync.core.session"):
        node.send(aria, untraced)
    reply = node.last(aria)
    assert error_code(reply) == "forbidden" and reply["trace_id"]
    (record,) = [r for r in caplog.records if r.getMessage() == "message refused"]
    assert (record.trace_id, record.action_id) == (reply["trace_id"], "a1")  # type: ignore[attr-defined]


def test_another_actors_action_id_is_taken() -> None:
    node = Node()
    aria, borin = node.join("aria"), node.join("borin")
    node.act(aria, "shared")
    node.act(borin, "shared")
    assert error_code(node.last(borin)) == "forbidden"
    assert "another actor" in node.last(borin)["payload"]["message"]


def test_an_action_nobody_started_is_refused_at_its_deadline_and_the_refusal_is_final() -> None:
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    assert node.types(aria)[-1] == t.ACTION_ACCEPTED  # every member learns it is in flight
    node.advance(4.99)
    assert node.types(aria)[-1] == t.ACTION_ACCEPTED
    node.advance(0.02)
    # the sender gets its final answer; every member learns the action failed
    assert node.types(aria)[-2:] == [t.ACTION_FAILED, t.ERROR]
    assert node.frames[aria.id][-2]["payload"] == {
        "action_id": "a1",
        "character_id": "aria",
        "code": "action_timeout",
    }
    assert error_code(node.last(aria)) == "action_timeout"
    assert node.meter.counts[("action_answers", "timeout")] == 1
    node.act(aria, "a1")  # its final answer, again
    assert error_code(node.last(aria)) == "action_timeout"


def test_an_action_timeout_reaches_every_tab_of_its_character_once() -> None:
    """docs/protocol.md (system.error): the final refusal of an accepted action goes to every
    open connection of its character, as an engine's does; a node's own action_timeout went to
    the sending tab only (new-user probe)."""
    node = Node()
    tab1, tab2 = node.join("aria"), node.join("aria")
    borin = node.join("borin")
    node.act(tab1, "a1")
    node.advance(RULES.action_timeout + 0.01)
    for tab in (tab1, tab2):
        errors = [error_code(f) for f in node.frames[tab.id] if f["type"] == t.ERROR]
        assert errors == ["action_timeout"], (tab.id, errors)
    assert t.ERROR not in node.types(borin)  # another character: only action.failed
    assert node.types(borin)[-1] == t.ACTION_FAILED


def test_a_started_action_is_looked_at_again_and_a_lost_answer_is_sent_again() -> None:
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    (pending,) = node.engine
    claim, _ = done(node.backend.claim_action("p1", "a1", node.now, b"{}", pending.deadline))
    assert claim is Claim.START  # an engine started it, and is slow
    node.advance(5.01)
    assert node.types(aria)[-1] != t.ERROR  # STARTED: its answer comes from the engine
    # the engine's refusal reached the ledger, but its direct message was lost on the way
    refusal = codec.encode({"type": t.ERROR, "payload": {"code": "action_rejected"}})
    assert done(node.backend.refuse_action("p1", "a1", "aria", refusal, node.now))
    node.advance(5.0)
    assert error_code(node.last(aria)) == "action_rejected"
    assert node.meter.counts[("action_answers", "resent")] == 1


def test_a_started_action_without_an_answer_at_its_deadline_is_told_to_the_operator_once() -> None:
    """Outside probe: an engine that returned without publishing the result left its player
    waiting and nothing in the log. The first look past the deadline finds it started and
    unanswered: the meter is told once (a WARNING and a counter), not at every later look; an
    action answered in time, or timed out, is not overdue."""
    node = Node()
    aria, borin = node.join("aria"), node.join("borin")
    node.act(aria, "a1")
    node.act(borin, "b1")
    first, second = node.engine
    for pending in (first, second):
        claim, _ = done(
            node.backend.claim_action("p1", pending.action_id, node.now, b"{}", pending.deadline)
        )
        assert claim is Claim.START
    node.answer(second)  # b1 answered in time
    node.advance(RULES.action_timeout + 0.01)
    assert ("overdue", "a1") not in node.meter.counts  # an answer may be on its way
    node.advance(OVERDUE_GRACE)
    assert node.meter.counts.get(("overdue", "a1")) == 1
    for _ in range(3):  # still unanswered at every later look: not told again
        node.advance(RULES.action_timeout)
    assert node.meter.counts.get(("overdue", "a1")) == 1
    assert ("overdue", "b1") not in node.meter.counts
    node.act(borin, "b2")  # nobody starts it: timed out, which is its answer, not overdue
    node.advance(RULES.action_timeout + 0.01)
    assert error_code(node.last(borin)) == "action_timeout"
    assert ("overdue", "b2") not in node.meter.counts


@pytest.mark.parametrize("lost_at", [0.0, 0.5, 1.0, 1.0 + OVERDUE_GRACE / 2])
def test_a_started_action_is_told_to_the_operator_whether_or_not_its_sender_stayed(
    lost_at: float,
) -> None:
    """Recheck probe: an engine that answered 202 and never published was counted overdue while
    its player stayed connected, and not at all once the player had left (before or after the
    deadline): the node stopped looking at an action whose connection was closed. The count
    is the operator's, and so is ``forgotten`` when its record ends unanswered. ``lost_at``:
    when the sender's connection goes, in fractions of the timeout."""
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    node.start(node.engine[0])
    node.advance(lost_at * RULES.action_timeout)
    node.lose(aria)
    node.advance(RULES.action_timeout * (1.0 - lost_at) + OVERDUE_GRACE + 0.01)
    assert node.meter.counts.get(("overdue", "a1")) == 1
    for _ in range(3):  # not told again at later looks
        node.advance(RULES.action_timeout)
    assert node.meter.counts.get(("overdue", "a1")) == 1
    node.advance(RULES.action_record_ttl)
    assert node.meter.counts.get(("forgotten", "a1")) == 1


@pytest.mark.parametrize("restarted", [False, True])
def test_resends_more_often_than_the_timeout_do_not_put_the_timeout_off(restarted: bool) -> None:
    """Engine probe: an action no engine started, whose node restarted, was resent by its
    client every 3 s with a 4 s timeout and never answered: each resend (``action_in_flight``)
    moved the node's look to a full timeout after it. A resend keeps the watch's time: the
    sender gets ``action_timeout`` one timeout after the first send this node saw."""
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    assert node.engine  # accepted; nobody starts it
    if restarted:  # the node is gone; a new one on the same backend meets the resends
        node = Node(backend=node.backend)
        node.now = T0
        aria = node.join("aria")
    first = node.now
    while node.now < first + 3 * RULES.action_timeout and not any(
        f["type"] == t.ERROR and f["payload"]["code"] == "action_timeout"
        for f in node.frames[aria.id]
    ):
        node.act(aria, "a1")
        assert error_code(node.last(aria)) in ("action_in_flight", "action_timeout")
        node.advance(0.75 * RULES.action_timeout)
    codes = [error_code(f) for f in node.frames[aria.id] if f["type"] == t.ERROR]
    assert "action_timeout" in codes, codes
    assert node.now <= first + 1.5 * RULES.action_timeout


def test_a_resend_on_another_node_ends_with_its_record_not_with_a_lost_state() -> None:
    """Fix-check probe: an action accepted on node A, its player resending it on node B (after
    a reconnect), an engine that started it and never published: at the end of the record B
    told the player "the party's state was lost" (B watched it from the resend, so the record's
    end came too early to be its age). B watches it by its record's age: the operator is told
    it was forgotten, the player nothing, as on A."""
    a = Node()
    a.act(a.join("aria"), "a1")
    a.start(a.engine[0])
    b = Node(backend=a.backend)
    b.now = a.now + 0.25 * RULES.action_record_ttl  # the player comes back a while later
    aria_b = b.join("aria")
    b.act(aria_b, "a1")
    assert error_code(b.last(aria_b)) == "action_in_flight"
    b.advance(RULES.action_record_ttl)
    assert b.meter.counts.get(("forgotten", "a1")) == 1
    codes = [error_code(f) for f in b.frames[aria_b.id] if f["type"] == t.ERROR]
    assert codes == ["action_in_flight"], codes


def test_a_resend_on_another_node_past_the_deadline_of_an_action_nobody_started_ends_at_once() -> (
    None
):
    """Docs probe: an action accepted on node A, which died before any engine started it; its
    player reconnected to node B after the deadline and resent it: ``action_in_flight``, then
    ``action_timeout`` one whole timeout after the resend (nobody else looks at a dead node's
    action). B looks at it by its record's age: its deadline is past, so at once."""
    a = Node()
    a.act(a.join("aria"), "a1")
    assert a.engine  # accepted; never started
    b = Node(backend=a.backend)  # A is gone (its watch with it)
    b.now = a.now + 1.5 * RULES.action_timeout
    borin = b.join("borin")
    aria_b = b.join("aria")
    b.act(aria_b, "a1")
    b.advance(0)
    codes = [error_code(f) for f in b.frames[aria_b.id] if f["type"] == t.ERROR]
    assert codes == ["action_in_flight", "action_timeout"], codes
    assert [f["payload"]["action_id"] for f in b.frames[borin.id] if f["type"] == "action.failed"]
    assert b.meter.counts.get(("action_answers", "timeout")) == 1


def test_a_started_action_refused_at_its_deadline_is_not_called_overdue() -> None:
    """The HTTP link claims an action before its first delivery; when every attempt is refused
    at connect, it answers action_timeout at the deadline. The node's look at that deadline came
    first and counted the action overdue, with a WARNING that "its player waits for it", while
    the player had its answer (outside engine probe: 3 of 5 runs). A started action is called
    overdue only once a moment past its deadline brought no answer."""
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    pending = node.engine[0]
    claim, _ = done(node.backend.claim_action("p1", "a1", node.now, b"{}", pending.deadline))
    assert claim is Claim.START
    node.advance(RULES.action_timeout)  # the node's look at the deadline comes first
    timeout = codec.encode(
        {
            "type": t.ERROR,
            "payload": {"code": "action_timeout", "in_reply_to": {"action_id": "a1"}},
        }
    )
    assert done(node.backend.refuse_action("p1", "a1", "aria", timeout, node.now))
    node.advance(OVERDUE_GRACE + RULES.action_timeout)
    assert ("overdue", "a1") not in node.meter.counts
    assert [error_code(f) for f in node.frames[aria.id] if f["type"] == t.ERROR] == [
        "action_timeout"
    ]


def test_a_stored_result_goes_outside_the_stream_only_as_a_repeat() -> None:
    """docs/protocol.md: a resend's action.result comes back as a repeat, with a seq <= your
    last_seq: the original where the stream passed it; else (a node a moment behind, or an
    answer of another epoch after Redis lost the party: no stream will bring it) the
    connection's last seq, the rest the same bytes. The sender always gets it; no connection is
    given a seq out of turn; a syncing one gets no frame before its hello."""
    node = Node()
    aria, borin = node.join("aria"), node.join("borin")
    node.act(aria, "a1")
    node.answer(node.engine[0])
    result = node.last(aria)
    assert result["type"] == t.ACTION_RESULT
    stored = done(node.backend.begin_action("p1", "aria", "a1", node.now, True)).result
    assert stored is not None and codec.seq_of(stored) == result["seq"]
    node.act(aria, "a1")  # passed: the same answer again
    assert node.last(aria) == result
    for last in (result["seq"] - 1, 0):  # behind it: a lagging stream, or another epoch's
        aria.tracker.last = last
        node.act(aria, "a1")
        assert node.last(aria) == {**result, "seq": last}
        node.run(node.core.direct_received("p1", "aria", stored))  # from another node
        assert node.last(aria) == {**result, "seq": last}
    assert aria.id not in node.closes
    aria.tracker.last = result["seq"]
    sent = len(node.frames[aria.id])
    refusal = codec.encode({"type": t.ERROR, "payload": {"code": "action_rejected"}})
    node.run(node.core.direct_received("p1", "aria", refusal))  # no seq: as it is
    assert error_code(node.last(aria)) == "action_rejected"
    assert len(node.frames[aria.id]) == sent + 1
    syncing = Connection("n.s", aria.binding, ConnectionLimits(LimitPolicy()), 1e12)
    node.core.open(syncing, None, node.now)  # its Connect not answered: no hello yet
    node.run(node.core.direct_received("p1", "aria", stored))
    assert syncing.id not in node.frames
    assert node.types(borin)[-1] == t.ACTION_RESULT  # nothing direct reached another character


def test_the_server_s_repeat_is_settled_by_the_client_and_never_applied() -> None:
    """The bundled client's side of the repeat above: settled by action_id, state untouched."""
    from party_sync.client.stream import ActionDone, ClientStream

    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    node.answer(node.engine[0])
    result = node.last(aria)
    hello = next(f for f in node.frames[aria.id] if f["type"] == t.HELLO)
    stream = ClientStream()
    # the client took a new epoch's snapshot, whose seq is below the old result's
    stream.receive({**hello, "payload": {**hello["payload"], "seq": 0}})
    stream.actions["a1"] = {"type": t.ACTION_REQUEST, "payload": {"action_id": "a1"}}
    before = stream.last_seq
    aria.tracker.last = 0
    assert result["seq"] > 0
    node.act(aria, "a1")
    outs = stream.receive(node.last(aria))
    assert [type(o) for o in outs] == [ActionDone] and stream.last_seq == before
    assert "a1" not in stream.actions


@pytest.mark.parametrize("stream", ["behind", "ahead of the verdict"])
def test_a_result_found_at_the_deadline_reaches_its_live_sender_once(stream: str) -> None:
    """At the deadline the ledger has the action's result (FINAL) while its sender's connection
    is live. Behind (its stream has not passed the result): the sender is told now, as a repeat
    (settled, not applied), and the event follows in order. Ahead of the verdict (after a stall
    the result can reach the node before the ledger's verdict does, and the action is watched
    anyway): the stream gave it already, nothing is sent twice."""
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    (pending,) = node.engine
    done(node.backend.claim_action("p1", "a1", node.now, b"{}", pending.deadline))
    received = node.core.event_received
    held: list[Event] = []

    def hold(event: Event, now: float) -> tuple[list[Connection], list[Command]]:
        held.append(event)
        return [], []

    if stream == "behind":
        node.core.event_received = hold  # type: ignore[method-assign]
    node.answer(pending)
    if stream != "behind":
        assert pending.deadline is not None
        node.core._watch(pending, pending.deadline)
    last = aria.tracker.last
    node.advance(5.01)  # the deadline finds it FINAL
    node.core.event_received = received  # type: ignore[method-assign]
    for event in held:  # the stream catches up
        Listener(node, "p1").on_event(event)
    results = [f for f in node.frames[aria.id] if f["type"] == t.ACTION_RESULT]
    if stream == "behind":
        assert node.meter.counts[("action_answers", "resent")] == 1
        assert [f["seq"] for f in results] == [last, last + 1]  # the repeat, then the event
        assert {**results[0], "seq": last + 1} == results[1]
    else:
        assert ("action_answers", "resent") not in node.meter.counts
        assert len(results) == 1


def test_a_connection_still_syncing_is_not_in_a_presence_refresh() -> None:
    """Its Connect (in flight, maybe held by a stalled Redis) registers it or nothing; a refresh
    naming it, run late, would announce a player whose handshake was refused meanwhile."""
    node = Node()
    aria = node.join("aria")
    borin = Connection(
        "n.syncing", Binding("p1", "r1", "borin", "Borin"), ConnectionLimits(LimitPolicy()), 1e12
    )
    (connect,) = node.core.open(borin, None, node.now)  # its Connect not answered yet
    assert isinstance(connect, Connect)
    refreshes = node.recorded(Refresh)
    node.advance(RULES.presence_ttl)
    named = [{i for _, i in r.connections} for r in refreshes]
    assert {aria.id} in named and not any(borin.id in ids for ids in named)
    snapshot = done(node.backend.snapshot("p1"))
    node.run(
        node.core.opened(
            borin, join=None, snapshot=snapshot, replay=None, resume=None, now=node.now
        )
    )
    refreshes.clear()
    node.advance(RULES.presence_ttl)
    assert {aria.id, borin.id} in [{i for _, i in r.connections} for r in refreshes]  # live


def test_a_deadline_met_while_the_backend_is_down_is_tried_again_until_it_answers() -> None:
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    node.unavailable = True
    node.advance(5.01)
    node.advance(3.0)  # looked at again every second
    assert node.meter.counts[("background_errors", "action_timeouts")] >= 3
    node.unavailable = False
    node.advance(1.0)
    assert error_code(node.last(aria)) == "action_timeout"


def test_an_answer_owed_to_a_lost_connection_goes_to_the_characters_other_ones() -> None:
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    node.lose(aria)
    again = node.join("aria")  # reconnected (another tab, or a new socket)
    node.advance(5.01)
    assert error_code(node.last(again)) == "action_timeout"


@pytest.mark.parametrize("resend", [True, False])
def test_a_sender_who_reconnected_and_has_its_result_is_not_sent_it_again_at_the_deadline(
    resend: bool,
) -> None:
    """The sender drops while its action runs and resumes after the result was published: its
    new connection has the result (the replay, and the answer to its resend). The watch the
    lost connection left finds the result at the deadline: nothing more is sent (it was a
    second, unasked copy)."""
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    (pending,) = node.engine
    node.lose(aria)
    node.now += 1.0
    node.answer(pending)  # published while aria is away
    again = node.join("aria")  # its snapshot stands for the resume's replay here
    stored = done(node.backend.begin_action("p1", "aria", "a1", node.now, True)).result
    assert stored is not None
    seq = codec.seq_of(stored)
    assert seq is not None and again.tracker.last >= seq
    if resend:
        node.act(again, "a1")  # the client resends its pending actions after the hello
        assert node.last(again)["type"] == t.ACTION_RESULT
    sent = len(node.frames.get(again.id, []))
    node.advance(10.0)  # past the first acceptance's deadline
    assert len(node.frames.get(again.id, [])) == sent


def test_a_refusal_that_came_while_its_sender_was_away_is_told_at_the_deadline() -> None:
    """The engine refused the action while its sender had no connection (its direct message
    reached nobody): the sender resumes without resending (a client that only resumes) and is
    told at the action's deadline, once."""
    node = Node()
    aria = node.join("aria")
    node.join("borin")
    node.act(aria, "a1")
    node.lose(aria)
    refusal = codec.encode(
        {
            "type": t.ERROR,
            "payload": {"code": "action_rejected", "in_reply_to": {"action_id": "a1"}},
        }
    )
    assert done(node.backend.refuse_action("p1", "a1", "aria", refusal, node.now))
    node.run(node.core.direct_received("p1", "aria", refusal))  # nobody of aria's here
    again = node.join("aria")
    node.advance(RULES.action_timeout + 0.01)
    told = [f for f in node.frames[again.id] if f["type"] == t.ERROR]
    assert [error_code(f) for f in told] == ["action_rejected"]
    node.advance(60.0)
    assert [f for f in node.frames[again.id] if f["type"] == t.ERROR] == told


def test_when_messages_may_be_lost_pending_actions_are_looked_at_at_once() -> None:
    """Partition probe: actions sent as Redis came back were refused by the engine in
    milliseconds, but the refusal (sent to the sender only, in no history) went out while the
    node's pub/sub was not subscribed yet: the sender heard at the deadline, 10 s later. When
    the backend says messages may have been lost, every pending action is looked at now: a
    final answer reaches its sender at once; one still in flight is timed out at its own
    deadline, and one started is not yet overdue."""
    node = Node()
    aria, borin, cora = node.join("aria"), node.join("borin"), node.join("cora")
    node.act(aria, "a1")
    node.act(borin, "b1")
    node.act(cora, "c1")
    claim, _ = done(node.backend.claim_action("p1", "c1", node.now, b"{}", node.engine[2].deadline))
    assert claim is Claim.START
    refusal = codec.encode(
        {
            "type": t.ERROR,
            "payload": {"code": "action_rejected", "in_reply_to": {"action_id": "a1"}},
        }
    )
    assert done(node.backend.refuse_action("p1", "a1", "aria", refusal, node.now))  # not heard
    node.advance(1.0)
    node.core.answers_may_be_lost(node.now)
    node.advance(0.001)
    assert error_code(node.last(aria)) == "action_rejected"
    assert not [f for f in node.frames[borin.id] if f["type"] == t.ERROR]
    assert ("overdue", "c1") not in node.meter.counts
    node.advance(RULES.action_timeout - 1.0)  # b1's own deadline, not a timeout after the look
    assert error_code(node.last(borin)) == "action_timeout"
    node.advance(OVERDUE_GRACE)
    assert node.meter.counts.get(("overdue", "c1")) == 1
    assert [error_code(f) for f in node.frames[aria.id] if f["type"] == t.ERROR] == [
        "action_rejected"
    ]


@pytest.mark.parametrize("first", ["the channel", "the look", "a resend"])
def test_a_refusal_that_crosses_the_look_after_a_failover_is_told_once(first: str) -> None:
    """Cluster probe: during a failover the engine refused an action; the node, told that
    messages may have been lost, looked at its pending actions at once, and the sender got the
    same action_rejected twice, 2 ms apart (once from the character's channel, once from the
    look that found it final). Whatever comes first (the channel, the look, the answer to a
    resend), the connection is told once unasked; a resend still gets its answer."""
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    refusal = codec.encode(
        {
            "type": t.ERROR,
            "payload": {"code": "action_rejected", "in_reply_to": {"action_id": "a1"}},
        }
    )
    assert done(node.backend.refuse_action("p1", "a1", "aria", refusal, node.now))
    node.core.answers_may_be_lost(node.now)
    (looking,) = node.core.deadlines_reached(node.now)  # the look, launched (a backend call)
    if first == "the channel":
        node.run(node.core.direct_received("p1", "aria", refusal))
        node.run(looking)  # the look was under way: it finds the action final
    elif first == "the look":
        node.run(looking)
        node.run(node.core.direct_received("p1", "aria", refusal))
    else:
        node.act(aria, "a1")  # the resend's answer
        node.run(looking)
        node.run(node.core.direct_received("p1", "aria", refusal))
    node.advance(2 * RULES.action_timeout)
    assert [error_code(f) for f in node.frames[aria.id] if f["type"] == t.ERROR] == [
        "action_rejected"
    ]
    node.act(aria, "a1")  # asked: answered again
    assert [error_code(f) for f in node.frames[aria.id] if f["type"] == t.ERROR] == [
        "action_rejected"
    ] * 2


def test_a_refusal_reaching_a_connection_twice_unasked_is_told_once() -> None:
    """Fault probe: the sender moved to another node before the engine's refusal came; it got
    the refusal there, and again about a timeout later from the node that accepted the action
    (its deadline's resend to the character's channel: that node cannot know). A connection is
    told a final refusal once; a resend of the action is still answered."""
    node = Node()
    aria = node.join("aria")
    refusal = codec.encode(
        {
            "type": t.ERROR,
            "payload": {"code": "action_rejected", "in_reply_to": {"action_id": "a1"}},
        }
    )
    for _ in range(2):
        node.run(node.core.direct_received("p1", "aria", refusal))
    assert [error_code(f) for f in node.frames[aria.id] if f["type"] == t.ERROR] == [
        "action_rejected"
    ]
    other = codec.encode(
        {
            "type": t.ERROR,
            "payload": {"code": "engine_error", "in_reply_to": {"action_id": "a2"}},
        }
    )
    node.run(node.core.direct_received("p1", "aria", other))  # another action's: told
    assert error_code(node.last(aria)) == "engine_error"
    again = node.join("aria")  # another connection: told once too
    node.run(node.core.direct_received("p1", "aria", refusal))
    assert error_code(node.last(again)) == "action_rejected"
    assert len([f for f in node.frames[aria.id] if f["type"] == t.ERROR]) == 2


def test_a_refusal_told_to_a_resend_is_not_told_again_at_the_deadline() -> None:
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    refusal = codec.encode({"type": t.ERROR, "payload": {"code": "action_rejected"}})
    assert done(node.backend.refuse_action("p1", "a1", "aria", refusal, node.now))
    node.lose(aria)  # the refusal's direct message was lost with the connection
    again = node.join("aria")
    node.act(again, "a1")
    assert error_code(node.last(again)) == "action_rejected"
    sent = len(node.frames[again.id])
    node.advance(10.0)
    assert len(node.frames[again.id]) == sent


def test_a_result_another_node_sends_reaches_only_the_connections_that_lack_it() -> None:
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    node.answer(node.engine[0])
    stored = done(node.backend.begin_action("p1", "aria", "a1", node.now, True)).result
    assert stored is not None
    other = node.join("aria")  # a second tab, opened after the result
    sent = {c.id: len(node.frames[c.id]) for c in (aria, other)}
    node.run(node.core.direct_received("p1", "aria", stored))
    assert {c.id: len(node.frames[c.id]) for c in (aria, other)} == sent
    other.tracker.last = (codec.seq_of(stored) or 0) - 1  # this one is a moment behind
    node.run(node.core.direct_received("p1", "aria", stored))
    assert len(node.frames[other.id]) == sent[other.id] + 1
    assert len(node.frames[aria.id]) == sent[aria.id]


@pytest.mark.parametrize("engine", ["answers", "never answers"])
@pytest.mark.parametrize("resent", ["before the first deadline", "after it"])
def test_an_action_resent_after_the_backend_lost_its_record_has_a_longer_deadline(
    resent: str, engine: str
) -> None:
    """Redis restarted empty while an engine (a stream worker, frozen) had started the action:
    the record saying so is gone. The sender resends it (after its 4003 and new hello); the
    ledger, empty, accepts it again. At the deadline nothing says an engine started it, yet one
    did: an action_timeout would be false (the engine applies it afterwards). This node
    accepted it before, so its deadline is action_record_ttl / 4 away (150 s, not 5): its answer
    comes from the engine, which deduplicates by action_id; with no engine at all it is still
    told action_timeout then, not left waiting. The character's lock lapses as usual."""
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    assert len(node.engine) == 1
    node.backend = MemoryBackend(BackendSettings(action_timeout=RULES.action_timeout))
    node.subscribed.clear()  # the party's state is gone (a new epoch)
    node.lose(aria)
    again = node.join("aria")
    if resent == "after it":
        node.advance(RULES.action_timeout + 0.01)  # the first watch finds no record (GONE)
        assert error_code(node.last(again)) == "backend_unavailable"
    node.act(again, "a1")
    assert node.types(again)[-1] == t.ACTION_ACCEPTED and len(node.engine) == 2
    node.advance(3 * RULES.action_timeout)
    assert "action_timeout" not in [
        error_code(f) for f in node.frames[again.id] if f["type"] == t.ERROR
    ]
    assert ("action_answers", "timeout") not in node.meter.counts
    node.act(again, "a2")  # the character is not held by it
    assert node.types(again)[-1] == t.ACTION_ACCEPTED
    if engine == "answers":
        node.answer(node.engine[1])  # the engine's answer (the first delivery's, deduplicated)
        assert [f["type"] for f in node.frames[again.id]].count(t.ACTION_RESULT) == 1
        node.advance(600.0)
        told = [
            f["payload"]["in_reply_to"].get("action_id")
            for f in node.frames[again.id]
            if f["type"] == t.ERROR and f["payload"]["code"] == "action_timeout"
        ]
        assert told == ["a2"]  # a2, never started, times out; a1 was answered, once
    else:
        node.advance(600.0 / 4)
        assert node.meter.counts[("action_answers", "timeout")] == 2  # a2's, then a1's
        node.act(again, "a1")  # its final answer, again
        assert error_code(node.last(again)) == "action_timeout"


@pytest.mark.parametrize("engine", ["answers", "never answers"])
def test_a_resend_after_a_state_loss_has_the_longer_deadline_on_any_node(engine: str) -> None:
    """Redis restarted empty while a stream worker (frozen) applied an action node A had
    accepted; the sender's reconnect reaches node B, which never saw the action. B cannot tell a
    resend from a new action, but its member resumed from an epoch the backend no longer has:
    what it sends within action_timeout of that resume gets the longer deadline (no false
    action_timeout while the engine may still answer); later actions, and members whose epoch
    stands, get the usual one."""
    first = Node()
    aria = first.join("aria")
    old_epoch = first.frames[aria.id][0]["payload"]["epoch"]
    first.act(aria, "a1")
    assert len(first.engine) == 1
    node = Node()  # another node, on the emptied backend
    node.now = first.now + 1.0
    borin = node.join("borin", resume=None)
    borin_epoch = node.frames[borin.id][0]["payload"]["epoch"]
    assert borin_epoch != old_epoch
    again = node.join("aria", resume=ResumePoint(old_epoch, 3))
    node.act(again, "a1")
    assert node.types(again)[-1] == t.ACTION_ACCEPTED and len(node.engine) == 1
    node.now += RULES.action_timeout + 0.01
    node.act(again, "a2")  # past the window: a new action, usual deadline
    current = node.join("borin", resume=ResumePoint(borin_epoch, 1))  # its epoch stands
    node.act(current, "b1")
    node.advance(3 * RULES.action_timeout)
    timed_out = [
        f["payload"]["in_reply_to"].get("action_id")
        for conn in (again, current)
        for f in node.frames[conn.id]
        if f["type"] == t.ERROR and f["payload"]["code"] == "action_timeout"
    ]
    assert timed_out == ["a2", "b1"]
    if engine == "answers":
        node.answer(node.engine[0])  # the first delivery's answer, deduplicated by the engine
        assert [f["type"] for f in node.frames[again.id]].count(t.ACTION_RESULT) == 1
        node.advance(600.0)
        assert [f["payload"]["code"] for f in node.frames[again.id] if f["type"] == t.ERROR] == [
            "action_timeout"  # a2's only
        ]
    else:
        node.advance(600.0 / 4)
        node.act(again, "a1")
        assert error_code(node.last(again)) == "action_timeout"
    assert node.core.lost_members == {}


def test_an_action_this_node_never_accepted_is_timed_out_as_usual_after_a_state_loss() -> None:
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    node.backend = MemoryBackend(BackendSettings(action_timeout=RULES.action_timeout))
    node.subscribed.clear()
    node.lose(aria)
    again = node.join("aria")
    node.now += 1.0
    node.act(again, "b1")  # a new action: refused at its deadline if nobody starts it
    node.advance(RULES.action_timeout - 0.5)  # a1's old watch: GONE, told backend_unavailable
    assert error_code(node.last(again)) == "backend_unavailable"
    node.advance(1.0)
    assert error_code(node.last(again)) == "action_timeout"
    assert set(node.core.lost_actions) == {("p1", "a1")}
    node.advance(700.0)
    node.act(again, "a1")  # remembered for action_record_ttl only
    node.advance(RULES.action_timeout + 0.01)
    assert error_code(node.last(again)) == "action_timeout"
    assert node.core.lost_actions == {}


def test_an_action_its_engine_never_answers_is_forgotten_with_its_record_not_called_lost() -> None:
    """An engine started the action and never published its answer (a broken contract). At the
    deadline it is counted overdue; when its record expires with its age (action_record_ttl),
    the node stops waiting: counted, and nothing said to the player. It was told
    backend_unavailable "the party's state was lost: send the same action again", untrue (the
    state was not lost), and the resend it invited was accepted and forwarded again (outside
    probe, an engine that returns without publishing)."""
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    pending = node.engine[0]
    claim, _ = done(node.backend.claim_action("p1", "a1", node.now, b"{}", pending.deadline))
    assert claim is Claim.START  # started, and never answered
    node.advance(RULES.action_record_ttl + 3 * RULES.action_timeout)
    assert [f for f in node.frames[aria.id] if f["type"] == t.ERROR] == []
    assert node.meter.counts[("overdue", "a1")] == 1
    assert node.meter.counts[("forgotten", "a1")] == 1
    assert node.core.lost_actions == {} and node.core.pending == {}


def test_a_record_lost_before_its_age_is_still_told_as_lost() -> None:
    """The other side of the line: the record gone before action_record_ttl (the state lost)
    is told backend_unavailable, and a resend is remembered as a lost action's."""
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    node.backend = MemoryBackend(BackendSettings(action_timeout=RULES.action_timeout))
    node.advance(RULES.action_timeout + 0.01)
    assert error_code(node.last(aria)) == "backend_unavailable"
    assert set(node.core.lost_actions) == {("p1", "a1")}
    assert ("forgotten", "a1") not in node.meter.counts


def test_every_close_and_every_refusal_a_player_is_told_is_counted_once() -> None:
    """party_sync_closes_total counted only some closes (not a resync's 4003, a failed open's
    1011, a leave's 1000); party_sync_errors_total missed refusals made on another node or by
    the engine (they arrive as direct messages); messages_out counted a party event for every
    connection of the party, those that did not get it included."""
    node = Node()
    aria = node.join("aria")
    refusal = codec.encode({"type": t.ERROR, "payload": {"code": "action_rejected"}})
    node.run(node.core.direct_received("p1", "aria", refusal))
    node.run(node.core.direct_received("p1", "nobody-here", refusal))  # not told here
    assert node.meter.counts[("errors", "action_rejected")] == 1
    node.unavailable = True
    node.join("borin")  # its open fails: told backend_unavailable and closed with 1011
    node.unavailable = False
    assert node.meter.counts[("closes", str(CloseCode.INTERNAL_ERROR))] == 1
    assert node.meter.counts[("errors", "backend_unavailable")] == 1
    node.act(aria, "a1")
    node.advance(RULES.action_timeout + 0.01)  # nobody started it: told action_timeout
    assert node.meter.counts[("errors", "action_timeout")] == 1
    node.run(node.core.drain())
    assert node.meter.counts[("closes", str(CloseCode.GOING_AWAY))] == 1


def test_messages_out_counts_every_frame_sent_by_its_type() -> None:
    """Operator probe: ``party_sync_messages_out_total`` (docs/metrics.md: "Messages sent to
    clients (one per recipient), by type") left out every ``system.error`` and ``system.pong``,
    and the answers sent again to a resend (a stored ``action.result``)."""
    node = Node()
    aria, borin = node.join("aria"), node.join("borin")
    node.send(aria, {"type": t.PING, "payload": {}})
    node.run(node.core.receive(aria, b"{bad", node.now))  # bad_json
    node.act(aria, "a1")
    node.act(borin, "b1", character="aria")  # forbidden: another character
    node.answer(node.engine[0])
    node.act(aria, "a1")  # after its result: the result again, to aria only
    refusal = codec.encode({"type": t.ERROR, "payload": {"code": "action_rejected"}})
    node.run(node.core.direct_received("p1", "borin", refusal))  # made on another node
    sent: dict[str, int] = {}
    for frames in node.frames.values():
        for frame in frames:
            sent[frame["type"]] = sent.get(frame["type"], 0) + 1
    counted = {label: n for (family, label), n in node.meter.counts.items() if family == "out"}
    assert counted == sent
    assert {t.PONG, t.ERROR, t.ACTION_RESULT} <= set(sent)


# -- votes ---------------------------------------------------------------------------------------
def _start_vote(node: Node, vote_id: str = "v1", timeout_s: float = 30.0) -> None:
    spec = votes.VoteSpec(vote_id, "Which way?", (("A", "Left"), ("B", "Right")), timeout_s)
    done(node.backend.start_vote("p1", spec, "r1", node.now, "t-vote"))


def test_a_thirty_second_vote_closes_at_its_deadline_and_its_decision_reaches_the_engine() -> None:
    node = Node()
    aria = node.join("aria")
    node.join("borin")
    _start_vote(node)
    node.send(aria, {"type": t.VOTE_CAST, "payload": {"vote_id": "v1", "option": "B"}})
    node.advance(29.9)
    assert t.VOTE_FINISHED not in node.types(aria) and node.engine == []
    node.advance(0.2)
    # the decision is handed to the engine as the party's action, which every member sees
    assert node.types(aria)[-2:] == [t.VOTE_FINISHED, t.ACTION_ACCEPTED]
    assert node.frames[aria.id][-1]["payload"] == {
        "action_id": "vote:v1",
        "character_id": t.PARTY_ACTOR,
        "action_type": "choice",
    }
    (choice,) = node.engine
    assert (choice.action_id, choice.character_id, choice.deadline) == (
        "vote:v1",
        t.PARTY_ACTOR,
        None,
    )
    assert choice.payload["payload"] == {"option": "B", "vote_id": "v1"}


def test_a_vote_everyone_cast_finishes_at_once() -> None:
    node = Node()
    aria = node.join("aria")
    _start_vote(node)
    node.send(aria, {"type": t.VOTE_CAST, "payload": {"vote_id": "v1", "option": "A"}})
    assert node.types(aria)[-2:] == [t.VOTE_FINISHED, t.ACTION_ACCEPTED]
    assert [a.action_id for a in node.engine] == ["vote:v1"]


def test_a_bad_ballot_is_refused() -> None:
    node = Node()
    aria = node.join("aria")
    _start_vote(node)
    node.send(aria, {"type": t.VOTE_CAST, "payload": {"vote_id": "v1", "option": "Z"}})
    assert error_code(node.last(aria)) == "vote_bad_option"


def test_a_characters_action_in_flight_does_not_hold_back_the_votes_decision() -> None:
    node = Node()
    aria = node.join("aria")
    _start_vote(node)
    node.act(aria, "busy")  # aria's action holds no party lock: the vote's action still runs
    node.send(aria, {"type": t.VOTE_CAST, "payload": {"vote_id": "v1", "option": "A"}})
    assert [a.action_id for a in node.engine] == ["busy", "vote:v1"]


def test_a_decision_already_in_flight_is_handed_over_as_a_redelivery() -> None:
    """Votes probe: a vote's action taken over from a node killed after it delivered it went to
    the engine as a first delivery (``X-Delivery-Attempt: 1``, "never seen"), while the first
    one was still running; a refusal of it would have said "never applied". A decision whose
    action the ledger has in flight is handed over as ``again`` (the gateway makes it a
    ``redelivery``); a first hand-over is not."""
    node = Node()
    aria = node.join("aria")
    _start_vote(node)
    submits = node.recorded(SubmitVote)
    node.send(aria, {"type": t.VOTE_CAST, "payload": {"vote_id": "v1", "option": "A"}})
    (first,) = submits
    assert first.action is not None and first.again is False
    again = node.core.vote_verdict(
        ApplyVote(first.finished, node.now, False), "r1", Verdict(Decision.IN_FLIGHT)
    )
    [handed] = again
    assert isinstance(handed, SubmitVote) and handed.action is not None and handed.again is True


def test_a_decision_the_backend_could_not_take_is_retried_then_left_to_the_sweep() -> None:
    node = Node()
    aria = node.join("aria")
    _start_vote(node)
    attempts: list[float] = []
    step = node.step

    def failing_from_the_hand_over(c: Command) -> list[Command]:
        if isinstance(c, ApplyVote):
            if not attempts:
                node.unavailable = True  # the backend fails from the first hand-over on
            attempts.append(node.now)
        return step(c)

    node.step = failing_from_the_hand_over  # type: ignore[method-assign]
    node.send(aria, {"type": t.VOTE_CAST, "payload": {"vote_id": "v1", "option": "A"}})
    closed_at = attempts[0]
    node.advance(RULES.action_timeout + 1)
    # retried after 0.05, 0.1, 0.2, ... s, doubling up to 1 s, for one action timeout; then left
    pauses = [round(b - a, 3) for a, b in itertools.pairwise(attempts)]
    assert pauses[:5] == [0.05, 0.1, 0.2, 0.4, 0.8] and set(pauses[5:]) <= {1.0}
    assert attempts[-1] <= closed_at + RULES.action_timeout
    tried = len(attempts)
    node.advance(10.0)  # still down: only the sweep looks at it now (and fails)
    assert len(attempts) == tried or all(
        a > closed_at + RULES.action_timeout for a in attempts[tried:]
    )
    assert node.engine == []
    node.unavailable = False  # back: the next votes sweep hands it over, once
    node.advance(RULES.presence_ttl)
    assert [a.action_id for a in node.engine] == ["vote:v1"]
    node.advance(RULES.presence_ttl)
    assert [a.action_id for a in node.engine] == ["vote:v1"]


def test_a_failing_deadline_does_not_stop_the_others() -> None:
    node = Node()
    aria, borin = node.join("aria", expires_in=60), node.join("borin", expires_in=60)

    def broken(*_: object) -> list[Command]:
        raise RuntimeError("a bug")

    reached = node.core.deadline_reached
    node.core.deadline_reached = (  # type: ignore[method-assign]
        lambda kind, key, now: broken() if key == aria.id else reached(kind, key, now)
    )
    node.advance(61)
    assert aria.id not in node.closes  # its deadline failed (logged, counted) ...
    assert node.closes[borin.id][0] == CloseCode.TOKEN_EXPIRED  # ... the other one still ran
    assert node.meter.counts[("background_errors", "timer")] == 1


def test_the_votes_sweep_hands_over_a_decision_nobody_applied() -> None:
    node = Node()
    aria = node.join("aria")
    _start_vote(node)
    # the node closes the vote and dies before handing its decision over
    node.core._apply_soon = lambda finished, now: []  # type: ignore[method-assign]
    node.send(aria, {"type": t.VOTE_CAST, "payload": {"vote_id": "v1", "option": "A"}})
    assert node.types(aria)[-1] == t.VOTE_FINISHED
    assert node.engine == []
    node.advance(15.0)
    assert [a.action_id for a in node.engine] == ["vote:v1"]


# -- token, drain, limits ------------------------------------------------------------------------
def test_an_expired_token_is_told_and_closed() -> None:
    node = Node()
    aria = node.join("aria", expires_in=60)
    node.advance(59.9)
    assert aria.id not in node.closes
    node.advance(0.2)
    assert error_code(node.last(aria)) == "token_expired"
    assert node.closes[aria.id] == (CloseCode.TOKEN_EXPIRED, "token expired")


def test_a_connection_lost_before_its_token_expires_cancels_the_expiry() -> None:
    node = Node()
    aria = node.join("aria", expires_in=60)
    node.lose(aria)
    node.advance(120)
    assert aria.id not in node.closes


def test_drain_closes_everyone_with_going_away_and_arms_no_grace() -> None:
    node = Node()
    aria, borin = node.join("aria"), node.join("borin")
    node.run(node.core.drain())
    assert node.closes[aria.id][0] == node.closes[borin.id][0] == CloseCode.GOING_AWAY
    node.lose(aria)
    node.lose(borin)
    node.advance(60)
    assert node.members() == {"aria": True, "borin": True}  # the new node's clients come back


def test_a_connection_lost_while_draining_hands_its_grace_over() -> None:
    """A draining node will not run the grace timers of the connections it closes: their
    ``Disconnect`` says so (``handover``), and the backend's other nodes settle them."""
    node = Node()
    aria, borin, cora = node.join("aria"), node.join("borin"), node.join("cora")
    lost = node.core.connection_lost(borin, node.now)
    assert [c.handover for c in lost if isinstance(c, Disconnect)] == [False]
    node.run(lost)
    on_its_way = node.core.connection_lost(cora, node.now)  # its Disconnect not run yet
    node.run(node.core.drain())
    # borin's grace, begun before the drain, runs: handed over (its timer will not fire here)
    assert node.handed_over == [("borin", node.now)]
    node.run(on_its_way)  # cora's disconnect comes back after the drain began: handed over
    assert node.handed_over == [("borin", node.now), ("cora", node.now)]
    lost = node.core.connection_lost(aria, node.now)
    assert [c.handover for c in lost if isinstance(c, Disconnect)] == [True]
    node.run(lost)
    assert len(node.handed_over) == 2  # (aria's grace went with her Disconnect)


def test_excess_messages_are_refused_and_too_many_strikes_close_the_connection() -> None:
    node = Node()
    aria = node.join("aria")
    for n in range(90):  # 60 a burst: the rest refused as rate limited, each a strike
        node.act(aria, f"x{n}")  # the first accepted, the next ones busy (not strikes)
    codes = [error_code(f) for f in node.frames[aria.id] if f["type"] == t.ERROR]
    assert "rate_limited" in codes
    assert node.closes[aria.id][0] == CloseCode.POLICY_VIOLATION


def test_ping_and_pong_frames_share_the_message_rate_and_a_flood_of_them_is_closed() -> None:
    """A control frame within the rate is answered (None: the transport sends the pong) and
    takes a token: messages after a burst of pings meet the limit; past the burst a ping is
    refused (``rate_limited``), and a flood of them earns the policy close. The rate refills
    with time (virtual)."""
    node = Node()
    aria = node.join("aria")
    answered = [node.core.control_frame(aria, node.now) is None for _ in range(60)]
    assert all(answered)  # the burst (60)
    node.send(aria, {"type": t.PING, "payload": {}})
    assert error_code(node.last(aria)) == "rate_limited"  # a message meets the spent rate
    node.now += 1.0  # 30 tokens back
    assert [node.core.control_frame(aria, node.now) is None for _ in range(30)] == [True] * 30
    for _ in range(40):
        refusal = node.core.control_frame(aria, node.now)
        assert refusal is not None
        node.run(refusal)
    codes = {error_code(f) for f in node.frames[aria.id] if f["type"] == t.ERROR}
    assert codes == {"rate_limited"}
    assert node.closes[aria.id][0] == CloseCode.POLICY_VIOLATION


def test_a_refusal_a_connection_had_is_not_sent_again_after_hundreds_of_others() -> None:
    """A client acting six times a second, most of it refused: its connection remembered the
    last 16 refusals only, so the one it had 10 s earlier, sent again by the accepting node at
    the deadline (another node's look, through the character's channel), reached it twice
    (Cluster and Sentinel probe). Remembered: every refusal of a client refused at its full
    message rate until the deadline."""
    node = Node()
    aria = node.join("aria")

    def refusal(action_id: str) -> bytes:
        payload = {
            "code": "action_rejected",
            "message": "no",
            "retryable": False,
            "in_reply_to": {"action_id": action_id, "type": "action.request"},
        }
        return orjson.dumps({"type": t.ERROR, "trace_id": "t", "payload": payload})

    for n in range(360):  # 30 a second for 10 s, after a burst of 60
        node.run(node.core.direct_received("p1", "aria", refusal(f"a{n}")))
    errors = [f for f in node.frames[aria.id] if f["type"] == t.ERROR]
    assert len(errors) == 360
    node.run(node.core.direct_received("p1", "aria", refusal("a0")))  # the deadline's, again
    assert [f for f in node.frames[aria.id] if f["type"] == t.ERROR] == errors


def test_a_left_character_is_closed_on_this_node() -> None:
    node = Node()
    aria = node.join("aria")
    node.send(aria, {"type": t.PARTY_LEAVE, "payload": {"character_id": "aria"}})
    assert node.closes[aria.id] == (CloseCode.NORMAL, "left the party")
    assert node.members().get("aria") is not True


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["aria", "borin"]), st.integers(0, 3), st.floats(0, 8)),
        max_size=25,
    )
)
def test_every_accepted_action_gets_exactly_one_final_answer(
    script: list[tuple[str, int, float]],
) -> None:
    """Whatever actions are sent and however long the engine takes (here: never), every action
    the engine was given is answered once to its sender, and nothing is left to watch."""
    node = Node()
    conns = {"aria": node.join("aria"), "borin": node.join("borin")}
    for character, n, wait in script:
        node.act(conns[character], f"{character}-{n}")
        node.advance(wait)
    node.advance(60)
    assert node.core.pending == {}
    for pending in node.engine:
        answers = [
            f
            for f in node.frames[conns[pending.character_id].id]
            if f["type"] == t.ERROR
            and f["payload"].get("code") == "action_timeout"
            and f["payload"]["in_reply_to"].get("action_id") == pending.action_id
        ]
        assert answers and all(a == answers[0] for a in answers)  # one answer, maybe resent


# -- live narration and actions seen as they happen -----------------------------------------------
def _narrate(node: Node, stream: str, index: int, text: str, done_: bool = False) -> list[str]:
    """The engine's piece through the backend (as ``BackendPublisher.narrate`` sends it)."""
    p = transient.piece(
        stream, index, text, done=done_, action_id=None, trace_id=None, now=node.now
    )
    return [o.value for o in done(node.backend.narrate("p1", [p], node.now))]


def _deltas(node: Node, conn: Connection) -> list[tuple[str, int, str, bool]]:
    return [
        (
            f["payload"]["stream_id"],
            f["payload"]["index"],
            f["payload"]["text"],
            f["payload"]["done"],
        )
        for f in node.frames.get(conn.id, [])
        if f["type"] == t.NARRATION_DELTA
    ]


def test_narration_reaches_every_member_and_a_late_joiner_gets_the_text_so_far() -> None:
    node = Node()
    aria = node.join("aria")
    assert _narrate(node, "n1", 0, "The gate ") == ["taken"]
    assert _narrate(node, "n1", 1, "gives way") == ["taken"]
    assert _narrate(node, "n1", 1, "gives way") == ["repeat"]  # a retry: nothing is sent again
    assert _deltas(node, aria) == [("n1", 0, "The gate ", False), ("n1", 1, "gives way", False)]
    borin = node.join("borin")
    hello = node.frames[borin.id][0]
    assert hello["payload"]["narration"] == [
        {"stream_id": "n1", "index": 1, "text": "The gate gives way"}
    ]
    assert _narrate(node, "n1", 2, ".", done_=True) == ["taken"]
    assert _deltas(node, borin) == [("n1", 2, ".", True)]
    later = node.join("cyra")
    assert node.frames[later.id][0]["payload"]["narration"] == []  # an ended stream is not restated


def test_a_stream_left_open_is_closed_after_the_idle_time_once() -> None:
    node = Node(rules=Rules(action_timeout=5.0, presence_grace=10.0, narration_idle=30.0))
    aria = node.join("aria")
    _narrate(node, "n1", 0, "Once upon")
    node.advance(20.0)
    _narrate(node, "n1", 1, " a time")
    node.advance(29.0)  # 29 s after the last piece: still open
    assert _deltas(node, aria)[-1] == ("n1", 1, " a time", False)
    node.advance(1.5)
    assert _deltas(node, aria)[-1] == ("n1", 2, "", True)
    assert _narrate(node, "n1", 2, "late") == ["ended"]  # the engine's next piece: too late
    assert _narrate(node, "n1", 1, " a time") == ["repeat"]
    node.advance(120.0)
    assert [d for d in _deltas(node, aria) if d[3]] == [("n1", 2, "", True)]
    # nothing written for kept_for(idle): the book is forgotten, as the Redis hash expires
    assert _narrate(node, "n1", 3, "late") == ["gap"]


@pytest.mark.parametrize("joined", ["before the pieces", "after them (from its hello)"])
def test_a_stream_the_backend_forgot_before_closing_it_is_closed_for_the_members_here(
    joined: str,
) -> None:
    """Redis stalled longer than the narration's keep time (2 x narration_idle): when it came
    back, the hash had expired, close_narration found nothing, and the members connected all
    along were never sent the closing piece (their screens showed the stream live until their
    next hello). The node closes it for its own members, once, after the last index it saw."""
    node = Node(rules=Rules(action_timeout=5.0, presence_grace=10.0, narration_idle=30.0))
    aria = node.join("aria") if joined == "before the pieces" else None
    _narrate(node, "n1", 0, "Once upon")
    _narrate(node, "n1", 1, " a time")
    if aria is None:
        aria = node.join("aria")
    node.backend.close_narration = (  # type: ignore[method-assign]
        lambda party_id, stream_id, now, trace_id, action_id=None: _async(transient.GONE)
    )
    node.advance(31.0)
    assert [d for d in _deltas(node, aria) if d[3]] == [("n1", 2, "", True)]
    node.advance(120.0)
    assert [d for d in _deltas(node, aria) if d[3]] == [("n1", 2, "", True)]  # once
    assert not node.core._narrating  # not watched any more


async def _async(value: Any) -> Any:
    return value


def test_a_reconnect_does_not_put_the_close_of_a_dead_stream_off() -> None:
    node = Node(rules=Rules(action_timeout=5.0, presence_grace=10.0, narration_idle=30.0))
    aria = node.join("aria")
    _narrate(node, "n1", 0, "The engine died here")
    for _ in range(3):  # a member reconnects every 20 s; the stream's hello restates it
        node.advance(20.0)
        node.lose(aria)
        aria = node.join("aria")
    closing = [d for c in node.frames for d in _deltas_of(node.frames[c]) if d[3]]
    assert closing and closing[0][:2] == ("n1", 1)


def _deltas_of(frames: list[dict[str, Any]]) -> list[tuple[str, int, str, bool]]:
    return [
        (
            f["payload"]["stream_id"],
            f["payload"]["index"],
            f["payload"]["text"],
            f["payload"]["done"],
        )
        for f in frames
        if f["type"] == t.NARRATION_DELTA
    ]


def test_a_book_keeps_a_bounded_number_of_streams_and_never_forgets_an_open_one() -> None:
    book = transient.NarrationBook(idle=30.0)

    def take(stream: str, index: int, done: bool, now: float) -> str:
        p = transient.piece(stream, index, "x", done=done, action_id=None, trace_id=None, now=now)
        return book.take(p, now).value

    for i in range(transient.MAX_OPEN_STREAMS):
        assert take(f"open{i}", 0, False, T0) == "taken"
    for i in range(200):  # many one-piece streams, all within one idle time
        assert take(f"short{i}", 0, True, T0 + i * 0.01) == "taken"
        assert len(book) <= transient.MAX_KEPT_STREAMS
    assert [s["stream_id"] for s in book.open_streams(T0 + 3)] == [
        f"open{i}" for i in range(transient.MAX_OPEN_STREAMS)
    ]
    assert take("open0", 1, False, T0 + 3) == "taken"  # the open ones go on
    assert take("short199", 0, True, T0 + 3) == "repeat"  # a recent ended one is remembered


def test_pieces_out_of_order_or_over_the_limits_are_refused() -> None:
    node = Node()
    node.join("aria")
    assert _narrate(node, "n1", 1, "no first piece") == ["gap"]
    assert _narrate(node, "n1", 0, "a") == ["taken"]
    assert _narrate(node, "n1", 2, "skips one") == ["gap"]
    assert _narrate(node, "n1", 1, "x" * transient.MAX_STREAM_CHARS) == ["too_long"]
    for i in range(2, transient.MAX_OPEN_STREAMS + 1):
        assert _narrate(node, f"n{i}", 0, "open") == ["taken"]
    assert _narrate(node, "n-many", 0, "one too many") == ["too_many"]


def test_every_member_sees_an_action_in_flight_until_its_result_and_a_joiner_sees_it_too() -> None:
    node = Node()
    aria = node.join("aria")
    borin = node.join("borin")
    node.act(aria, "a1")
    accepted = node.frames[borin.id][-1]
    assert accepted["type"] == t.ACTION_ACCEPTED
    assert accepted["payload"] == {
        "action_id": "a1",
        "character_id": "aria",
        "action_type": "skill_check",
    }
    cyra = node.join("cyra")
    assert node.frames[cyra.id][0]["payload"]["actions_in_flight"] == [accepted["payload"]]
    node.answer(node.engine[0])
    assert node.types(borin)[-1] == t.ACTION_RESULT
    dara = node.join("dara")
    assert node.frames[dara.id][0]["payload"]["actions_in_flight"] == []


def test_an_action_the_engine_refuses_is_told_failed_to_every_member() -> None:
    node = Node()
    aria = node.join("aria")
    borin = node.join("borin")
    node.act(aria, "a1")
    refusal = codec.encode(
        codec.envelope(
            t.ERROR,
            {
                "code": "action_rejected",
                "message": "no",
                "retryable": False,
                "in_reply_to": {"trace_id": None, "type": None, "action_id": "a1"},
            },
            ts=node.now,
        )
    )
    assert done(node.backend.refuse_action("p1", "a1", "aria", refusal, node.now))
    assert node.frames[borin.id][-1]["type"] == t.ACTION_FAILED
    assert node.frames[borin.id][-1]["payload"]["code"] == "action_rejected"
    assert not done(node.backend.refuse_action("p1", "a1", "aria", refusal, node.now))
    assert [f["type"] for f in node.frames[borin.id]].count(t.ACTION_FAILED) == 1


def _syncing(party: str = "p1") -> Connection:
    binding = Binding(party, "r1", "aria", "Aria")
    return Connection("c1", binding, ConnectionLimits(LimitPolicy()), T0 + 3600)


def test_a_syncing_connection_gets_the_pieces_after_its_hello_once_and_no_stale_accepted() -> None:
    conn = _syncing()
    assert conn.buffer is not None
    piece = transient.piece
    frames = [
        piece("n1", 2, "old", done=False, action_id=None, trace_id=None, now=T0),  # in the hello
        piece("n1", 3, "new", done=False, action_id=None, trace_id=None, now=T0),
        piece("n2", 4, "mid", done=False, action_id=None, trace_id=None, now=T0),  # unknown stream
        piece("n3", 0, "first", done=False, action_id=None, trace_id=None, now=T0),
        piece("n3", 1, "second", done=False, action_id=None, trace_id=None, now=T0),
    ]
    conn.buffer.extend(p.transient() for p in frames)
    stale = transient.accepted("a1", "aria", "choice", "t1", T0)
    fresh = transient.accepted("a2", "aria", "choice", "t2", T0)
    result = Event("p1", 5, t.ACTION_RESULT, {"action_id": "a1"}, "t1", b"r5")
    conn.buffer.extend([stale, result, fresh])
    out, gap = conn.go_live(5, {"n1": 2})
    assert not gap
    assert out == [frames[1].frame, frames[3].frame, frames[4].frame, fresh.data]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["s1", "s2", "s3"]),
            st.integers(min_value=0, max_value=4),
            st.text(max_size=6),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_narration_book_keeps_each_stream_whole_in_order_and_never_twice(
    ops: list[tuple[str, int, str, bool]],
) -> None:
    book = transient.NarrationBook(idle=30.0)
    taken: dict[str, list[tuple[int, str, bool]]] = {}
    for i, (stream, index, text, is_done) in enumerate(ops):
        p = transient.piece(
            stream, index, text, done=is_done, action_id=None, trace_id=None, now=T0
        )
        outcome = book.take(p, T0 + i)
        if outcome is transient.Outcome.TAKEN:
            taken.setdefault(stream, []).append((index, text, is_done))
    for pieces in taken.values():
        assert [index for index, _, _ in pieces] == list(range(len(pieces)))  # 0, 1, 2, ... once
        assert not any(d for _, _, d in pieces[:-1])  # nothing after the last piece
    open_ = {s["stream_id"]: s for s in book.open_streams(T0 + len(ops))}
    for stream, pieces in taken.items():
        if pieces[-1][2]:
            assert stream not in open_
        else:
            assert open_[stream]["text"] == "".join(text for _, text, _ in pieces)
            assert open_[stream]["index"] == len(pieces) - 1


def test_a_started_action_outliving_its_deadline_and_a_vote_choice_stay_in_flight() -> None:
    node = Node()
    aria = node.join("aria")
    node.act(aria, "a1")
    (pending,) = node.engine
    claim, _ = done(node.backend.claim_action("p1", "a1", node.now, b"{}", pending.deadline))
    assert claim is Claim.START
    node.advance(5.01)  # its deadline: started, so not refused; aria is free, a1 still in flight

    def listed(who: str) -> list[str]:
        hello = node.frames[node.join(who).id][0]["payload"]
        return [a["action_id"] for a in hello["actions_in_flight"]]

    assert listed("borin") == ["a1"]
    _start_vote(node)
    node.send(aria, {"type": t.VOTE_CAST, "payload": {"vote_id": "v1", "option": "A"}})
    node.send(
        node.join("borin2"), {"type": t.VOTE_CAST, "payload": {"vote_id": "v1", "option": "A"}}
    )
    node.advance(60.0)  # the vote's choice has no deadline: listed until its answer
    assert "vote:v1" in listed("cyra")
    node.answer(pending)
    assert listed("dara") == ["vote:v1"]
