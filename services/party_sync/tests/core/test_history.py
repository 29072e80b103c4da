"""EventLog and the all-or-nothing resume decision."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.core.history import (
    EventLog,
    HistoryBounds,
    ResumePoint,
    can_resume,
    stamp,
    to_drop,
)


def ev(seq: int) -> bytes:
    return b'{"seq":%d}' % seq


def filled(n: int, capacity: int, epoch: str = "ep-1") -> EventLog:
    log = EventLog(epoch, capacity)
    for seq in range(1, n + 1):
        assert log.append(ev(seq), 0.0) == seq
    return log


@pytest.mark.parametrize("capacity", [0, -3])
def test_capacity_must_be_at_least_one(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        EventLog("ep", capacity)


def test_an_empty_log() -> None:
    log = EventLog("ep-1", 5)
    assert log.top_seq == 0
    assert log.oldest_seq == 1  # top_seq + 1 when nothing is held
    assert log.after(0) == []
    assert log.replay(ResumePoint("ep-1", 0), max_replay=10) == []


def test_append_numbers_events_from_one_and_keeps_the_last_capacity() -> None:
    log = filled(7, capacity=3)
    assert log.top_seq == 7
    assert log.oldest_seq == 5
    assert log.after(0) == [ev(5), ev(6), ev(7)]  # after() gives what is still held
    assert log.after(5) == [ev(6), ev(7)]
    assert log.after(7) == []


def test_replay_returns_every_event_after_last_seq() -> None:
    log = filled(7, capacity=3)
    assert log.replay(ResumePoint("ep-1", 4), max_replay=10) == [ev(5), ev(6), ev(7)]
    assert log.replay(ResumePoint("ep-1", 6), max_replay=10) == [ev(7)]
    assert log.replay(ResumePoint("ep-1", 7), max_replay=10) == []


def test_replay_is_never_partial() -> None:
    log = filled(7, capacity=3)
    # seq 4 is gone: replaying 5..7 would silently skip it
    assert log.replay(ResumePoint("ep-1", 3), max_replay=10) is None
    assert log.replay(ResumePoint("ep-1", 0), max_replay=10) is None


def test_replay_refuses_another_epoch_a_future_seq_and_a_negative_seq() -> None:
    log = filled(3, capacity=10)
    assert log.replay(ResumePoint("ep-0", 2), max_replay=10) is None
    assert log.replay(ResumePoint("ep-1", 4), max_replay=10) is None
    assert log.replay(ResumePoint("ep-1", -1), max_replay=10) is None


def test_replay_refuses_more_than_max_replay_events() -> None:
    log = filled(10, capacity=100)
    assert log.replay(ResumePoint("ep-1", 7), max_replay=3) == [ev(8), ev(9), ev(10)]
    assert log.replay(ResumePoint("ep-1", 6), max_replay=3) is None


def test_an_up_to_date_client_resumes_even_with_max_replay_zero() -> None:
    log = filled(10, capacity=2)
    assert log.replay(ResumePoint("ep-1", 10), max_replay=0) == []
    assert log.replay(ResumePoint("ep-1", 9), max_replay=0) is None


@pytest.mark.parametrize(
    ("point", "top", "oldest", "max_replay", "expected"),
    [
        (ResumePoint("e", 5), 5, 6, 0, True),  # nothing missed, nothing held
        (ResumePoint("e", 4), 5, 5, 1, True),  # exactly the oldest held
        (ResumePoint("e", 3), 5, 5, 10, False),  # seq 4 is no longer held
        (ResumePoint("e", 2), 5, 1, 3, True),  # missed == max_replay
        (ResumePoint("e", 1), 5, 1, 3, False),  # missed > max_replay
        (ResumePoint("x", 5), 5, 1, 10, False),  # another epoch
        (ResumePoint("e", 6), 5, 1, 10, False),  # ahead of the history
        (ResumePoint("e", -1), 5, 1, 10, False),
        (ResumePoint("e", 0), 0, 1, 0, True),  # a brand-new party
    ],
)
def test_can_resume(
    point: ResumePoint, top: int, oldest: int, max_replay: int, expected: bool
) -> None:
    assert (
        can_resume(point, epoch="e", top_seq=top, oldest_seq=oldest, max_replay=max_replay)
        is expected
    )


@settings(max_examples=400, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=8), max_size=40),
    capacity=st.integers(min_value=1, max_value=12),
    epoch=st.sampled_from(["ep-1", "ep-2"]),
    last_seq=st.integers(min_value=-2, max_value=45),
    max_replay=st.integers(min_value=0, max_value=15),
)
def test_replay_is_all_or_nothing(
    payloads: list[bytes], capacity: int, epoch: str, last_seq: int, max_replay: int
) -> None:
    log = EventLog("ep-1", capacity)
    for i, data in enumerate(payloads, start=1):
        assert log.append(data, 0.0) == i
    top = len(payloads)
    assert log.top_seq == top
    assert log.oldest_seq == top - min(top, capacity) + 1

    replay = log.replay(ResumePoint(epoch, last_seq), max_replay)

    missed = top - last_seq
    possible = (
        epoch == "ep-1"
        and 0 <= last_seq <= top
        and (missed == 0 or (missed <= max_replay and missed <= capacity))
    )
    if possible:
        assert replay == payloads[last_seq:]  # exactly the events after last_seq, in order
    else:
        assert replay is None


# -- the bounds: count, bytes, age (HistoryBounds, to_drop) ----------------------------------------


def test_bounds_header_is_a_plain_count_without_bytes_or_age_bound() -> None:
    assert HistoryBounds(300).header() == "300"  # what earlier versions send (ARGV[4])
    assert HistoryBounds(300, 262_144, 1800.0).header() == "300:262144:1800000"
    assert HistoryBounds(5, 0, 0.5).header() == "5:0:500"
    assert HistoryBounds(5, 10, 0.0).header() == "5:10:0"
    assert not HistoryBounds(5).stamped


@pytest.mark.parametrize(
    ("size", "max_bytes", "max_age"),
    [(0, 0, 0.0), (1, -1, 0.0), (1, 0, -1.0), (1, 0, float("nan")), (1, 0, float("inf"))],
)
def test_bounds_are_checked(size: int, max_bytes: int, max_age: float) -> None:
    with pytest.raises(ValueError, match="history"):
        HistoryBounds(size, max_bytes, max_age)


def test_the_oldest_go_past_the_bytes_bound_but_never_the_newest() -> None:
    log = EventLog("ep", HistoryBounds(100, max_bytes=10))
    log.append(b"aaaa", 0.0)
    log.append(b"bbbb", 0.0)
    assert (log.oldest_seq, log.held_bytes) == (1, 8)
    log.append(b"cccc", 0.0)  # 12 bytes: the oldest goes
    assert (log.oldest_seq, log.after(0), log.held_bytes) == (2, [b"bbbb", b"cccc"], 8)
    log.append(b"x" * 50, 0.0)  # larger than the bound alone: kept, alone
    assert (log.oldest_seq, log.after(0), log.held_bytes) == (4, [b"x" * 50], 50)
    log.append(b"dd", 0.0)
    assert log.after(0) == [b"dd"]


def test_events_older_than_the_age_bound_go_at_the_next_append() -> None:
    log = EventLog("ep", HistoryBounds(100, max_age=60.0))
    log.append(b"a", 1000.0)
    log.append(b"b", 1030.0)
    log.append(b"c", 1060.0)  # a is exactly 60 s old: kept (older than, not as old as)
    assert log.oldest_seq == 1
    log.append(b"d", 1060.001)  # a is 60.001 s old
    assert log.oldest_seq == 2
    # an idle party is not aged until its next event; then only the newest is young enough
    assert log.replay(ResumePoint("ep", 1), max_replay=10) == [b"b", b"c", b"d"]
    log.append(b"e", 5000.0)
    assert (log.oldest_seq, log.after(0)) == (5, [b"e"])
    # a client away since seq 3 (d and e missed, d aged out): a snapshot, not a partial replay
    assert log.replay(ResumePoint("ep", 3), max_replay=10) is None
    assert log.replay(ResumePoint("ep", 4), max_replay=10) == [b"e"]


def test_ages_count_whole_milliseconds_as_redis_does() -> None:
    assert stamp(1_800_000_000.25) == 1_800_000_000_250
    held, half_a_second = [(1000, 1), (1500, 1), (2000, 1)], HistoryBounds(9, 0, 0.5)
    assert to_drop(held, 3, half_a_second, 1500) == 0  # 500 ms old: not older than 0.5 s
    assert to_drop(held, 3, half_a_second, 1501) == 1
    assert to_drop(held, 3, half_a_second, 2001) == 2
    assert to_drop(held, 3, half_a_second, 9000) == 2  # never the newest


def longest_valid_suffix(events: list[tuple[int, int]], bounds: HistoryBounds, now_ms: int) -> int:
    """The reference: the most recent events that satisfy every bound at once (at least one)."""
    best = 1
    for n in range(1, len(events) + 1):
        suffix = events[-n:]
        if n > bounds.size:
            break
        if bounds.max_bytes and sum(size for _, size in suffix) > bounds.max_bytes:
            break
        if bounds.max_age_ms and now_ms - suffix[0][0] > bounds.max_age_ms:
            break
        best = n
    return best


@settings(max_examples=400, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 40), st.sampled_from([0, 1, 250, 999, 1000, 1001, 5000])),
        min_size=1,
        max_size=60,
    ),
    size=st.integers(1, 12),
    max_bytes=st.sampled_from([0, 1, 30, 100, 250]),
    max_age_ms=st.sampled_from([0, 1, 1000, 3000]),
)
def test_the_history_holds_the_longest_run_of_newest_events_within_every_bound(
    steps: list[tuple[int, int]], size: int, max_bytes: int, max_age_ms: int
) -> None:
    """After every append (time moving forward): the held events are the longest suffix of all
    events that fits the count, the bytes and the age bound together, and never fewer than the
    newest one; ``held_bytes`` is their size; a replay is all or nothing."""
    bounds = HistoryBounds(size, max_bytes, max_age_ms / 1000)
    log = EventLog("ep", bounds)
    now_ms = 1_800_000_000_000
    every: list[tuple[int, int]] = []
    payloads: list[bytes] = []
    for length, pause_ms in steps:
        now_ms += pause_ms
        data = bytes([65 + len(payloads) % 26]) * length
        payloads.append(data)
        every.append((now_ms, length))
        assert log.append(data, now_ms / 1000) == len(payloads)

        held = longest_valid_suffix(every, bounds, now_ms)
        assert log.oldest_seq == len(payloads) - held + 1
        assert log.after(0) == payloads[-held:]
        assert log.held_bytes == sum(len(p) for p in payloads[-held:])
    for last_seq in range(len(payloads) + 1):
        replay = log.replay(ResumePoint("ep", last_seq), max_replay=100)
        assert replay is None or replay == payloads[last_seq:]
        assert (replay is not None) == (last_seq + 1 >= log.oldest_seq)


@settings(max_examples=200, deadline=None)
@given(
    held=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 300)), min_size=1, max_size=30),
    size=st.integers(1, 40),
    max_bytes=st.integers(0, 2000),
    max_age_ms=st.integers(0, 5000),
    now_ms=st.integers(0, 10_000),
)
def test_to_drop_keeps_the_newest_and_stops_at_the_first_entry_that_fits(
    held: list[tuple[int, int]], size: int, max_bytes: int, max_age_ms: int, now_ms: int
) -> None:
    """Times in any order (nodes' clocks differ): what ``_lib.lua`` append() does, entry by entry
    from the oldest."""
    bounds = HistoryBounds(size, max_bytes, max_age_ms / 1000)
    drop = to_drop(held, sum(s for _, s in held), bounds, now_ms)
    assert 0 <= drop <= len(held) - 1  # the newest stays
    assert len(held) - drop <= size
    if drop < len(held) - 1:  # the first entry kept fits (unless it is the newest)
        at, _ = held[drop]
        assert not max_bytes or sum(s for _, s in held[drop:]) <= max_bytes
        assert not max_age_ms or now_ms - at <= max_age_ms
    for i in range(max(0, len(held) - size), drop):  # every one dropped past the count did not
        at, _ = held[i]
        too_big = bool(max_bytes) and sum(s for _, s in held[i:]) > max_bytes
        too_old = bool(max_age_ms) and now_ms - at > max_age_ms
        assert too_big or too_old
