"""The deadline table: earliest first, lazy cancellation, re-arming moves a deadline."""

from __future__ import annotations

from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from party_sync.core.deadlines import Deadlines, Kind


def test_deadlines_come_due_in_time_order_and_only_once() -> None:
    table = Deadlines()
    assert table.next_due() is None
    assert table.arm(Kind.TOKEN, "s1", 30.0)  # the only one: the earliest
    assert table.arm(Kind.ACTION, ("p", "a1"), 10.0)  # earlier: a sleeping timer must wake
    assert not table.arm(Kind.GRACE, "s2", 20.0)
    assert table.next_due() == 10.0
    assert table.pop_due(9.999) == []
    assert table.pop_due(20.0) == [(Kind.ACTION, ("p", "a1")), (Kind.GRACE, "s2")]
    assert table.pop_due(20.0) == []
    assert table.next_due() == 30.0 and len(table) == 1


def test_a_cancelled_or_moved_deadline_is_not_reported_at_its_old_time() -> None:
    table = Deadlines()
    table.arm(Kind.ACTION, ("p", "a1"), 10.0)
    table.arm(Kind.ACTION, ("p", "a2"), 11.0)
    assert table.cancel(Kind.ACTION, ("p", "a1"))
    assert not table.cancel(Kind.ACTION, ("p", "a1"))
    table.arm(Kind.ACTION, ("p", "a2"), 15.0)  # moved later (an action looked at again)
    assert table.next_due() == 15.0
    assert table.pop_due(14.0) == []
    assert table.pop_due(15.0) == [(Kind.ACTION, ("p", "a2"))]
    assert (Kind.ACTION, ("p", "a2")) not in table


def test_many_cancelled_deadlines_do_not_pile_up() -> None:
    table = Deadlines()
    for n in range(10_000):
        table.arm(Kind.ACTION, ("p", n), float(n))
        table.cancel(Kind.ACTION, ("p", n))  # each action answered before its deadline
    assert len(table) == 0 and len(table._heap) <= 64
    assert table.next_due() is None


operations = st.lists(
    st.tuples(
        st.sampled_from(["arm", "cancel", "pop"]),
        st.sampled_from([Kind.VOTE, Kind.ACTION, Kind.GRACE]),  # the heap and both lanes
        st.integers(0, 5),
        st.floats(0, 100, allow_nan=False),
    ),
    max_size=80,
)


@given(operations)
def test_the_table_matches_a_plain_dict(ops: list[tuple[str, Kind, int, float]]) -> None:
    """Whatever is armed (in or out of order), moved, cancelled and popped, in the heap or in a
    lane: the same as a dict scanned in full; and ``arm`` says True whenever the deadline is
    now the earliest (a sleeping timer must never miss an earlier one)."""
    table, model = Deadlines(), dict[tuple[Kind, int], float]()
    for op, kind, key, at in ops:
        if op == "arm":
            before = min(model.values()) if model else None
            earliest = table.arm(kind, key, at)
            model[(kind, key)] = at
            if before is None or at < before:
                assert earliest
        elif op == "cancel":
            assert table.cancel(kind, key) == (model.pop((kind, key), None) is not None)
        else:
            due = [k for k, d in model.items() if d <= at]
            got = [cast(tuple[Kind, int], entry) for entry in table.pop_due(at)]
            assert sorted(got) == sorted(due)
            assert [model[k] for k in got] == sorted(model[k] for k in got)
            for k in got:
                del model[k]
        assert table.next_due() == (min(model.values()) if model else None)
        assert len(table) == len(model)
        for k, d in model.items():
            assert k in table and table.due_at(*k) == d
