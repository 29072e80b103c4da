"""The Python client's protocol core (``party_sync.client.stream``, ``state``, ``policy``): pure,
driven message by message, no socket and no clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from party_sync.client.events import ActionResult, Connected, MemberJoined, ServerError
from party_sync.client.policy import Backoff, Next, after_close, after_handshake, handshake_reason
from party_sync.client.stream import (
    ActionDone,
    ActionError,
    ClientStream,
    Emit,
    Output,
    Resync,
    Send,
    VoteDone,
    VoteError,
)

EPOCH = "ep-1"


def hello(seq: int = 3, *, resumed_from: int | None = None, epoch: str = EPOCH) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "protocol": 1,
        "party_id": "p1",
        "campaign_run_id": "r1",
        "you": "aria",
        "status": "active",
        "run_status": "in_progress",
        "members": [
            {"character_id": "aria", "display_name": "Aria", "online": True},
            {"character_id": "borin", "display_name": "Borin", "online": False},
        ],
        "scene_number": 0,
        "seq": seq,
        "epoch": epoch,
        "resumed": resumed_from is not None,
        "scene": None,
        "combat": None,
        "party_state": None,
        "vote": None,
        "limits": {"max_message_bytes": 65536, "action_timeout_ms": 10000, "heartbeat_ms": 1},
    }
    if resumed_from is not None:
        payload["resumed_from"] = resumed_from
    return {"type": "system.hello", "trace_id": "t", "payload": payload}


def event(
    seq: int, type_: str = "scene.update", trace_id: str = "t", **payload: Any
) -> dict[str, Any]:
    if type_ == "scene.update" and not payload:
        payload = {"scene_number": seq, "scene_id": f"s{seq}", "title": f"S{seq}", "options": []}
    return {"type": type_, "seq": seq, "trace_id": trace_id, "payload": payload}


def result(seq: int, action_id: str) -> dict[str, Any]:
    return event(seq, "action.result", action_id=action_id, character_id="aria", outcome="success")


def error(code: str, **in_reply_to: Any) -> dict[str, Any]:
    return {
        "type": "system.error",
        "trace_id": "t",
        "payload": {
            "code": code,
            "message": "m",
            "retryable": False,
            "in_reply_to": {"trace_id": None, "type": None, **in_reply_to},
        },
    }


def action(action_id: str) -> dict[str, Any]:
    return {"type": "action.request", "payload": {"action_id": action_id}}


def open_vote(stream: ClientStream) -> dict[str, Any] | None:
    return stream.state.vote  # (a call: mypy does not keep an earlier narrowing)


def emitted(outputs: list[Output]) -> list[Any]:
    return [o.event for o in outputs if isinstance(o, Emit)]


def test_a_snapshot_hello_replaces_the_state_and_goes_live() -> None:
    stream = ClientStream()
    assert stream.add_action(action("a1")) is False  # queued until the hello
    out = stream.receive(hello(3))
    assert isinstance(emitted(out)[0], Connected) and not emitted(out)[0].resumed
    assert [o for o in out if isinstance(o, Send)] == [Send(action("a1"))]
    assert stream.live and stream.resume_point() == (EPOCH, 3)
    assert stream.state.online == ["aria"] and stream.state.you == "aria"


def test_events_apply_in_order_duplicates_are_dropped_and_a_gap_resyncs() -> None:
    stream = ClientStream()
    stream.receive(hello(3))
    first = emitted(stream.receive(event(4)))
    assert [e.seq for e in first] == [4] and stream.state.scene_number == 4
    assert stream.receive(event(4)) == [] and stream.receive(event(2)) == []
    out = stream.receive(event(6))
    assert len(out) == 1 and isinstance(out[0], Resync)
    assert stream.resume_point() is None and not stream.live  # the next connect takes a snapshot


def test_an_event_before_the_hello_resyncs() -> None:
    assert isinstance(ClientStream().receive(event(1))[0], Resync)


def test_a_resumed_hello_keeps_the_state_and_sends_pending_actions_after_the_replay() -> None:
    stream = ClientStream()
    stream.receive(hello(3))
    stream.receive(event(4))
    stream.connection_lost()
    stream.add_action(action("a1"))
    out = stream.receive(hello(6, resumed_from=4))
    assert emitted(out)[0].resumed is True and not any(isinstance(o, Send) for o in out)
    assert stream.state.scene_number == 4  # kept, not replaced by the newer snapshot
    assert not any(isinstance(o, Send) for o in stream.receive(event(5)))
    out = stream.receive(event(6))
    assert [o for o in out if isinstance(o, Send)] == [Send(action("a1"))]
    assert stream.resume_point() == (EPOCH, 6)


def test_a_hello_that_does_not_match_our_resume_point_is_a_snapshot() -> None:
    stream = ClientStream()
    stream.receive(hello(3))
    stream.connection_lost()
    out = stream.receive(hello(9, resumed_from=2, epoch="ep-2"))
    assert emitted(out)[0].resumed is False and stream.resume_point() == ("ep-2", 9)


def test_a_live_result_settles_its_action_and_a_repeated_one_too() -> None:
    stream = ClientStream()
    stream.receive(hello(3))
    stream.add_action(action("a1"))
    out = stream.receive(result(4, "a1"))
    assert isinstance(emitted(out)[0], ActionResult)
    assert [o.action_id for o in out if isinstance(o, ActionDone)] == ["a1"]
    # resent after a reconnect: the server repeats the original result (old seq), sender only
    stream.add_action(action("a2"))
    stream.receive(result(5, "other"))
    out = stream.receive(result(5, "a2"))
    assert len(out) == 1 and isinstance(out[0], ActionDone) and out[0].action_id == "a2"
    assert stream.receive(result(5, "a2")) == []  # nothing pending any more: a plain duplicate


def test_action_in_flight_keeps_waiting_other_errors_settle() -> None:
    stream = ClientStream()
    stream.receive(hello(3))
    stream.add_action(action("a1"))
    out = stream.receive(error("action_in_flight", type="action.request", action_id="a1"))
    assert [type(o) for o in out] == [Emit] and "a1" in stream.actions
    out = stream.receive(error("action_timeout", type="action.request", action_id="a1"))
    assert isinstance(out[1], ActionError) and out[1].error.code == "action_timeout"
    assert "a1" not in stream.actions
    assert isinstance(emitted(stream.receive(error("rate_limited")))[0], ServerError)


def test_an_error_naming_no_action_id_settles_the_action_sent_with_its_trace_id() -> None:
    """Clients probe: a ``schema_violation`` about an ``action.request`` whose ``action_id``
    broke the rule names it by ``trace_id`` only; the action, and every one behind it, waited
    for ever. It settles that action; an error about another message with that trace_id, or
    without one, settles nothing."""
    stream = ClientStream()
    stream.receive(hello(3))
    first = {**action("a1"), "trace_id": "t-1"}
    second = {**action("a2"), "trace_id": "t-2"}
    stream.add_action(first)
    stream.add_action(second)
    assert [
        type(o) for o in stream.receive(error("schema_violation", trace_id="t-2", type="vote.cast"))
    ] == [Emit]
    assert [type(o) for o in stream.receive(error("schema_violation", type="action.request"))] == [
        Emit
    ]
    out = stream.receive(error("schema_violation", trace_id="t-1", type="action.request"))
    assert isinstance(out[1], ActionError) and out[1].action_id == "a1"
    assert [o for o in out if isinstance(o, Send)] == [Send(second)]
    assert list(stream.actions) == ["a2"]


def test_actions_go_out_one_at_a_time_in_order() -> None:
    """Outside client probe: three concurrent send_action calls went out at once, and the server
    answered the second and third character_busy (one in flight per character); the browser
    library sends the oldest pending action, and the next once it is answered."""
    stream = ClientStream()
    stream.receive(hello(3))
    assert stream.add_action(action("a1")) is True
    assert stream.add_action(action("a2")) is False  # waits for a1's answer
    assert stream.add_action(action("a3")) is False
    out = stream.receive(result(4, "a1"))
    assert [o for o in out if isinstance(o, Send)] == [Send(action("a2"))]
    out = stream.receive(error("engine_error", type="action.request", action_id="a2"))
    assert [o for o in out if isinstance(o, Send)] == [Send(action("a3"))]
    stream.connection_lost()  # a3 unanswered: resent alone after the next hello, once
    assert stream.add_action(action("a4")) is False
    out = stream.receive(hello(4, resumed_from=4))
    assert [o for o in out if isinstance(o, Send)] == [Send(action("a3"))]
    assert stream.drop_action("a3") == [Send(action("a4"))]  # its caller gave up: the next
    assert stream.drop_action("a3") == []


@pytest.mark.parametrize(
    "answer",
    [
        error("backend_unavailable", type="action.request", action_id="a1"),
        error("character_busy", type="action.request", action_id="a1"),
        result(4, "a1"),
        None,  # its caller gave up (drop_action)
    ],
)
def test_an_action_sent_again_under_its_id_on_the_same_connection_goes_out(
    answer: dict[str, Any] | None,
) -> None:
    """Soak probe: after a refusal that is not final (``backend_unavailable``), the README's
    resend with the same ``action_id`` was never put on the wire (it still counted as sent on
    this connection), and its caller waited until a reconnect. A result asked for again, or an
    action its caller gave up on and sends again, likewise."""
    stream = ClientStream()
    stream.receive(hello(3))
    assert stream.add_action(action("a1")) is True
    if answer is None:
        assert stream.drop_action("a1") == []
    else:
        stream.receive(answer)
    assert "a1" not in stream.actions
    assert stream.add_action(action("a1")) is True  # sent again, once
    assert stream.add_action(action("a2")) is False  # (one at a time still)
    out = stream.receive(error("backend_unavailable", type="action.request", action_id="a1"))
    assert [o for o in out if isinstance(o, Send)] == [Send(action("a2"))]


def test_ballots_are_settled_by_their_trace_id() -> None:
    stream = ClientStream()
    stream.receive(hello(3))
    options = [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]
    stream.receive(
        event(4, "vote.started", vote_id="v1", question="?", options=options, deadline="d")
    )
    assert stream.state.vote is not None and stream.state.vote["tallies"] == {"a": 0, "b": 0}
    cast = {"type": "vote.cast", "trace_id": "c1", "payload": {"vote_id": "v1", "option": "b"}}
    stream.add_vote(cast)
    update = event(5, "vote.update", "c1", vote_id="v1", tallies={"a": 0, "b": 1}, voted=1)
    update["payload"]["eligible"] = 1
    out = stream.receive(update)
    assert any(isinstance(o, VoteDone) for o in out)
    assert stream.state.vote["your_vote"] == "b" and stream.state.vote["voted"] == 1
    stream.add_vote({**cast, "trace_id": "c2"})
    out = stream.receive(error("vote_closed", type="vote.cast", trace_id="c2", vote_id="v1"))
    assert isinstance(out[1], VoteError) and out[1].vote_id == "v1"
    stream.receive(event(6, "vote.finished", vote_id="v1", winner="b"))
    assert open_vote(stream) is None and stream.state.last_vote is not None


def test_ballots_cast_offline_send_only_the_last_per_vote_and_settle_with_it() -> None:
    """Re-probe: a voter whose client queued ballots while offline sent them all after the
    reconnect; the vote had closed, and the refusals, strikes now, closed it with 1008. Only the
    last ballot of each vote is sent (the server counts the last only); the others settle with
    its answer."""
    stream = ClientStream()
    stream.receive(hello(3))
    options = [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]
    stream.receive(
        event(4, "vote.started", vote_id="v1", question="?", options=options, deadline="d")
    )
    stream.connection_lost()

    def cast(trace_id: str, option: str, vote_id: str = "v1") -> dict[str, Any]:
        return {
            "type": "vote.cast",
            "trace_id": trace_id,
            "payload": {"vote_id": vote_id, "option": option},
        }

    for trace_id, option in (("c1", "a"), ("c2", "b"), ("c3", "a")):
        assert stream.add_vote(cast(trace_id, option)) is False  # offline: sent at catch-up
    stream.add_vote(cast("w1", "x", vote_id="v2"))
    out = stream.receive(hello(4, resumed_from=4))
    assert [o.message["trace_id"] for o in out if isinstance(o, Send)] == ["c3", "w1"]
    update = event(5, "vote.update", "c3", vote_id="v1", tallies={"a": 1, "b": 0}, voted=1)
    update["payload"]["eligible"] = 2
    done = [o.trace_id for o in stream.receive(update) if isinstance(o, VoteDone)]
    assert done == ["c3", "c1", "c2"]
    assert stream.state.vote is not None and stream.state.vote["your_vote"] == "a"
    stream.connection_lost()
    stream.add_vote(cast("d1", "b"))
    stream.add_vote(cast("d2", "a"))
    out = stream.receive(hello(5, resumed_from=5))
    assert [o.message["trace_id"] for o in out if isinstance(o, Send)] == ["w1", "d2"]
    out = stream.receive(error("vote_closed", type="vote.cast", trace_id="d2", vote_id="v1"))
    assert [o.trace_id for o in out if isinstance(o, VoteError)] == ["d2", "d1"]


def test_roster_scene_combat_and_party_state_follow_the_events() -> None:
    stream = ClientStream()
    stream.receive(hello(3))
    out = stream.receive(event(4, "party.join", character_id="cora", display_name="Cora"))
    assert isinstance(emitted(out)[0], MemberJoined) and emitted(out)[0].character_id == "cora"
    stream.receive(event(5, "party.leave", character_id="aria", reason="disconnected"))
    stream.receive(event(6, "party.leave", character_id="borin", reason="left"))
    assert stream.state.online == ["cora"] and set(stream.state.members) == {"aria", "cora"}
    stream.receive(event(7, "combat.update", active=True, round=1, combatants=[]))
    stream.receive(event(8, "party.state", status="wiped", run_status="finished"))
    assert stream.state.combat is not None and stream.state.combat["active"]
    assert (stream.state.status, stream.state.run_status) == ("wiped", "finished")


@given(st.lists(st.integers(1, 12), max_size=30))
def test_whatever_arrives_the_applied_seqs_are_consecutive_until_a_resync(seqs: list[int]) -> None:
    stream = ClientStream()
    stream.receive(hello(0))
    applied: list[int] = []
    for seq in seqs:
        out = stream.receive(event(seq))
        if any(isinstance(o, Resync) for o in out):
            assert seq > (applied[-1] if applied else 0) + 1
            break
        applied.extend(e.seq for e in emitted(out))
    assert applied == list(range(1, len(applied) + 1))


@pytest.mark.parametrize(
    ("code", "step"),
    [
        (1000, Next.STOP),
        (1008, Next.STOP),
        (4001, Next.REFRESH),
        (4003, Next.RESYNC),
        (1001, Next.RESUME),
        (1006, Next.RESUME),
        (1011, Next.RESUME),
        (4002, Next.RESUME),
        (None, Next.RESUME),
    ],
)
def test_what_each_close_code_means(code: int | None, step: Next) -> None:
    assert after_close(code) is step


@pytest.mark.parametrize(
    ("status", "step"),
    [
        (401, Next.REFRESH),
        (403, Next.STOP),
        (404, Next.STOP),
        (429, Next.RESUME),
        (502, Next.RESUME),
    ],
)
def test_what_each_handshake_status_means(status: int, step: Next) -> None:
    assert after_handshake(status) is step


def test_a_refused_handshake_reads_as_its_documented_reason() -> None:
    assert "token was refused" in handshake_reason(401, fallback="Invalid response status")
    assert "no WebSocket endpoint" in handshake_reason(404, fallback="Invalid response status")
    assert handshake_reason(429, "10").endswith("; retry after 10 s")
    assert handshake_reason(418, fallback="Invalid response status") == "Invalid response status"
    assert handshake_reason(418) == "HTTP 418"
    # a 403 with Retry-After is an operator's block (outside client probe: the reason named
    # both causes; the server's body, which says which, is not readable through aiohttp)
    assert handshake_reason(403, "16") == (
        "an operator disconnected this player (disconnected_by_operator); retry after 16 s"
    )
    assert "Origin is not allowed" in handshake_reason(403)


@given(reason=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_the_servers_401_challenge_names_the_failed_check_in_the_reason(reason: str) -> None:
    from party_sync.transport.http import bearer_challenge

    said = handshake_reason(401, challenge=bearer_challenge(reason))
    assert said.startswith(f"{reason}: ") and "token was refused" in said
    assert handshake_reason(401, challenge=bearer_challenge(None)) == handshake_reason(401)


@given(attempt=st.integers(0, 10_000), r=st.floats(0, 1, exclude_max=True))
def test_backoff_is_full_jitter_under_an_exponential_ceiling(attempt: int, r: float) -> None:
    backoff = Backoff(base=0.5, cap=30.0, random=lambda: r)
    ceiling = min(30.0, 0.5 * 2 ** min(attempt, 64))
    assert backoff.delay(attempt) == pytest.approx(r * ceiling)
    assert 0 <= backoff.delay(attempt) < 30.0


def test_backoff_ceilings_double_up_to_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=30.0, random=lambda: 1.0)
    assert [backoff.delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
