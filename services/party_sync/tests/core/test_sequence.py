"""SeqTracker: gap detection on a live stream."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.core.sequence import SeqTracker, SeqVerdict


def test_the_next_seq_is_delivered() -> None:
    tracker = SeqTracker(0)
    assert [tracker.observe(s) for s in (1, 2, 3)] == [SeqVerdict.DELIVER] * 3
    assert tracker.last == 3


def test_old_and_duplicate_seqs_are_stale() -> None:
    tracker = SeqTracker(5)
    assert tracker.observe(5) is SeqVerdict.STALE
    assert tracker.observe(1) is SeqVerdict.STALE
    assert tracker.observe(0) is SeqVerdict.STALE
    assert tracker.last == 5


def test_a_jump_is_a_gap_and_does_not_move_last() -> None:
    tracker = SeqTracker(5)
    assert tracker.observe(7) is SeqVerdict.GAP
    assert tracker.last == 5
    assert tracker.observe(6) is SeqVerdict.DELIVER
    assert tracker.observe(7) is SeqVerdict.DELIVER
    assert tracker.last == 7


def test_a_tracker_resumes_from_any_seq() -> None:
    tracker = SeqTracker(41)
    assert tracker.observe(42) is SeqVerdict.DELIVER
    assert tracker.observe(1) is SeqVerdict.STALE


@st.composite
def shuffled_with_duplicates(draw: st.DrawFn) -> tuple[int, list[int]]:
    n = draw(st.integers(min_value=0, max_value=40))
    seqs = list(range(1, n + 1))
    extra = draw(st.lists(st.integers(min_value=1, max_value=max(n, 1)), max_size=20)) if n else []
    stream = draw(st.permutations(seqs + extra))
    return n, stream


@settings(max_examples=300, deadline=None)
@given(shuffled_with_duplicates())
def test_one_pass_delivers_a_gapless_prefix(case: tuple[int, list[int]]) -> None:
    _, stream = case
    tracker = SeqTracker(0)
    delivered: list[int] = []
    for seq in stream:
        before = tracker.last
        verdict = tracker.observe(seq)
        if verdict is SeqVerdict.DELIVER:
            delivered.append(seq)
            assert seq == before + 1
        elif verdict is SeqVerdict.STALE:
            assert seq <= before
            assert tracker.last == before
        else:
            assert seq > before + 1
            assert tracker.last == before
    assert delivered == list(range(1, len(delivered) + 1))
    assert tracker.last == len(delivered)


@settings(max_examples=300, deadline=None)
@given(shuffled_with_duplicates())
def test_holding_gapped_events_back_delivers_each_seq_once_in_order(
    case: tuple[int, list[int]],
) -> None:
    n, stream = case
    tracker = SeqTracker(0)
    delivered: list[int] = []
    held: set[int] = set()
    for seq in stream:
        verdict = tracker.observe(seq)
        if verdict is SeqVerdict.GAP:
            held.add(seq)
            continue
        if verdict is SeqVerdict.DELIVER:
            delivered.append(seq)
            while tracker.last + 1 in held:  # repair: the missing event arrived
                held.discard(tracker.last + 1)
                assert tracker.observe(tracker.last + 1) is SeqVerdict.DELIVER
                delivered.append(tracker.last)
    assert delivered == list(range(1, n + 1))
    assert tracker.last == n
