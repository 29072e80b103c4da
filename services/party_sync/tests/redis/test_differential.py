"""One behaviour, two backends, proven on generated stories: the same operations, at the same
``now``, against ``MemoryBackend`` (the pure rules of ``party_sync.core``) and ``RedisBackend``
(their rendering in ``backends/lua/`` and ``redis_votes.py``) give the same observables.

Compared, after every step: what the call returned (events with their seq, type, payload and
bytes; verdicts, claims, sweeps, refusals, booleans, exceptions), the frames each party's listener
was given (events and direct messages, in order), and, when the story asks, the snapshot behind
``system.hello``, a replay from a resume point and what history holds (the operators' view).
History is bounded by count, bytes and age at once (``SETTINGS``), as the stories' time moves
(virtual: both backends stamp events with the callers' ``now``), and by count alone in a second
run (the plain header, unstamped entries). Only what must differ is normalised:

- epochs are random per backend: each is replaced by the order it first appeared in (``E0``,
  ``E1``...), so a new epoch on one side only is still a difference;
- trace ids the backends make up themselves (the joins ``refresh`` announces, the leaves of
  ``expire``) are replaced by ``<generated>`` once checked to be 32 hex digits; every other trace
  id is the caller's and must come back as given;
- lists that span several parties (``expire``, ``refresh``, ``due_votes``) are compared in party
  order: only the order within a party (its seq) is a contract. ``unapplied_votes`` is compared as
  returned: both hand the kept ``vote.finished`` bodies over in one order (parties by their last
  vote's deadline, each party's decisions oldest first, then by vote id), with seq 0.

The stories are drawn by hypothesis, derandomized (the same examples on every run; CI is
reproducible), over two parties, three characters with three connections each, and operations
chosen so that a gateway could have made them (a connection is refreshed or closed only while it
is open). Time moves in quarter seconds, which both backends render exactly (Lua keeps times as
``%.6f`` text).

What the generator deliberately leaves alone, because the two backends differ by design:

- Redis's settle deadline (``RedisOptions.presence_grace``): a node that dies mid-grace is swept
  by any other node; the embedded backend has no other node. The grace is set beyond any story.
- the party and action-record TTLs (Redis expires keys on its own clock, not the callers' ``now``):
  set beyond any story's length; ``test_backend.py`` covers them on Redis.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from party_sync.backends.base import Backend, BackendSettings
from party_sync.backends.memory import MemoryBackend
from party_sync.backends.redis_backend import RedisBackend, RedisOptions
from party_sync.core import transient
from party_sync.core.actions import Verdict
from party_sync.core.binding import Binding
from party_sync.core.events import Event
from party_sync.core.history import ResumePoint
from party_sync.core.snapshot import Snapshot
from party_sync.core.transient import Transient
from party_sync.core.votes import VoteSpec
from party_sync.protocol import codec
from ps_testkit.client import wait_until
from ps_testkit.redis_server import RedisServer

pytestmark = pytest.mark.redis

HISTORY = 6  # small, so that stories trim history and replays run out of it
# and bytes and age bounds that bind too: ~5 events of ~400 bytes (a scene 2 alone is larger:
# the newest is kept anyway), events older than two or three of the longest steps of time
HISTORY_BYTES, HISTORY_AGE = 2000, 12.0
SETTINGS = BackendSettings(
    narration_idle=5.0,
    history_size=HISTORY,
    history_max_bytes=HISTORY_BYTES,
    history_max_age=HISTORY_AGE,
    presence_ttl=10.0,
    action_timeout=2.0,
    action_record_ttl=10_000_000.0,  # beyond any story: Redis expires records on its own clock
    idle_party_ttl=10_000_000.0,  # idem, parties
)
GRACE = 10_000_000.0  # RedisOptions.presence_grace: no settle deadline passes in a story
T0 = 1_800_000_000.0

PARTIES = ("p1", "p2")
RUNS = {"p1": "r1", "p2": "r2"}
CHARACTERS = ("aria", "borin", "cara")
# two names each (a rejoin may bring another); quotes, a slash and non-ASCII text, because the
# joins refresh.lua builds are encoded by Lua's cjson, and the others by orjson
NAMES = {
    "aria": ("Aria", "Aria the Bold"),
    "borin": ('Borin "Ironfoot"', "Borin/Ø"),
    "cara": ("Cara", "Çara 🗡 <b>"),
}
CONNECTIONS = ("n1.0a", "n2.0b")  # per character and party: two tabs, on two nodes
# an action id: the character's own first or second (mostly), one that two characters use (TAKEN),
# or the id of a vote's decision (a party-level action)
ACTIONS = ("1", "1", "2", "shared", "vote:v1")
RECENT = 4  # or one of the last RECENT actions begun in the story (of whichever party)
VOTE_IDS = ("v1", "v2")  # and v3 (see Driver.prepare)
BALLOTS = ("L", "R", "R", "S", "X")  # X: not an option
STEPS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 11.0)
HEX32 = re.compile(r"[0-9a-f]{32}")


def action_id(character: str, which: str) -> str:
    return f"{character}-{which}" if which in ("1", "2") else which


# -- the operations -------------------------------------------------------------------------------
# Each is a tuple (name, arguments...) drawn independently of the state; the driver turns one
# that no gateway would make in the current state (closing a connection that is not open) into
# nothing, which keeps the stories short to shrink. Weighted (by repetition) towards the
# operations that make the others interesting: connections, time, the presence sweep.

party_ = st.sampled_from(PARTIES)
character_ = st.sampled_from(CHARACTERS)
action_: st.SearchStrategy[str | int] = st.one_of(
    st.integers(0, RECENT - 1), st.sampled_from(ACTIONS), st.integers(0, RECENT - 1)
)
vote_id_: st.SearchStrategy[str | None] = st.sampled_from((None, *VOTE_IDS, None))  # None: latest
connection_ = st.integers(0, len(CONNECTIONS) - 1)

WEIGHTED: list[tuple[int, st.SearchStrategy[tuple[Any, ...]]]] = [
    # presence
    (4, st.tuples(st.just("connect"), party_, character_, connection_, st.integers(0, 1))),
    (2, st.tuples(st.just("disconnect"), st.integers(0, 11))),  # one of the open connections
    (1, st.tuples(st.just("settle"), party_, character_)),
    (1, st.tuples(st.just("leave"), party_, character_)),
    (1, st.tuples(st.just("refresh"), st.integers(0, 2 ** (len(PARTIES) * 3 * 2) - 1))),
    (3, st.tuples(st.just("advance"), st.sampled_from(STEPS))),
    (2, st.tuples(st.just("expire"))),
    (1, st.tuples(st.just("tick"))),  # a healthy node: refresh everything it has, then sweep
    # the engine's events
    (2, st.tuples(st.just("result"), party_, character_, action_)),
    (1, st.tuples(st.just("scene"), party_, st.integers(1, 3))),
    (1, st.tuples(st.just("combat"), party_, st.booleans())),
    (1, st.tuples(st.just("party_state"), party_, st.sampled_from(["active", "wiped"]))),
    # several of them in one step (publish_many), as an engine answers an action
    (
        2,
        st.tuples(
            st.just("many"),
            party_,
            st.lists(
                st.one_of(
                    st.tuples(st.just("result"), character_, action_),
                    st.tuples(st.just("scene"), st.integers(1, 3)),
                    st.tuples(st.just("combat"), st.booleans()),
                ),
                min_size=1,
                max_size=3,
            ),
        ),
    ),
    # the action ledger
    # (…, timed, claimed: the claim riding on the acceptance, as for the in-process link)
    (3, st.tuples(st.just("begin"), party_, character_, action_, st.booleans(), st.booleans())),
    (
        2,
        st.tuples(
            st.just("claim"), party_, character_, action_, st.sampled_from([None, -1.0, 1.0])
        ),
    ),
    (2, st.tuples(st.just("time_out"), party_, character_, action_)),
    (1, st.tuples(st.just("refuse"), party_, character_, action_)),
    # votes
    (
        2,
        st.tuples(
            st.just("start_vote"), party_, vote_id_, st.sampled_from([3.0, 30.0]), st.booleans()
        ),
    ),
    (4, st.tuples(st.just("cast"), party_, character_, vote_id_, st.sampled_from(BALLOTS))),
    (1, st.tuples(st.just("finish_vote"), party_, vote_id_)),
    (1, st.tuples(st.just("due_votes"))),
    (1, st.tuples(st.just("unapplied"), st.sampled_from([0.0, 5.0]))),
    (1, st.tuples(st.just("mark_applied"), party_, vote_id_)),
    (1, st.tuples(st.just("vote_run"), party_, vote_id_)),
    # reading
    (2, st.tuples(st.just("snapshot"), party_)),
    (
        2,
        st.tuples(
            st.just("replay"),
            party_,
            st.one_of(st.integers(0, 3), st.integers(-1, HISTORY + 2)),
            st.sampled_from([True, True, True, False]),  # False: another epoch
        ),
    ),
    (1, st.tuples(st.just("runs"), party_)),
    (2, st.tuples(st.just("held"), party_, st.integers(0, 3))),
    (1, st.tuples(st.just("direct"), party_, character_)),
    (
        3,
        st.tuples(
            st.just("narrate"),
            party_,
            st.lists(
                st.tuples(
                    st.sampled_from(["s1", "s2"]),
                    st.integers(0, 3),
                    st.sampled_from(["", "The gate ", 'gives "way" ', "é \u2028 ✓"]),
                    st.booleans(),
                ),
                min_size=1,
                max_size=3,
            ),
        ),
    ),
    (1, st.tuples(st.just("close_narration"), party_, st.sampled_from(["s1", "s2"]))),
]
OPERATIONS: st.SearchStrategy[tuple[Any, ...]] = st.one_of(
    [strategy for weight, strategy in WEIGHTED for _ in range(weight)]
)


# -- the listeners --------------------------------------------------------------------------------


class Recorder:
    """A ``PartyListener`` that keeps every frame it is given, raw (normalised when compared)."""

    def __init__(self) -> None:
        self.frames: list[tuple[Any, ...]] = []
        self._changed = asyncio.Event()

    def on_event(self, event: Event) -> None:
        self._add(("event", event))

    def on_direct(self, character_id: str, data: bytes) -> None:
        self._add(("direct", character_id, data))

    def on_resync(self, epoch: str | None = None) -> None:
        self._add(("resync",))

    def on_transient(self, items: Sequence[Transient]) -> None:
        for item in items:
            self._add(("transient", item.type, item.data))

    def _add(self, frame: tuple[Any, ...]) -> None:
        self.frames.append(frame)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        """Until at least ``count`` frames arrived (Redis delivers through pub/sub)."""
        async with asyncio.timeout(5):
            while len(self.frames) < count:
                self._changed.clear()
                await self._changed.wait()


# -- normalising what may differ ------------------------------------------------------------------


@dataclass
class Normaliser:
    """One backend's view made comparable (see the module docstring for what and why)."""

    traces: set[str]  # the trace ids the story gave (shared by both sides)
    epochs: dict[str, str] = field(default_factory=dict)

    def epoch(self, epoch: str) -> str:
        return self.epochs.setdefault(epoch, f"E{len(self.epochs)}")

    def trace(self, trace_id: Any) -> Any:
        if trace_id in self.traces:
            return trace_id
        assert isinstance(trace_id, str) and HEX32.fullmatch(trace_id), trace_id
        return "<generated>"

    def data(self, data: bytes) -> Any:
        """An encoded message: its JSON with made-up trace ids replaced. Not its bytes: the
        bodies Lua builds (cjson) order keys and escape text their own way, to the same JSON."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data  # an opaque refusal given by the story
        if isinstance(message, dict) and "trace_id" in message:
            message["trace_id"] = self.trace(message["trace_id"])
        return message

    def event(self, event: Event | None) -> Any:
        if event is None:
            return None
        return (
            event.party_id,
            event.seq,
            event.type,
            event.payload,
            self.trace(event.trace_id),
            self.data(event.data),
        )

    def events(self, events: Sequence[Event], *, by_party: bool = False) -> list[Any]:
        found = [self.event(e) for e in events]
        return sorted(found, key=lambda e: (e[0], e[1])) if by_party else found

    def snapshot(self, snap: Snapshot) -> Any:
        return (
            self.epoch(snap.epoch),
            snap.seq,
            snap.members,
            snap.status,
            snap.run_status,
            snap.scene_number,
            snap.scene,
            snap.combat,
            snap.party_state,
            snap.vote,
            dict(snap.ballots),
        )

    def frame(self, frame: tuple[Any, ...]) -> Any:
        if frame[0] == "event":
            return "event", self.event(frame[1])
        if frame[0] == "direct":
            return "direct", frame[1], self.data(frame[2])
        if frame[0] == "transient":
            return "transient", frame[1], self.data(frame[2])
        return frame

    def value(self, value: Any) -> Any:
        """Whatever else a call returns."""
        if isinstance(value, Event):
            return self.event(value)
        if isinstance(value, Verdict):
            return (
                value.decision,
                None if value.result is None else self.data(value.result),
                value.blocking_action_id,
            )
        if isinstance(value, bytes):
            return self.data(value)
        if isinstance(value, tuple | list):
            return type(value)(self.value(v) for v in value)
        return value


# -- the story's driver ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One backend call, the same for both sides. ``run`` makes it on one backend and returns
    its result normalised (``norm`` is that backend's ``Normaliser``)."""

    text: str
    run: Callable[[Backend, Normaliser], Awaitable[Any]]


def binding(party: str, character: str, name: int = 0) -> Binding:
    return Binding(party, RUNS[party], character, NAMES[character][name])


def message(type_: str, payload: dict[str, Any], now: float, trace: str) -> dict[str, Any]:
    return codec.envelope(type_, payload, ts=now, trace_id=trace)


def refusal(step: int) -> bytes:
    error = {"code": "action_timeout", "message": f"refusal {step}", "retryable": True}
    return codec.encode(codec.envelope("system.error", error, ts=T0, trace_id="e" * 32))


class Driver:
    """The state a gateway would know (the time, its open connections) and the calls it makes."""

    def __init__(self) -> None:
        self.now = T0
        self.step = 0
        self.traces: set[str] = {"e" * 32}
        self.open: dict[tuple[str, str, int], Binding] = {}  # (party, character, connection)
        self.finished: set[tuple[str, str]] = set()  # votes whose vote.finished was published
        self.started: dict[str, str] = {}  # party → the vote it started last
        self.begun: list[tuple[str, str, str]] = []  # (party, character, action_id), in order

    def new_trace(self) -> str:
        trace = f"{self.step:032x}"
        self.traces.add(trace)
        return trace

    def prepare(self, op: tuple[Any, ...]) -> Call | None:
        """The call for ``op`` now (updating the driver's state), or None: nothing to do."""
        self.step += 1
        now, trace, kind = self.now, self.new_trace(), op[0]
        text = f"{self.step}: {op} at T0+{now - T0}"
        if kind == "advance":
            self.now += op[1]
            return None
        if kind == "connect":
            _, party, character, conn, name = op
            if (party, character, conn) in self.open:
                return None
            b = self.open[party, character, conn] = binding(party, character, name)
            cid = CONNECTIONS[conn]

            async def connect(be: Backend, n: Normaliser) -> Any:
                return n.event(await be.connect(b, cid, now, trace))

            return Call(text, connect)
        if kind == "disconnect":
            if not self.open:
                return None
            key = sorted(self.open)[op[1] % len(self.open)]
            closed = self.open.pop(key)
            cid = CONNECTIONS[key[2]]
            text = f"{text} {key}"

            async def disconnect(be: Backend, n: Normaliser) -> Any:
                return await be.disconnect(closed, cid, now)

            return Call(text, disconnect)
        if kind in ("settle", "leave"):
            _, party, character = op
            b = binding(party, character)

            async def settle(be: Backend, n: Normaliser) -> Any:
                call = be.settle if kind == "settle" else be.leave
                return n.event(await call(b, now, trace))

            return Call(text, settle)
        if kind == "refresh":
            chosen = [
                (b, CONNECTIONS[key[2]])
                for i, (key, b) in enumerate(sorted(self.open.items()))
                if op[1] >> i & 1
            ]
            if not chosen:
                return None

            async def refresh(be: Backend, n: Normaliser) -> Any:
                return n.events(await be.refresh(chosen, now), by_party=True)

            return Call(f"{text} {chosen}", refresh)
        if kind in ("expire", "tick"):
            live = [(b, CONNECTIONS[key[2]]) for key, b in sorted(self.open.items())]
            tick = kind == "tick"

            async def expire(be: Backend, n: Normaliser) -> Any:
                joined = await be.refresh(live, now) if tick and live else []
                return n.events(joined, by_party=True), n.events(
                    await be.expire(now), by_party=True
                )

            return Call(text, expire)
        if kind in ("result", "scene", "combat", "party_state"):
            party, msg = self._engine_message(op, now, trace)

            async def publish(be: Backend, n: Normaliser) -> Any:
                return n.event(await be.publish(party, msg, now))

            return Call(text, publish)
        if kind == "many":
            _, party, parts = op
            msgs = [self._engine_message((k, party, *rest), now, trace)[1] for k, *rest in parts]

            async def publish_many(be: Backend, n: Normaliser) -> Any:
                return n.events(await be.publish_many(party, msgs, now))

            return Call(text, publish_many)
        if kind == "begin":
            _, party, character, which, timed, claimed = op
            party, character, action = self.action(party, character, which)
            self.begun.append((party, character, action))

            async def begin(be: Backend, n: Normaliser) -> Any:
                verdict = await be.begin_action(
                    party, character, action, now, timed, "combat", trace_id=trace, claimed=claimed
                )
                return n.value(verdict)

            return Call(text, begin)
        if kind == "claim":
            _, party, character, which, carried = op
            party, character, action = self.action(party, character, which)
            deadline = None if carried is None else now + carried
            no = refusal(self.step)

            async def claim(be: Backend, n: Normaliser) -> Any:
                return n.value(await be.claim_action(party, action, now, no, deadline))

            return Call(text, claim)
        if kind == "time_out":
            _, party, character, which = op
            party, character, action = self.action(party, character, which)
            no = refusal(self.step)

            async def time_out(be: Backend, n: Normaliser) -> Any:
                return n.value(await be.time_out_action(party, action, now, no))

            return Call(text, time_out)
        if kind == "refuse":
            _, party, character, which = op
            party, character, action = self.action(party, character, which)
            no = refusal(self.step)

            async def refuse(be: Backend, n: Normaliser) -> Any:
                return await be.refuse_action(party, action, character, no, now)

            return Call(text, refuse)
        if kind == "start_vote":
            _, party, vote_id, timeout, default = op
            vote_id = self.started[party] = vote_id or "v3"
            spec = VoteSpec(
                vote_id,
                "Which way?",
                (("L", "Left"), ("R", "Right"), ("S", "Stay")),
                timeout,
                "default_option" if default else "first_listed",
                "R" if default else None,
            )

            async def start_vote(be: Backend, n: Normaliser) -> Any:
                return n.event(await be.start_vote(party, spec, RUNS[party], now, trace))

            return Call(text, start_vote)
        if kind == "cast":
            _, party, character, vote_id, option = op
            vote_id = self.vote_id(party, vote_id)

            async def cast(be: Backend, n: Normaliser) -> Any:
                refused, events = await be.cast_vote(party, character, vote_id, option, now, trace)
                return refused, n.events(events)

            return Call(text, cast)
        if kind == "finish_vote":
            _, party, vote_id = op
            vote_id = self.vote_id(party, vote_id)

            async def finish(be: Backend, n: Normaliser) -> Any:
                return n.event(await be.finish_vote(party, vote_id, now))

            return Call(text, finish)
        if kind == "due_votes":

            async def due(be: Backend, n: Normaliser) -> Any:
                return sorted(await be.due_votes(now))

            return Call(text, due)
        if kind == "unapplied":
            older = op[1]

            async def unapplied(be: Backend, n: Normaliser) -> Any:
                return n.events(await be.unapplied_votes(now, older))

            return Call(text, unapplied)
        if kind in ("mark_applied", "vote_run"):
            _, party, vote_id = op
            vote_id = self.vote_id(party, vote_id)
            if kind == "mark_applied" and (party, vote_id) not in self.finished:
                return None  # a gateway marks a vote applied once it handed its decision over

            async def votes(be: Backend, n: Normaliser) -> Any:
                if kind == "vote_run":
                    return await be.vote_run(party, vote_id)
                return await be.mark_vote_applied(party, vote_id)

            return Call(text, votes)
        if kind == "snapshot":
            party = op[1]

            async def snapshot(be: Backend, n: Normaliser) -> Any:
                return n.snapshot(await be.snapshot(party, now))

            return Call(text, snapshot)
        if kind == "narrate":
            _, party, specs = op
            pieces = [
                transient.piece(s, i, x, done=d, action_id=None, trace_id=trace, now=now)
                for s, i, x, d in specs
            ]

            async def narrate(be: Backend, n: Normaliser) -> Any:
                return await be.narrate(party, pieces, now)

            return Call(text, narrate)
        if kind == "close_narration":
            _, party, stream = op

            async def close_narration(be: Backend, n: Normaliser) -> Any:
                return await be.close_narration(party, stream, now, trace)

            return Call(text, close_narration)
        if kind == "replay":
            _, party, back, same_epoch = op

            async def replay(be: Backend, n: Normaliser) -> Any:
                snap = await be.snapshot(party)
                epoch = snap.epoch if same_epoch else "another-epoch"
                found = await be.replay(party, ResumePoint(epoch, snap.seq - back), HISTORY - 2)
                return None if found is None else [n.data(d) for d in found]

            return Call(text, replay)
        if kind == "held":  # what history holds, as the operators' API reads it
            _, party, back = op

            async def held(be: Backend, n: Normaliser) -> Any:
                snap = await be.snapshot(party)
                found = await be.admin.events(party, snap.seq - HISTORY - back, HISTORY + 5)
                if found is None:
                    return None
                return found.last_seq, found.oldest_seq, [n.data(d) for d in found.events]

            return Call(text, held)
        if kind == "runs":
            party = op[1]

            async def runs(be: Backend, n: Normaliser) -> Any:
                return await be.party_run(party), await be.run_parties(RUNS[party])

            return Call(text, runs)
        if kind == "direct":
            _, party, character = op
            data = refusal(self.step)

            async def direct(be: Backend, n: Normaliser) -> Any:
                return await be.send_direct(party, character, data)

            return Call(text, direct)
        raise AssertionError(f"unknown operation {op}")

    def action(self, party: str, character: str, which: str | int) -> tuple[str, str, str]:
        """``(party, character, action_id)`` of an operation on an action (see ``ACTIONS``)."""
        if isinstance(which, int):
            if self.begun:
                return self.begun[-1 - which % min(RECENT, len(self.begun))]
            which = "1"
        return party, character, action_id(character, which)

    def vote_id(self, party: str, vote_id: str | None) -> str:
        return vote_id or self.started.get(party, VOTE_IDS[0])

    def _engine_message(
        self, op: tuple[Any, ...], now: float, trace: str
    ) -> tuple[str, dict[str, Any]]:
        kind, party = op[0], op[1]
        if kind == "result":
            _, party, character, which = op
            party, character, action = self.action(party, character, which)
            payload = {
                "action_id": action,
                "character_id": "party" if action.startswith("vote:") else character,
                "action_type": "skill_check",
                "outcome": "success",
                "state": {"hp": 9, "max_hp": 10, "effects": [], "scene_flags": {}},
                "narration": f"Done at step {self.step}, ½ — «ok» / done.",
            }
            return party, message("action.result", payload, now, trace)
        if kind == "scene":
            n = op[2]
            scene = {
                "scene_number": n,
                "scene_id": f"s{n}",
                "title": f"Scene {n} — the gate",
                # scene 2 is larger than the history's bytes bound on its own
                "narration": 'A "gate" / a door.' + (" A long road." * 400 if n == 2 else ""),
                "options": [] if n == 3 else [{"id": "A", "label": "Open"}],
                "kind": "story",
                "progress": 0.5,
            }
            return party, message("scene.update", scene, now, trace)
        if kind == "combat":
            combat = {"active": op[2], "round": self.step, "combatants": []}
            return party, message("combat.update", combat, now, trace)
        state = {"status": op[2], "run_status": "in_progress", "scene_number": 1, "characters": {}}
        return party, message("party.state", state, now, trace)


# -- running a story on both ----------------------------------------------------------------------


async def attempt(call: Call, backend: Backend, norm: Normaliser) -> Any:
    try:
        return await call.run(backend, norm)
    except Exception as exc:  # a refusal by exception (VoteConflict) is an answer too
        return "raised", type(exc).__name__, str(exc)


@dataclass
class Side:
    backend: Backend
    norm: Normaliser
    recorders: dict[str, Recorder]

    def frames(self, party: str, start: int, end: int | None = None) -> list[Any]:
        frames = self.recorders[party].frames[start:end]
        return [self.norm.frame(f) for f in frames]


async def play(ops: Sequence[tuple[Any, ...]], memory: Side, redis: Side, driver: Driver) -> None:
    history: list[str] = []
    for op in ops:
        call = driver.prepare(op)
        if call is None:
            continue
        history.append(call.text)
        story = "\n".join(history)
        seen = {p: len(memory.recorders[p].frames) for p in PARTIES}
        expected = await attempt(call, memory.backend, memory.norm)
        got = await attempt(call, redis.backend, redis.norm)
        assert got == expected, f"the answers differ at the last step of:\n{story}"
        for party in PARTIES:
            count = len(memory.recorders[party].frames)
            await redis.recorders[party].wait_for(count)
            want = memory.frames(party, seen[party], count)
            driver.finished.update(
                (party, f[1].payload["vote_id"])
                for f in memory.recorders[party].frames[seen[party] :]
                if f[0] == "event" and f[1].type == "vote.finished"
            )
            assert redis.frames(party, seen[party], count) == want, (
                f"{party}'s listener got other frames at the last step of:\n{story}"
            )
    # the end: a direct message through each party's channel flushes what pub/sub still holds
    for party in PARTIES:
        for side in (memory, redis):
            await side.backend.send_direct(party, "sentinel", b'{"end":true}')
        await redis.recorders[party].wait_for(len(memory.recorders[party].frames))
        assert redis.frames(party, 0) == memory.frames(party, 0), (
            f"{party}'s listener got other frames in:\n" + "\n".join(history)
        )


@dataclass
class Sides:
    memory: Side
    redis: Side
    driver: Driver


async def _both(
    server: RedisServer, limits: BackendSettings = SETTINGS
) -> tuple[MemoryBackend, RedisBackend]:
    server.command("FLUSHALL")
    redis_backend = RedisBackend(RedisOptions(server.url, presence_grace=GRACE), limits)
    await redis_backend.start()
    return MemoryBackend(limits), redis_backend


async def open_sides(
    server: RedisServer, limits: BackendSettings = SETTINGS
) -> tuple[Sides, Callable[[], Awaitable[None]]]:
    driver = Driver()
    memory_backend, redis_backend = await _both(server, limits)
    sides: list[Side] = []
    subscriptions: list[Any] = []
    for backend in (memory_backend, redis_backend):
        recorders = {p: Recorder() for p in PARTIES}
        for party, recorder in recorders.items():
            subscriptions.append(await backend.subscribe(party, recorder))
        sides.append(Side(backend, Normaliser(driver.traces), recorders))

    async def close() -> None:
        for subscription in subscriptions:
            await subscription.close()
        await redis_backend.close()
        await memory_backend.close()

    return Sides(sides[0], sides[1], driver), close


def stories(min_size: int, max_size: int) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    return st.lists(OPERATIONS, min_size=min_size, max_size=max_size)


DIFFERENTIAL = settings(
    max_examples=300,
    derandomize=True,  # the same stories on every run: a failure in CI fails on a laptop too
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.timeout(600)  # a failure is shrunk to its shortest story: that takes minutes
@DIFFERENTIAL
@given(ops=stories(20, 60))
# Stories the generator found once (shrunk), always played: two characters whose connections
# expire together leave in one order (by id) on both; a voluntary leave's tombstone stops a
# refresh only until it lapses, whether a sweep removed it or not; decisions still unapplied
# survive the votes after them, and are handed over in one order (v1 and v2 finish at the same
# time, v2 first: by vote id; then by when; p2's vote ends before p1's last one: p2 first).
@example(
    ops=[
        ("connect", "p1", "aria", 0, 0),
        ("connect", "p1", "borin", 0, 0),
        ("disconnect", 0),
        ("connect", "p1", "aria", 0, 0),
        ("advance", 10.0),
        ("expire",),
    ]
)
@example(
    ops=[
        ("connect", "p2", "aria", 0, 0),
        ("leave", "p2", "aria"),
        ("advance", 5.0),
        ("refresh", 1),
        ("advance", 5.0),
        ("refresh", 1),
        ("snapshot", "p2"),
    ]
)
@example(
    ops=[
        ("connect", "p1", "aria", 0, 0),
        ("connect", "p2", "borin", 0, 0),
        ("start_vote", "p1", "v2", 30.0, False),
        ("cast", "p1", "aria", "v2", "L"),  # the only one online: finished
        ("start_vote", "p1", "v1", 30.0, True),  # v2 not applied yet
        ("cast", "p1", "aria", "v1", "R"),
        ("start_vote", "p2", "v1", 3.0, False),
        ("unapplied", 0.0),
        ("advance", 5.0),
        ("start_vote", "p1", None, 30.0, False),
        ("cast", "p1", "aria", None, "S"),
        ("finish_vote", "p2", "v1"),
        ("unapplied", 0.0),
        ("unapplied", 5.0),
        ("due_votes",),
        ("mark_applied", "p1", "v2"),
        ("unapplied", 0.0),
        ("vote_run", "p1", "v1"),
        ("mark_applied", "p1", "v1"),
        ("mark_applied", "p1", "v3"),
        ("mark_applied", "p2", "v1"),
        ("unapplied", 0.0),
        ("due_votes",),
    ]
)
# Always played too: an engine's answers in one step (publish_many), the action's result with its
# scene (the lock released, the action answered), the same again (a late copy of the whole
# answer: nothing of it is sequenced), an answer with one result seen and one new (sequenced but
# the old result), a result given before the action began, and a result after its refusal.
@example(
    ops=[
        ("connect", "p1", "aria", 0, 0),
        ("begin", "p1", "aria", "1", True, False),
        ("claim", "p1", "aria", "1", 1.0),
        ("many", "p1", [("result", "aria", "1"), ("scene", 2)]),
        ("many", "p1", [("result", "aria", "1"), ("scene", 1), ("combat", True)]),
        ("snapshot", "p1"),
        ("many", "p1", [("scene", 1), ("result", "aria", "1"), ("result", "borin", "3")]),
        ("snapshot", "p1"),
        ("many", "p1", [("scene", 3), ("result", "borin", "2"), ("result", "borin", "2")]),
        ("begin", "p1", "aria", "2", True, False),
        ("advance", 5.0),
        ("time_out", "p1", "aria", "2"),
        ("many", "p1", [("result", "aria", "2")]),
        ("snapshot", "p1"),
        ("replay", "p1", 1, True),
    ]
)
async def test_memory_and_redis_agree_on_generated_stories(
    redis_server: RedisServer, ops: list[tuple[Any, ...]]
) -> None:
    sides, close = await open_sides(redis_server)
    try:
        await play(ops, sides.memory, sides.redis, sides.driver)
    finally:
        await close()


# History bounded by count alone: the plain "6" header of earlier versions, unstamped entries.
COUNT_ONLY = replace(SETTINGS, history_max_bytes=0, history_max_age=0.0)


@pytest.mark.timeout(600)
@settings(DIFFERENTIAL, max_examples=100)
@given(ops=stories(20, 60))
async def test_memory_and_redis_agree_with_history_bounded_by_count_alone(
    redis_server: RedisServer, ops: list[tuple[Any, ...]]
) -> None:
    sides, close = await open_sides(redis_server, COUNT_ONLY)
    try:
        await play(ops, sides.memory, sides.redis, sides.driver)
    finally:
        await close()


# -- scenarios pinned ----------------------------------------------------------------------------
# Written out so that they stay visible: cases on which Redis and the embedded backend once
# disagreed (the stories found them), and the edges of a vote decision's life. Both backends give
# the same, documented answer.


SPEC = VoteSpec("v1", "Which way?", (("L", "Left"), ("R", "Right")), 3.0)


async def test_a_new_vote_keeps_an_unapplied_decision_on_both(redis_server: RedisServer) -> None:
    """v1 finishes, v2 starts and finishes before v1's decision was handed to the engine: both
    decisions are kept, and handed over (oldest first) until each is marked applied. Redis used
    to lose v1's with the vote record the next vote replaced, the embedded backend with the
    single decision it kept per party."""
    memory, redis = await _both(redis_server)
    norm = Normaliser({"t" * 32})
    try:
        answers = []
        for backend in (memory, redis):
            await backend.connect(binding("p1", "aria"), "n1.0a", T0, "t" * 32)
            await backend.start_vote("p1", SPEC, "r1", T0, "t" * 32)
            await backend.cast_vote("p1", "aria", "v1", "L", T0, "t" * 32)  # finished
            second = VoteSpec("v2", SPEC.question, SPEC.options, SPEC.timeout_s)
            await backend.start_vote("p1", second, "r1", T0 + 1, "t" * 32)  # v1 not applied yet
            before = await backend.unapplied_votes(T0 + 1, 0)
            await backend.cast_vote("p1", "aria", "v2", "R", T0 + 2, "t" * 32)  # finished
            found = [
                before,
                await backend.unapplied_votes(T0 + 2, 0),
                await backend.unapplied_votes(T0 + 2, 1.5),  # v2 closed too recently
            ]
            # the older decision still goes to the party's run (its vote record is v2's now)
            assert await backend.vote_run("p1", "v1") == "r1"
            assert await backend.vote_run("p1", "v2") == "r1"
            await backend.mark_vote_applied("p1", "v1")
            found.append(await backend.unapplied_votes(T0 + 2, 0))
            await backend.mark_vote_applied("p1", "v2")
            found.append(await backend.unapplied_votes(T0 + 2, 0))
            assert [[e.payload["vote_id"] for e in f] for f in found] == [
                ["v1"],
                ["v1", "v2"],
                ["v1"],
                ["v2"],
                [],
            ]
            assert {e.seq for f in found for e in f} == {0}  # the kept body, not re-sequenced
            answers.append([norm.events(f) for f in found])
        assert answers[1] == answers[0]
    finally:
        await redis.close()


async def test_a_forgotten_party_forgets_its_unapplied_decisions_on_both(
    redis_server: RedisServer,
) -> None:
    """The one way a decision is lost, the same on both: the party's whole state goes (Redis: its
    keys expire, ``meta`` first; embedded: the sweep forgets the idle party)."""
    memory, redis = await _both(redis_server)
    try:
        answers = []
        for backend in (memory, redis):
            aria = binding("p1", "aria")
            await backend.connect(aria, "n1.0a", T0, "t" * 32)
            await backend.start_vote("p1", SPEC, "r1", T0, "t" * 32)
            await backend.cast_vote("p1", "aria", "v1", "L", T0, "t" * 32)  # finished
            await backend.disconnect(aria, "n1.0a", T0)
            kept = [e.payload["vote_id"] for e in await backend.unapplied_votes(T0, 0)]
            later = T0 + SETTINGS.idle_party_ttl + 1
            if backend is redis:  # Redis expires the party on its own clock
                meta = redis.keys.party_keys("p1").meta
                redis_server.command("PEXPIRE", meta, "1")
                await wait_until(partial(_gone, redis_server, meta))
            else:
                await backend.expire(later)
            answers.append((kept, await backend.unapplied_votes(later, 0)))
        assert answers[1] == answers[0] == (["v1"], [])
    finally:
        await redis.close()


async def test_marking_an_open_vote_applied_keeps_it_due(redis_server: RedisServer) -> None:
    memory, redis = await _both(redis_server)
    try:
        answers = []
        for backend in (memory, redis):
            await backend.connect(binding("p1", "aria"), "n1.0a", T0, "t" * 32)
            await backend.start_vote("p1", SPEC, "r1", T0, "t" * 32)
            await backend.mark_vote_applied("p1", "v1")  # a gateway only does so once finished
            answers.append(await backend.due_votes(T0 + 3))
        assert answers[1] == answers[0] == [("p1", "v1")]
    finally:
        await redis.close()


def _gone(redis_server: RedisServer, key: str) -> bool:
    return redis_server.command("EXISTS", key) == b":0\r\n"


async def _held_after(
    redis_server: RedisServer, limits: BackendSettings, times: Sequence[float]
) -> list[list[int]]:
    """The seqs each backend holds after scenes published at ``times`` (T0 + each)."""
    memory, redis = await _both(redis_server, limits)
    driver = Driver()
    found = []
    try:
        for backend in (memory, redis):
            for n, at in enumerate(times, start=1):
                _, msg = driver._engine_message(("scene", "p1", 1 + n % 2), T0 + at, "t" * 32)
                await backend.publish("p1", msg, T0 + at)
            held = await backend.admin.events("p1", 0, 100)
            assert held is not None
            found.append([orjson.loads(e)["seq"] for e in held.events])
    finally:
        await redis.close()
    return found


async def test_the_edges_of_the_bytes_and_age_bounds_are_the_same_on_both(
    redis_server: RedisServer,
) -> None:
    """An event exactly max_age old stays, one a millisecond older goes; the held events may make
    exactly max_bytes. Both backends, to the millisecond and the byte."""
    by_age = replace(SETTINGS, history_size=100, history_max_bytes=0, history_max_age=12.0)
    assert await _held_after(redis_server, by_age, [0.0, 12.0]) == [[1, 2], [1, 2]]
    assert await _held_after(redis_server, by_age, [0.0, 12.0, 12.001]) == [[2, 3], [2, 3]]
    assert await _held_after(redis_server, by_age, [0.0, 1.0, 100.0]) == [[3], [3]]

    sizes = []  # the encoded sizes of the three scenes (scene 2, seq 1..3: no bound binds)
    unbounded = MemoryBackend(replace(SETTINGS, history_max_bytes=0, history_max_age=0.0))
    for n in (1, 2, 3):
        _, msg = Driver()._engine_message(("scene", "p1", 1 + n % 2), T0, "t" * 32)
        sizes.append(len((await unbounded.publish("p1", msg, T0)).data))
    exactly = replace(by_age, history_max_bytes=sizes[1] + sizes[2], history_max_age=0.0)
    assert await _held_after(redis_server, exactly, [0.0, 0.0, 0.0]) == [[2, 3], [2, 3]]
    less = replace(exactly, history_max_bytes=sizes[1] + sizes[2] - 1)
    assert await _held_after(redis_server, less, [0.0, 0.0, 0.0]) == [[3], [3]]
