"""Presence: live connections per character, several tabs, expiry by ttl (time passed in)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.core.presence import Presence, PresenceTick, RefreshSchedule, announce_again

TTL = 10.0


@pytest.mark.parametrize("ttl", [0.0, -1.0])
def test_ttl_must_be_positive(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        Presence(ttl)


def test_first_tab_connects_the_character_and_the_last_one_disconnects_it() -> None:
    p = Presence(TTL)
    assert p.connect("aria", "tab-1", now=0.0) is True
    assert p.connect("aria", "tab-2", now=1.0) is False  # a second tab is not a new presence
    assert p.is_connected("aria", now=2.0)
    assert p.connection_count(now=2.0) == 2

    assert p.disconnect("aria", "tab-1", now=3.0) is False  # tab-2 is still open
    assert p.is_connected("aria", now=3.0)
    assert p.disconnect("aria", "tab-2", now=4.0) is True
    assert not p.is_connected("aria", now=4.0)
    assert p.connected(now=4.0) == []
    assert p.connection_count(now=4.0) == 0


def test_characters_are_independent() -> None:
    p = Presence(TTL)
    assert p.connect("aria", "a1", now=0.0)
    assert p.connect("borin", "b1", now=0.0)  # first connection of *borin*
    assert sorted(p.connected(now=1.0)) == ["aria", "borin"]
    assert p.disconnect("aria", "a1", now=1.0) is True
    assert p.connected(now=1.0) == ["borin"]


def test_reconnecting_the_same_connection_id_is_one_connection() -> None:
    p = Presence(TTL)
    assert p.connect("aria", "tab-1", now=0.0)
    assert p.connect("aria", "tab-1", now=1.0) is True  # still its only connection
    assert p.connection_count(now=1.0) == 1
    assert p.disconnect("aria", "tab-1", now=2.0) is True


def test_disconnecting_an_unknown_connection_reports_no_connection_left() -> None:
    p = Presence(TTL)
    assert p.disconnect("ghost", "x", now=0.0) is True
    p.connect("aria", "tab-1", now=0.0)
    assert p.disconnect("aria", "other-tab", now=1.0) is False  # tab-1 is still live
    assert p.is_connected("aria", now=1.0)


def test_a_connection_expires_exactly_ttl_after_its_last_refresh() -> None:
    p = Presence(TTL)
    p.connect("aria", "tab-1", now=100.0)
    assert p.is_connected("aria", now=109.999)
    assert not p.is_connected("aria", now=110.0)  # expires_at <= now is expired


def test_refresh_pushes_the_expiry_forward() -> None:
    p = Presence(TTL)
    p.connect("aria", "tab-1", now=0.0)
    p.refresh("aria", "tab-1", now=8.0)
    assert p.is_connected("aria", now=17.9)
    assert not p.is_connected("aria", now=18.0)


def test_refresh_re_adds_a_forgotten_connection() -> None:
    p = Presence(TTL)
    p.refresh("aria", "tab-1", now=0.0)
    assert p.is_connected("aria", now=5.0)
    assert p.connection_count(now=5.0) == 1


def test_connect_after_every_connection_expired_is_a_first_connection_again() -> None:
    p = Presence(TTL)
    assert p.connect("aria", "tab-1", now=0.0)
    # tab-1's node died: never refreshed, never disconnected
    assert p.connect("aria", "tab-2", now=TTL + 1) is True
    assert p.connection_count(now=TTL + 1) == 1


def test_expire_reports_characters_left_without_any_live_connection_once() -> None:
    p = Presence(TTL)
    p.connect("aria", "a1", now=0.0)  # only connection: will expire
    p.connect("borin", "b1", now=0.0)  # expires ...
    p.connect("borin", "b2", now=5.0)  # ... but this one is still live at t=12
    p.connect("cara", "c1", now=0.0)
    p.disconnect("cara", "c1", now=1.0)  # left cleanly: not "gone" by expiry

    assert p.expire(now=12.0) == ["aria"]
    assert p.expire(now=12.0) == []  # reported once
    assert p.connected(now=12.0) == ["borin"]
    assert p.connection_count(now=12.0) == 1
    assert sorted(p.expire(now=15.0)) == ["borin"]
    assert p.connected(now=15.0) == []


def test_expire_reports_a_character_whose_expiry_was_seen_by_a_read_first() -> None:
    p = Presence(TTL)
    p.connect("aria", "a1", now=0.0)
    assert not p.is_connected("aria", now=20.0)  # the read prunes the connection...
    assert p.expire(now=20.0) == ["aria"]  # ... but the node-died report still happens


def test_a_late_heartbeat_never_shortens_an_expiry() -> None:
    p = Presence(TTL)
    p.connect("aria", "tab-1", now=0.0)
    p.refresh("aria", "tab-1", now=8.0)
    p.refresh("aria", "tab-1", now=2.0)  # sent before a stall, carried out after the newer one
    assert p.is_connected("aria", now=17.9)


@pytest.mark.parametrize(
    ("online", "left", "again"),
    [(True, False, False), (False, False, True), (False, True, False), (True, True, False)],
)
def test_only_a_live_character_that_is_not_online_and_did_not_leave_is_announced_again(
    online: bool, left: bool, again: bool
) -> None:
    assert announce_again(online=online, left=left) is again


def test_a_voluntary_leave_holds_for_ttl_and_a_new_connection_lifts_it() -> None:
    p = Presence(TTL)
    p.connect("aria", "tab-1", now=0.0)
    p.mark_left("aria", now=1.0)
    assert p.has_left("aria", now=1.0 + TTL - 0.1)
    assert not p.has_left("aria", now=1.0 + TTL)
    p.mark_left("aria", now=20.0)
    p.connect("aria", "tab-2", now=21.0)  # a rejoin
    assert not p.has_left("aria", now=21.0)
    p.mark_left("borin", now=30.0)
    p.expire(now=30.0 + TTL)  # the sweep forgets tombstones that are due
    assert not p.has_left("borin", now=30.0)


# -- the presence loop's schedule ----------------------------------------------------------------

SLICES = 8


def ticks(schedule: RefreshSchedule, start: float, count: int) -> list[PresenceTick]:
    out = []
    for i in range(count):
        out.append(schedule.tick(start + i * schedule.interval))
        schedule.succeeded()
    return out


def test_a_healthy_node_refreshes_one_slice_a_tick_and_sweeps_every_tick() -> None:
    schedule = RefreshSchedule(TTL, SLICES)
    assert schedule.interval == pytest.approx(TTL / 3 / SLICES)
    done = ticks(schedule, 0.0, 2 * SLICES)
    assert [t.slice for t in done] == [*range(1, SLICES), 0] * 2  # every slice once a period
    assert all(t.sweep for t in done)


def test_after_a_failed_tick_everything_is_refreshed_before_anyone_sweeps() -> None:
    schedule = RefreshSchedule(TTL, SLICES)
    ticks(schedule, 0.0, 3)
    now = 3 * schedule.interval
    assert schedule.tick(now).slice == 4
    schedule.failed()  # backend unavailable
    now += schedule.interval
    retry = schedule.tick(now)
    assert retry == PresenceTick(None, sweep=False)  # every connection, no sweep
    schedule.failed()  # still down: the next tick tries everything again
    now += schedule.interval
    full = schedule.tick(now)
    assert full == PresenceTick(None, sweep=False)
    schedule.succeeded()
    held_until = now + schedule.period  # other nodes refresh theirs meanwhile
    after = ticks(schedule, now + schedule.interval, 2 * SLICES)
    times = [now + schedule.interval + i * schedule.interval for i in range(2 * SLICES)]
    assert all(t.slice is not None for t in after)
    assert [t.sweep for t in after] == [at >= held_until for at in times]
    assert any(t.sweep for t in after) and not after[0].sweep


def test_a_tick_that_hung_in_a_stall_counts_as_falling_behind() -> None:
    """A stall shorter than the command timeout fails nothing: the call just returns late."""
    schedule = RefreshSchedule(TTL, SLICES)
    ticks(schedule, 0.0, 2)
    stalled = 2 * schedule.interval
    assert schedule.tick(stalled).slice is not None
    schedule.succeeded()  # ... after a stall of TTL (the tick's entries date from `stalled`)
    resumed = stalled + TTL
    assert schedule.tick(resumed) == PresenceTick(None, sweep=False)
    schedule.succeeded()
    after = ticks(schedule, resumed + schedule.interval, SLICES)  # held for one period
    assert [t.sweep for t in after] == [False] * (SLICES - 1) + [True]


def test_a_schedule_needs_a_positive_ttl_and_a_slice() -> None:
    with pytest.raises(ValueError, match="ttl"):
        RefreshSchedule(0.0, SLICES)
    with pytest.raises(ValueError, match="slices"):
        RefreshSchedule(TTL, 0)


# -- model-based -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # connect | disconnect | refresh | expire | check
    character: str
    connection: str
    dt: float  # time advance before the operation


CHARACTERS = ["aria", "borin", "cara"]
CONNECTIONS = ["c1", "c2", "c3"]

ops: st.SearchStrategy[Op] = st.builds(
    Op,
    kind=st.sampled_from(["connect", "disconnect", "refresh", "expire", "check"]),
    character=st.sampled_from(CHARACTERS),
    connection=st.sampled_from(CONNECTIONS),
    dt=st.sampled_from([0.0, 0.0, 1.0, 3.0, TTL / 2, TTL, TTL + 1]),
)


class PresenceModel:
    """(character, connection) → expires_at; a connection is live while now < expires_at."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.until: dict[tuple[str, str], float] = {}
        self.tracked: set[str] = set()  # characters not yet reported gone or disconnected

    def live(self, character: str, now: float) -> set[str]:
        return {k for (c, k), t in self.until.items() if c == character and t > now}

    def connect(self, c: str, k: str, now: float) -> bool:
        first = not (self.live(c, now) - {k})
        self.until[(c, k)] = now + self.ttl
        self.tracked.add(c)
        return first

    def disconnect(self, c: str, k: str, now: float) -> bool:
        self.until.pop((c, k), None)
        if self.live(c, now):
            return False
        self.tracked.discard(c)
        return True

    def refresh(self, c: str, k: str, now: float) -> None:
        self.until[(c, k)] = now + self.ttl
        self.tracked.add(c)

    def expire(self, now: float) -> set[str]:
        gone = {c for c in self.tracked if not self.live(c, now)}
        self.tracked -= gone
        return gone


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_presence_matches_a_dict_model(script: list[Op]) -> None:
    p = Presence(TTL)
    model = PresenceModel(TTL)
    now = 0.0
    for op in script:
        now += op.dt
        c, k = op.character, op.connection
        if op.kind == "connect":
            assert p.connect(c, k, now) == model.connect(c, k, now), op
        elif op.kind == "disconnect":
            assert p.disconnect(c, k, now) == model.disconnect(c, k, now), op
        elif op.kind == "refresh":
            p.refresh(c, k, now)
            model.refresh(c, k, now)
        elif op.kind == "expire":
            gone = p.expire(now)
            assert len(gone) == len(set(gone))
            assert set(gone) == model.expire(now)
        for character in CHARACTERS:
            assert p.is_connected(character, now) == bool(model.live(character, now)), character
        assert set(p.connected(now)) == {x for x in CHARACTERS if model.live(x, now)}
        assert p.connection_count(now) == sum(len(model.live(x, now)) for x in CHARACTERS)
