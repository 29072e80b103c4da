"""Which events open a new epoch and call for one re-statement (``core.epochs.Openings``)."""

from __future__ import annotations

import orjson
from party_sync.core.epochs import Opening, Openings, opens_epoch
from party_sync.core.events import Event


def event(seq: int, type_: str = "party.state", party: str = "p1", trace: str = "t1") -> Event:
    payload = {"seq_hint": seq}
    data = orjson.dumps({"type": type_, "seq": seq, "trace_id": trace, "payload": payload})
    return Event(party, seq, type_, payload, trace, data)


def test_only_the_first_event_of_an_epoch_opens_it() -> None:
    assert opens_epoch(event(1))
    assert not opens_epoch(event(2))


def test_an_engine_event_opening_an_epoch_is_due_once_with_the_run_known() -> None:
    openings = Openings()
    openings.knows("p1", "r1")
    assert openings.seen([event(1, "action.result"), event(2, "scene.update")])
    assert openings.take() == [Opening("p1", "t1", "r1")]
    assert openings.take() == []  # taken once
    assert not openings.pending


def test_the_restated_events_come_after_the_opening_and_ask_for_nothing() -> None:
    openings = Openings()
    openings.seen([event(1)], "r1")
    openings.take()
    assert not openings.seen([event(2, "scene.update"), event(3, "party.state")], "r1")
    assert openings.take() == []


def test_every_kind_of_event_but_a_join_opens_for_the_watch() -> None:
    for type_ in ("party.leave", "vote.update", "vote.started", "vote.finished", "scene.update"):
        openings = Openings()
        assert openings.seen([event(1, type_)], "r1"), type_
        assert [o.party_id for o in openings.take()] == ["p1"]


def test_a_join_opening_is_the_cores_and_covers_an_opening_waiting_for_its_request() -> None:
    openings = Openings()
    assert not openings.seen([event(1, "party.join")], "r1")  # Announce asks, before the join
    assert openings.take() == []
    openings.seen([event(1, trace="older")])  # due, not taken yet
    openings.seen([event(1, "party.join", trace="newer")])  # a newer epoch opened by a join
    assert openings.take() == []


def test_the_same_opening_event_returned_again_is_not_a_new_epoch() -> None:
    # a second action.result of one action returns the one that stands, with its seq
    openings = Openings()
    first = event(1, "action.result")
    assert openings.seen([first], "r1")
    openings.take()
    assert not openings.seen([first], "r1")
    assert openings.take() == []
    assert openings.seen([event(1, "action.result", trace="t2")], "r1")  # another epoch
    assert openings.take() == [Opening("p1", "t2", "r1")]


def test_an_opening_behind_a_result_that_already_stood_is_seen() -> None:
    openings = Openings()
    assert openings.seen([event(45, "action.result"), event(1, "scene.update")], "r1")
    assert openings.take() == [Opening("p1", "t1", "r1")]


def test_an_opening_with_no_known_run_waits_for_the_run_and_is_then_due() -> None:
    openings = Openings()
    assert openings.seen([event(1)])
    (opening,) = openings.take()
    assert opening.campaign_run_id is None
    openings.park(opening)
    assert openings.parked == ["p1"]
    assert not openings.pending
    assert not openings.knows("p2", "r2")  # another party: nothing changes
    assert openings.knows("p1", "r1")
    assert openings.take() == [Opening("p1", "t1", "r1")]
    assert openings.parked == []


def test_a_failed_request_is_due_again_unless_a_newer_opening_replaced_it() -> None:
    openings = Openings()
    openings.seen([event(1)], "r1")
    (opening,) = openings.take()
    openings.again(opening)
    assert openings.take() == [opening]
    openings.seen([event(1, trace="t9")], "r1")
    openings.again(opening)  # the older one failed after the newer was seen
    assert openings.take() == [Opening("p1", "t9", "r1")]


def test_what_it_remembers_is_bounded() -> None:
    openings = Openings(remembered=2)
    for party in ("a", "b", "c"):
        openings.knows(party, "run-" + party)
    assert openings.run_of("a") is None
    assert openings.run_of("c") == "run-c"
    waiting = Openings(remembered=2)
    for party in ("a", "b", "c"):
        waiting.seen([event(1, party=party)])
    for opening in waiting.take():
        waiting.park(opening)
    assert waiting.parked == ["b", "c"]


def test_writes_lost_with_an_old_server_make_the_recent_parties_due_once() -> None:
    """After a failover, every party this process wrote to in the window is due a re-statement
    (its writes may have gone to the old master), with its run where known; older ones are not,
    and nothing is due twice."""
    openings = Openings()
    openings.knows("p1", "r1")
    openings.knows("p2", "r2")
    openings.wrote("old", at=100.0)
    openings.wrote("p1", at=103.0)
    openings.wrote("p2", at=104.0)
    openings.wrote("p3", at=104.5)  # run not known here
    assert not openings.pending
    assert openings.writes_lost(now=106.0, window=5.0, trace_id="tr") == 3
    assert sorted(openings.take(), key=lambda o: o.party_id) == [
        Opening("p1", "tr", "r1"),
        Opening("p2", "tr", "r2"),
        Opening("p3", "tr", None),
    ]
    assert openings.take() == []
    assert openings.writes_lost(now=120.0, window=5.0, trace_id="tr2") == 0


def test_a_party_written_again_counts_from_its_last_write() -> None:
    openings = Openings()
    openings.wrote("p1", at=10.0)
    openings.wrote("p2", at=11.0)
    openings.wrote("p1", at=20.0)  # p1 again: now the newest
    assert openings.writes_lost(now=21.0, window=5.0, trace_id="tr") == 1
    assert [o.party_id for o in openings.take()] == ["p1"]


def test_what_it_remembers_of_its_writes_is_bounded_to_the_newest() -> None:
    openings = Openings(remembered=10)
    for i in range(25):
        openings.wrote(f"p{i}", at=float(i))
    assert openings.writes_lost(now=24.0, window=2.0, trace_id="tr") == 3  # p22, p23, p24
    assert len(openings._wrote) <= 10


def test_an_event_returned_as_standing_opens_nothing_whatever_its_bytes() -> None:
    """A publish under a key already used returns the event that stands (seq 1 here) in this
    request's words, so its bytes differ from the first answer's. Seen as an opening, each
    re-statement the engine made under its keys asked for the next one, without end (HTTP link
    probe: hundreds of re-statements a minute per party)."""
    openings = Openings()
    openings.knows("p1", "r1")
    first = event(1, "scene.update", trace="t1")
    assert openings.seen([first])
    openings.take()
    again = Event("p1", 1, "scene.update", first.payload, "t2", first.data + b" ", True)
    assert not opens_epoch(again)
    assert not openings.seen([again])
    assert openings.take() == []
