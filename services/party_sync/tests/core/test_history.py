"""EventLog and the all-or-nothing resume decision."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.core.history import EventLog, ResumePoint, can_resume


def ev(seq: int) -> bytes:
    return b'{"seq":%d}' % seq


def filled(n: int, capacity: int, epoch: str = "ep-1") -> EventLog:
    log = EventLog(epoch, capacity)
    for seq in range(1, n + 1):
        assert log.append(ev(seq)) == seq
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
        assert log.append(data) == i
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
