"""The Python client's actions in flight and live narration (``party_sync.client.stream`` and
``state``): pure, message by message, no socket and no clock.

Transient messages (``action.accepted``, ``action.failed``, ``narration.delta``) have no ``seq``:
they are folded and reported, never shown twice, and never disturb the seq tracking; every
``system.hello`` (resumed or not) restates what they told.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from party_sync.client.events import (
    ActionAccepted,
    ActionFailedNotice,
    ActionResult,
    Connected,
    NarrationDelta,
    SceneChanged,
)
from party_sync.client.state import (
    MAX_ENDED_STREAMS,
    ActionInFlight,
    NarrationStream,
    PartyState,
)
from party_sync.client.stream import ActionDone, ClientStream, Emit, Output, Resync

EPOCH = "ep-1"


def hello(
    seq: int = 3,
    *,
    resumed_from: int | None = None,
    in_flight: list[dict[str, Any]] | None = None,
    narration: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "protocol": 1,
        "party_id": "p1",
        "campaign_run_id": "r1",
        "you": "aria",
        "status": "active",
        "run_status": "in_progress",
        "members": [
            {"character_id": "aria", "display_name": "Aria", "online": True},
            {"character_id": "borin", "display_name": "Borin", "online": True},
        ],
        "scene_number": 0,
        "seq": seq,
        "epoch": EPOCH,
        "resumed": resumed_from is not None,
        "scene": None,
        "combat": None,
        "party_state": None,
        "vote": None,
        "actions_in_flight": in_flight or [],
        "narration": narration or [],
        "limits": {
            "max_message_bytes": 65536,
            "action_timeout_ms": 10000,
            "heartbeat_ms": 20000,
            "narration_idle_ms": 30000,
        },
    }
    if resumed_from is not None:
        payload["resumed_from"] = resumed_from
    return {"type": "system.hello", "trace_id": "t", "payload": payload}


def scene(seq: int) -> dict[str, Any]:
    payload = {"scene_number": seq, "scene_id": f"s{seq}", "title": f"S{seq}", "options": []}
    return {"type": "scene.update", "seq": seq, "trace_id": "t", "payload": payload}


def result(seq: int, action_id: str, character_id: str = "borin") -> dict[str, Any]:
    payload = {"action_id": action_id, "character_id": character_id, "outcome": "success"}
    return {"type": "action.result", "seq": seq, "trace_id": "t", "payload": payload}


def accepted(action_id: str, character_id: str = "borin", action_type: str = "choice") -> Any:
    payload = {"action_id": action_id, "character_id": character_id, "action_type": action_type}
    return {"type": "action.accepted", "trace_id": f"tr-{action_id}", "payload": payload}


def failed(action_id: str, code: str = "action_rejected") -> dict[str, Any]:
    payload = {"action_id": action_id, "character_id": "borin", "code": code}
    return {"type": "action.failed", "trace_id": f"tr-{action_id}", "payload": payload}


def delta(
    index: int,
    text: str,
    *,
    stream_id: str = "n-1",
    done: bool = False,
    action_id: str | None = "a-1",
) -> dict[str, Any]:
    payload: dict[str, Any] = {"stream_id": stream_id, "index": index, "text": text, "done": done}
    if action_id is not None:
        payload["action_id"] = action_id
    return {"type": "narration.delta", "trace_id": "tr-n", "payload": payload}


def emitted(outputs: list[Output]) -> list[Any]:
    return [o.event for o in outputs if isinstance(o, Emit)]


def in_flight(stream: ClientStream) -> list[str]:
    return list(stream.state.actions_in_flight)


def live(seq: int = 3, **kwargs: Any) -> ClientStream:
    stream = ClientStream()
    stream.receive(hello(seq, **kwargs))
    return stream


# -- actions in flight ------------------------------------------------------------------------


def test_accepted_actions_are_in_flight_oldest_first_until_their_result_or_failure() -> None:
    stream = live()
    out = stream.receive(accepted("a-1", "borin", "combat"))
    assert emitted(out) == [ActionAccepted("a-1", "borin", "combat", "tr-a-1")]
    stream.receive(accepted("vote:v-1", "party"))
    stream.receive(accepted("a-3", "aria"))
    assert in_flight(stream) == ["a-1", "vote:v-1", "a-3"]
    assert stream.state.actions_in_flight["vote:v-1"] == ActionInFlight(
        "vote:v-1", "party", "choice"
    )
    assert stream.receive(accepted("a-1")) == []  # a repeat changes nothing, is not reported
    assert in_flight(stream) == ["a-1", "vote:v-1", "a-3"]

    out = stream.receive(result(4, "vote:v-1", "party"))
    assert isinstance(emitted(out)[0], ActionResult)
    assert in_flight(stream) == ["a-1", "a-3"]
    out = stream.receive(failed("a-1", "engine_error"))
    assert emitted(out) == [ActionFailedNotice("a-1", "borin", "engine_error", "tr-a-1")]
    assert in_flight(stream) == ["a-3"]
    assert stream.resume_point() == (EPOCH, 4)  # only the result moved the seq


def test_a_hello_replaces_the_actions_in_flight_resumed_or_not() -> None:
    stream = live(in_flight=[{"action_id": "a-0", "character_id": "aria", "action_type": "combat"}])
    assert in_flight(stream) == ["a-0"]
    stream.receive(accepted("a-1"))
    stream.connection_lost()
    # a-0 and a-1 ended while we were away (never replayed); a-2 began
    restated = [{"action_id": "a-2", "character_id": "borin", "action_type": "skill_check"}]
    out = stream.receive(hello(3, resumed_from=3, in_flight=restated))
    assert emitted(out)[0].resumed is True
    assert in_flight(stream) == ["a-2"]
    stream.connection_lost()
    out = stream.receive(hello(9, in_flight=[]))  # a snapshot
    assert emitted(out)[0].resumed is False and in_flight(stream) == []


def test_a_repeated_result_of_a_resent_action_ends_it_in_flight_too() -> None:
    stream = live(5)
    stream.add_action({"type": "action.request", "payload": {"action_id": "mine"}})
    stream.receive(accepted("mine", "aria"))
    out = stream.receive(result(4, "mine", "aria"))  # the original result, an old seq
    assert [type(o) for o in out] == [ActionDone]
    assert in_flight(stream) == [] and stream.resume_point() == (EPOCH, 5)


# -- narration --------------------------------------------------------------------------------


def test_pieces_are_appended_in_order_and_each_is_reported_once() -> None:
    stream = live()
    out = stream.receive(delta(0, "The gate "))
    first = emitted(out)
    assert first == [
        NarrationDelta("n-1", 0, "The gate ", False, "a-1", "The gate ", False, "tr-n")
    ]
    stream.receive(delta(1, "gives way"))
    assert stream.receive(delta(1, "gives way")) == []  # a piece it has: never twice
    assert stream.receive(delta(0, "The gate ")) == []
    last = emitted(stream.receive(delta(2, ".", done=True)))[0]
    assert last.done and last.so_far == "The gate gives way." and not last.incomplete
    assert stream.state.narration["n-1"] == NarrationStream(
        "n-1", "The gate gives way.", 2, True, "a-1", False
    )
    assert stream.receive(delta(3, " More?")) == []  # after the last piece: nothing
    assert stream.state.narration["n-1"].text == "The gate gives way."


def test_streams_are_kept_apart_and_the_last_piece_may_be_empty() -> None:
    stream = live()
    stream.receive(delta(0, "Aria ", stream_id="n-a", action_id="a"))
    stream.receive(delta(0, "Borin ", stream_id="n-b", action_id=None))
    stream.receive(delta(1, "swings.", stream_id="n-a", action_id="a"))
    out = stream.receive(delta(1, "", stream_id="n-b", done=True, action_id=None))
    assert emitted(out)[0].text == "" and emitted(out)[0].done
    narration = stream.state.narration
    assert list(narration) == ["n-a", "n-b"]
    assert (narration["n-a"].text, narration["n-a"].done) == ("Aria swings.", False)
    assert (narration["n-b"].text, narration["n-b"].done) == ("Borin ", True)
    assert narration["n-b"].action_id is None


def test_a_missing_piece_freezes_the_text_never_shown_with_a_hole() -> None:
    stream = live()
    stream.receive(delta(0, "One "))
    event = emitted(stream.receive(delta(2, "three")))[0]
    assert isinstance(event, NarrationDelta) and event.incomplete
    assert (event.text, event.so_far) == ("", "One ")
    assert stream.receive(delta(1, "two ")) == []  # too late: at or below the last shown
    assert stream.receive(delta(3, "four")) == []  # frozen: nothing more is added
    last = emitted(stream.receive(delta(4, "!", done=True)))[0]
    assert last.done and last.incomplete and last.so_far == "One "
    # a stream first met past its beginning: incomplete from the start; its end alone: nothing
    event = emitted(stream.receive(delta(3, "middle", stream_id="n-2")))[0]
    assert event.incomplete and event.so_far == "" and stream.state.narration["n-2"].index == -1
    assert stream.receive(delta(5, "end", stream_id="n-3", done=True)) == []
    assert "n-3" not in stream.state.narration


def test_an_ended_stream_stays_until_its_final_text_arrives() -> None:
    stream = live()
    stream.receive(accepted("a-1"))
    stream.receive(delta(0, "Mine.", stream_id="n-1", action_id="a-1", done=True))
    stream.receive(delta(0, "Other.", stream_id="n-2", action_id="a-2", done=True))
    stream.receive(delta(0, "Nobody's.", stream_id="n-3", action_id=None, done=True))
    stream.receive(delta(0, "Still going", stream_id="n-4", action_id="a-1"))
    # the result of a-1 is the final text of its ended streams and of those that named none
    stream.receive(result(4, "a-1"))
    assert list(stream.state.narration) == ["n-2", "n-4"]
    assert stream.receive(delta(0, "Mine.", stream_id="n-1", action_id="a-1")) == []  # late
    stream.receive(delta(1, " Done.", stream_id="n-4", action_id="a-1", done=True))
    assert list(stream.state.narration) == ["n-2"]  # its action was answered already
    # a scene.update is the final text of every ended stream; open ones stay
    stream.receive(delta(0, "Open", stream_id="n-5", action_id="a-5"))
    stream.receive(scene(5))
    assert list(stream.state.narration) == ["n-5"]


def test_a_failed_action_drops_its_ended_streams_and_a_late_accepted_changes_nothing() -> None:
    stream = live()
    stream.receive(accepted("a-1"))
    stream.receive(delta(0, "Aria tries", stream_id="n-1", action_id="a-1", done=True))
    stream.receive(delta(0, "Borin waits", stream_id="n-2", action_id="a-2", done=True))
    stream.receive(failed("a-1"))
    assert list(stream.state.narration) == ["n-2"] and in_flight(stream) == []
    assert stream.receive(accepted("a-1")) == []  # late: its answer came already
    stream.receive(result(4, "a-9"))
    assert stream.receive(accepted("a-9")) == [] and in_flight(stream) == []


def test_ended_streams_with_no_final_text_are_bounded_open_ones_never() -> None:
    stream = live()
    stream.receive(delta(0, "open", stream_id="n-open"))
    for n in range(MAX_ENDED_STREAMS + 3):
        stream.receive(delta(0, f"s{n}", stream_id=f"n-{n}", action_id=f"a-{n}", done=True))
    stream.receive(result(4, "a-0"))  # settles n-0, and the bound drops the oldest others
    ended = [sid for sid, s in stream.state.narration.items() if s.done]
    assert ended == [f"n-{n}" for n in range(3, MAX_ENDED_STREAMS + 3)]
    assert stream.state.narration["n-open"].text == "open"


def test_a_hello_restates_the_open_streams_and_the_pieces_continue_after_them() -> None:
    restated = [{"stream_id": "n-1", "index": 2, "text": "The gate gives", "action_id": "a-1"}]
    stream = live(narration=restated)
    assert stream.state.narration["n-1"] == NarrationStream(
        "n-1", "The gate gives", 2, False, "a-1"
    )
    assert stream.receive(delta(2, "gives")) == []  # in the hello's text already
    event = emitted(stream.receive(delta(3, " way.", done=True)))[0]
    assert event.so_far == "The gate gives way." and not event.incomplete


def test_a_reconnect_mid_stream_shows_the_whole_text_once() -> None:
    """What a screen shows (the restated text on each hello, then each reported piece) is the
    stream's text exactly: nothing twice, nothing lost, across a resumed reconnect."""
    shown: dict[str, str] = {}

    def render(outputs: list[Output]) -> None:
        for event in emitted(outputs):
            if isinstance(event, Connected):
                shown.clear()
                shown.update({sid: s.text for sid, s in stream.state.narration.items()})
            elif isinstance(event, NarrationDelta):
                shown[event.stream_id] = shown.get(event.stream_id, "") + event.text

    stream = ClientStream()
    render(stream.receive(hello(3)))
    render(stream.receive(accepted("a-1")))
    render(stream.receive(delta(0, "Borin sets ")))
    render(stream.receive(delta(1, "his shoulder ")))
    stream.connection_lost()
    # away: pieces 2 and 3 went out; the hello says the text so far, up to piece 3
    restated = [{"stream_id": "n-1", "index": 3, "text": "Borin sets his shoulder to the bars."}]
    in_flight_now = [{"action_id": "a-1", "character_id": "borin", "action_type": "choice"}]
    render(stream.receive(hello(3, resumed_from=3, in_flight=in_flight_now, narration=restated)))
    assert shown == {"n-1": "Borin sets his shoulder to the bars."}
    assert stream.state.narration["n-1"].action_id is None  # as restated (no action_id given)
    render(stream.receive(delta(3, " to the bars.")))  # late: already in the hello's text
    render(stream.receive(delta(4, " The iron groans.", done=True)))
    assert shown == {"n-1": "Borin sets his shoulder to the bars. The iron groans."}
    assert stream.state.narration["n-1"].text == shown["n-1"]
    render(stream.receive(result(4, "a-1")))
    assert in_flight(stream) == []


def test_a_hello_drops_streams_that_ended_while_away_and_a_snapshot_too() -> None:
    stream = live()
    stream.receive(delta(0, "half a sent", stream_id="n-gone"))
    stream.receive(delta(0, "done", stream_id="n-old", done=True))
    stream.connection_lost()
    stream.receive(hello(3, resumed_from=3))  # n-gone ended (or was closed as idle) meanwhile
    assert stream.state.narration == {}
    assert stream.receive(delta(1, " late", stream_id="n-gone")) == []  # it does not come back
    event = emitted(stream.receive(delta(0, "new", stream_id="n-new")))[0]
    assert event.so_far == "new"
    stream.connection_lost()
    stream.receive(hello(7))
    assert stream.state.narration == {}


# -- never in the seq tracking ----------------------------------------------------------------


def test_transient_messages_never_move_the_seq_nor_cause_a_resync() -> None:
    stream = live(3)
    stream.receive(scene(4))
    odd = {**delta(0, "x"), "seq": 99}  # even a stray seq on one does not count
    for message in (accepted("a-1"), odd, failed("a-1"), {**accepted("a-2"), "seq": 4}):
        out = stream.receive(message)
        assert not any(isinstance(o, Resync) for o in out)
        assert stream.resume_point() == (EPOCH, 4)
    out = stream.receive(scene(5))
    assert [e.seq for e in emitted(out)] == [5]  # the next event is still just the next one
    assert in_flight(stream) == ["a-2"]


def test_transient_messages_before_the_hello_or_malformed_are_dropped() -> None:
    stream = ClientStream()
    assert stream.receive(delta(0, "early")) == []  # no hello on this connection yet
    assert stream.receive(accepted("a-0")) == []
    stream.receive(hello(3))
    assert stream.state.narration == {} and in_flight(stream) == []
    bad: list[dict[str, Any]] = [
        {"type": "narration.delta", "payload": {"stream_id": "n", "index": -1, "text": ""}},
        {"type": "narration.delta", "payload": {"stream_id": "n", "index": True, "text": ""}},
        {"type": "narration.delta", "payload": {"stream_id": "n", "index": 0, "text": 5}},
        {"type": "narration.delta", "payload": {"index": 0, "text": "x", "done": False}},
        {"type": "action.accepted", "payload": {"action_id": "a"}},
        {"type": "action.failed", "payload": None},
    ]
    for message in bad:
        assert stream.receive(message) == []
    assert stream.state.narration == {} and in_flight(stream) == []
    assert stream.resume_point() == (EPOCH, 3) and stream.live


def test_the_state_of_a_snapshot_hello_has_them_too() -> None:
    state = PartyState.from_hello(
        hello(
            in_flight=[{"action_id": "a", "character_id": "aria", "action_type": "combat"}],
            narration=[{"stream_id": "n", "index": 0, "text": "Hi", "action_id": "a"}],
        )["payload"]
    )
    assert list(state.actions_in_flight) == ["a"] and state.narration["n"].text == "Hi"
    old_server = hello()["payload"]
    del old_server["actions_in_flight"], old_server["narration"]
    bare = PartyState.from_hello(old_server)
    assert bare.actions_in_flight == {} and bare.narration == {}


Step = tuple[str, int]


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("event"), st.integers(1, 10)),
            st.tuples(st.just("piece"), st.integers(0, 12)),
            st.tuples(st.just("accepted"), st.integers(0, 3)),
            st.tuples(st.just("failed"), st.integers(0, 3)),
        ),
        max_size=60,
    )
)
def test_whatever_arrives_seqs_stay_consecutive_and_no_piece_shows_twice(steps: list[Step]) -> None:
    """Pieces (duplicated, late, early, a last one) interleaved with events and action notices:
    the applied seqs are consecutive, and the text shown (each reported addition, in order) is
    the stream's pieces from the first, in index order, each once, with no hole."""
    stream = live(0)
    applied: list[int] = []
    shown = ""
    for kind, n in steps:
        if kind == "event":
            out = stream.receive(scene(n))
            if any(isinstance(o, Resync) for o in out):
                break
            applied += [e.seq for e in emitted(out) if isinstance(e, SceneChanged)]
        elif kind == "piece":
            out = stream.receive(delta(n, f"<{n}>", done=n == 12))
            shown += "".join(e.text for e in emitted(out) if isinstance(e, NarrationDelta))
        elif kind == "accepted":
            stream.receive(accepted(f"a-{n}"))
        else:
            stream.receive(failed(f"a-{n}"))
    assert applied == list(range(1, len(applied) + 1))
    count = shown.count("<")
    assert shown == "".join(f"<{i}>" for i in range(count))
    if "n-1" in stream.state.narration:
        assert stream.state.narration["n-1"].text == shown
