"""One builder per engine message shape (docs/engines.md): votes, notices, actions.

``VoteRequest`` is the one statement of a vote request, ``VoteStarter.start_vote`` the one
implementation of the engine-facing call; a notice carries the time it was announced, so both
engine transports put the same envelope on the wire; an ``ActionRequest`` is made from its
envelope only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from campaign_engine.testing import RecordingPublisher
from party_sync.core import votes
from party_sync.engine import wire
from party_sync.engine.http_host import ApiPublisher
from party_sync.engine.interface import (
    ActionRequest,
    JoinNotice,
    NarrationPiece,
    NarrationSender,
    RestateNotice,
    VoteRequest,
    VoteStarter,
    action_envelope,
)
from party_sync.publishing import BackendPublisher
from ps_testkit.hosts import RecordingHost

OPTIONS = ({"id": "left", "label": "Go left"}, {"id": "right", "label": "Go right"})
T = 1_795_000_000.25  # a join's time: 2026-11-18T11:06:40.250Z


class _Recorder(VoteStarter, NarrationSender):
    def __init__(self) -> None:
        self.requests: list[VoteRequest] = []
        self.narrated: list[NarrationPiece] = []

    async def send_piece(self, piece: NarrationPiece) -> None:
        self.narrated.append(piece)

    async def request_vote(self, request: VoteRequest) -> Mapping[str, Any]:
        self.requests.append(request)
        return {"vote_id": request.vote_id}


async def test_start_vote_keeps_the_engine_facing_call_and_makes_one_request() -> None:
    recorder = _Recorder()
    await recorder.start_vote("p1", "Which way?", OPTIONS, 30)
    await recorder.start_vote(
        "p1",
        "Which way?",
        list(OPTIONS),
        timeout_s=12.5,
        vote_id="v-1",
        tie_rule="default_option",
        default_option="right",
        campaign_run_id="r1",
        trace_id="t-1",
    )
    assert recorder.requests == [
        VoteRequest("p1", "Which way?", OPTIONS, 30),
        VoteRequest(
            "p1", "Which way?", OPTIONS, 12.5, "v-1", "default_option", "right", "r1", "t-1"
        ),
    ]


@pytest.mark.parametrize(
    "publisher", [BackendPublisher, ApiPublisher, RecordingHost, RecordingPublisher]
)
def test_every_publisher_inherits_the_one_start_vote_and_the_one_narrate(
    publisher: type[object],
) -> None:
    assert issubclass(publisher, VoteStarter)
    assert publisher.start_vote is VoteStarter.start_vote
    assert issubclass(publisher, NarrationSender)
    assert publisher.narrate is NarrationSender.narrate


def test_a_request_goes_over_http_and_back_unchanged() -> None:
    full = VoteRequest(
        "p1", "Which way?", OPTIONS, 30.0, "v-1", "default_option", "right", "r1", "t"
    )
    assert VoteRequest.from_json("p1", full.to_json()) == full
    bare = VoteRequest("p1", "Which way?", OPTIONS, 30.0)
    assert bare.to_json() == {
        "question": "Which way?",
        "options": list(OPTIONS),
        "timeout_s": 30.0,
        "tie_rule": "first_listed",
    }
    made = VoteRequest.from_json("p1", bare.to_json())  # "one is made if missing"
    assert made.vote_id is not None and made == VoteRequest(
        "p1", "Which way?", OPTIONS, 30.0, made.vote_id
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "body must be an object"),
        (
            {"question": "q", "options": list(OPTIONS), "timeout_s": 5, "campaign_run_id": "a b"},
            "campaign_run_id",
        ),
        ({"question": "q", "options": list(OPTIONS), "timeout_s": 5, "trace_id": ""}, "trace_id"),
        ({"question": "q", "options": list(OPTIONS[:1]), "timeout_s": 5}, "options"),
        ({"question": "q", "options": list(OPTIONS)}, "bad vote request"),
        ({"question": "q", "options": ["left", "right"], "timeout_s": 5}, "bad vote request"),
    ],
)
def test_a_bad_request_is_refused_with_its_reason(body: object, reason: str) -> None:
    with pytest.raises(votes.SpecError, match=reason):
        VoteRequest.from_json("p1", body)


def test_the_spec_follows_the_core_rules() -> None:
    spec = VoteRequest("p1", "Which way?", OPTIONS, 30, "v-9").spec()
    assert spec == votes.VoteSpec(
        "v-9", "Which way?", (("left", "Go left"), ("right", "Go right")), 30.0
    )
    assert VoteRequest("p1", "Which way?", OPTIONS, 30).spec(default_id="v-d").vote_id == "v-d"
    with pytest.raises(votes.SpecError):
        VoteRequest("p1", "Which way?", OPTIONS, 0).spec()
    with pytest.raises(votes.SpecError):  # an engine's option that is not a mapping
        VoteRequest("p1", "Which way?", ("left", "right"), 30).spec()  # type: ignore[arg-type]


def test_a_notice_is_stamped_with_the_time_it_was_announced_on_both_transports() -> None:
    join = JoinNotice("p1", "r1", "aria", "Aria", "t-j", at=T)
    envelope = wire.join_envelope(join)
    assert envelope == {
        "type": "party.join",
        "timestamp": "2026-11-18T11:06:40.250Z",
        "trace_id": "t-j",
        "payload": {"character_id": "aria", "display_name": "Aria"},
    }
    parsed = wire.parse_join("p1", "r1", envelope)
    assert parsed == join and parsed.at == T
    restate = RestateNotice("p1", "r1", "e-2", "t-r", at=T)
    assert wire.restate_envelope(restate)["timestamp"] == "2026-11-18T11:06:40.250Z"
    assert wire.parse_restate("p1", "r1", wire.restate_envelope(restate)).at == T


def test_a_notice_without_a_timestamp_is_malformed() -> None:
    envelope = wire.join_envelope(JoinNotice("p1", "r1", "aria", "Aria", "t-j", at=T))
    del envelope["timestamp"]
    with pytest.raises(KeyError):
        wire.parse_join("p1", "r1", envelope)
    with pytest.raises(ValueError, match="offset"):
        wire.parse_join("p1", "r1", {**envelope, "timestamp": "2026-11-18T11:06:40"})  # no offset


def test_notices_compare_by_what_they_say_not_when() -> None:
    assert JoinNotice("p1", "r1", "aria", "Aria", "t", at=1.0) == JoinNotice(
        "p1", "r1", "aria", "Aria", "t", at=2.0
    )


def test_an_action_request_is_made_from_its_envelope() -> None:
    payload = {
        "action_id": "a1",
        "character_id": "aria",
        "campaign_run_id": "r1",
        "action_type": "choice",
        "payload": {"option": "left"},
    }
    envelope = action_envelope(payload, "t-a", T)
    action = ActionRequest.from_envelope("p1", envelope, deadline=T + 5)
    assert action == ActionRequest(
        "p1", "r1", "aria", "a1", "choice", {"option": "left"}, "t-a", envelope, T + 5
    )
    assert wire.parse_action("p1", envelope, None).deadline is None
