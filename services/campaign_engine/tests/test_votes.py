"""Party votes: a vote scene starts a vote, the ballot's options wait for it, the party's choice
moves on. (Fallbacks, restarts and vote ids: ``test_vote_fallbacks.py``.)"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from campaign_engine.campaign import builtin_campaign, parse_campaign
from campaign_engine.engine import ReferenceEngine
from campaign_engine.testing import (
    Published,
    RecordingPublisher,
    ScriptedRandom,
    action_request,
    join_notice,
)
from party_sync.engine import EngineRejected
from party_sync.protocol.errors import InvalidEvent, VoteConflict

CONTRACTS_DIR = Path(__file__).resolve().parents[3] / "contracts" / "jsonschema" / "party_sync"
TIMESTAMP = "2026-11-25T21:04:05.123Z"  # action_request's default server time
REFUSED = "The party is voting on this — cast your vote"
T0 = datetime.fromisoformat(TIMESTAMP)  # the server time of every action, unless a test says


def at(seconds: float) -> str:
    """A server timestamp ``seconds`` after T0."""
    moment = T0 + timedelta(seconds=seconds)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def crossroads(start: str = "camp") -> dict[str, Any]:
    """A camp, then a fork the party votes on (one of its options may keep it there), then home."""
    return {
        "id": "crossroads",
        "title": "The Crossroads",
        "start": start,
        "vote_timeout_s": 30,
        "scenes": [
            {
                "id": "camp",
                "number": 1,
                "title": "The Camp",
                "kind": "story",
                "narration": "A camp by the road.",
                "options": [{"id": "go", "label": "Walk to the fork", "next": "fork"}],
            },
            {
                "id": "fork",
                "number": 2,
                "title": "The Fork",
                "kind": "story",
                "narration": "Two roads and a ravine.",
                "check": {"skill": "wits", "flag": "map", "success": "A map!"},
                "party_vote": {"question": "Which way?", "default_option": "right"},
                "options": [
                    {"id": "left", "label": "Take the left road", "next": "home"},
                    {"id": "right", "label": "Take the right road", "next": "home"},
                    {
                        "id": "leap",
                        "label": "Leap the ravine",
                        "check": {
                            "skill": "agility",
                            "difficulty": 10,
                            "on_success": "home",
                            "on_failure": "fork",
                        },
                    },
                    {"id": "map", "label": "Follow the map", "requires": "map", "next": "home"},
                ],
            },
            {"id": "home", "number": 3, "title": "Home", "kind": "ending", "narration": "Home."},
        ],
    }


async def fork_engine(
    publisher: RecordingPublisher, dice: ScriptedRandom, start: str = "camp"
) -> ReferenceEngine:
    """The crossroads with scripted dice, Aria and Bram joined (and at the fork if ``camp``)."""
    publisher.clock = lambda: T0.timestamp()
    engine = ReferenceEngine(parse_campaign(crossroads(start)), rng=dice)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria", trace_id="t-join"))
    await engine.handle_join(join_notice("bram"))
    if start == "camp":
        await engine.handle_action(action_request("choice", {"option": "go"}, trace_id="t-go"))
    return engine


def check_vote_started(message: Mapping[str, Any]) -> None:
    """Validate a whole vote.started message against its schema (if the schemas are there)."""
    if not (CONTRACTS_DIR / "vote.started.json").is_file():
        return
    documents = [json.loads(p.read_text("utf-8")) for p in sorted(CONTRACTS_DIR.glob("*.json"))]
    registry = jsonschema_rs.Registry([(d["$id"], d) for d in documents if "$id" in d])
    schema = next(d for d in documents if d.get("$id", "").endswith("/vote.started.json"))
    jsonschema_rs.validator_for(schema, registry=registry).validate(message)


class OrderedPublisher(RecordingPublisher):
    """Also notes which events had been published when each vote was asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_vote: list[list[str]] = []

    async def start_vote(self, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
        self.before_vote.append(self.types())
        return await super().start_vote(*args, **kwargs)


async def test_entering_the_reef_starts_the_partys_vote_after_the_scene_update(
    schema_check: Callable[[Published], None] | None,
) -> None:
    publisher = OrderedPublisher(check=schema_check)
    engine = ReferenceEngine(builtin_campaign(), seed=7)
    await engine.start(publisher)
    await engine.handle_join(join_notice("aria"))
    await engine.handle_join(join_notice("bram"))
    publisher.clear()
    await engine.handle_action(action_request("choice", {"option": "row"}, trace_id="t-row"))

    assert publisher.before_vote == [["action.result", "scene.update"]]
    [request] = publisher.vote_requests
    assert request.party_id == "party-1"
    assert request.question.startswith("The Reef Gate bars the way.")
    assert [dict(o) for o in request.options] == [
        {"id": "climb", "label": "Climb over the Reef Gate"},
        {"id": "wade", "label": "Wade through the tide pools"},
    ]  # the open options, as the scene.update lists them
    assert [o["id"] for o in publisher.last("scene.update")["options"]] == ["climb", "wade"]
    assert (request.timeout_s, request.tie_rule, request.default_option) == (
        60,
        "default_option",
        "wade",
    )
    assert (request.vote_id, request.campaign_run_id, request.trace_id) == (
        "run-1.s2",
        "run-1",
        "t-row",
    )
    started = publisher.open_vote("party-1")
    assert started is not None and started["vote_id"] == "run-1.s2"
    message = {"type": "vote.started", "timestamp": TIMESTAMP, "trace_id": "t-row", "seq": 9}
    check_vote_started({**message, "payload": started})
    state = await engine.run_state("run-1")
    assert state is not None and state.vote is not None
    assert (state.vote.vote_id, state.vote.status, state.vote.deadline) == (
        "run-1.s2",
        "open",
        started["deadline"],
    )
    assert state.outbox == []


async def test_a_characters_choice_waits_for_the_vote_but_checks_do_not(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    await engine.handle_action(action_request("choice", {"option": "row"}))
    publisher.clear()
    before = await engine.run_state("run-1")

    for option in ("climb", "wade"):
        with pytest.raises(EngineRejected, match=REFUSED):
            await engine.handle_action(action_request("choice", {"option": option}))
    assert publisher.published == []
    after = await engine.run_state("run-1")
    assert after is not None and len(after.refused) == 2  # (remembered, to refuse them again)
    after.refused.clear()
    assert after == before
    with pytest.raises(EngineRejected, match="not an option"):  # still the usual refusal
        await engine.handle_action(action_request("choice", {"option": "row"}))

    await engine.handle_action(action_request("skill_check", {}, character_id="bram"))
    assert publisher.types()[:2] == ["action.result", "scene.update"]
    assert publisher.last("scene.update")["scene_id"] == "reef"
    assert publisher.vote_requests == []  # the vote goes on; no second one


async def test_the_partys_choice_moves_on_and_is_applied_once(
    engine: ReferenceEngine, publisher: RecordingPublisher
) -> None:
    await engine.handle_join(join_notice("aria"))
    await engine.handle_join(join_notice("bram"))
    await engine.handle_action(action_request("choice", {"option": "row"}, trace_id="t-row"))
    publisher.clear()
    vote = publisher.finish_vote("party-1", "wade")
    assert (vote.character_id, vote.action_id, dict(vote.payload)) == (
        "party",
        "vote:run-1.s2",
        {"option": "wade", "vote_id": "run-1.s2"},
    )
    await engine.handle_action(vote)

    assert publisher.types() == ["action.result", "scene.update", "combat.update"]
    assert {e.trace_id for e in publisher.published} == {"t-row"}  # the vote's trace
    result = publisher.last("action.result")
    assert (result["action_id"], result["character_id"], result["outcome"]) == (
        "vote:run-1.s2",
        "party",
        "success",
    )
    assert result["state"] == {"effects": [], "scene_flags": {}}  # a party has no HP
    scene = publisher.last("scene.update")
    assert (scene["scene_id"], scene["scene_number"]) == ("claws", 3)
    assert scene["narration"].startswith("The party chose: Wade through the tide pools.")
    state = await engine.run_state("run-1")
    assert state is not None and state.vote is not None and state.vote.status == "done"
    decision = (await engine.chronicle("run-1"))[-1]
    assert (decision.character_id, decision.payload["vote_id"]) == ("party", "run-1.s2")

    published, chronicle = list(publisher.published), await engine.chronicle("run-1")
    await engine.handle_action(vote)  # redelivered: only its answer again
    assert publisher.published[: len(published)] == published
    assert [p.type for p in publisher.published[len(published) :]] == ["action.result"]
    assert await engine.run_state("run-1") == state
    assert await engine.chronicle("run-1") == chronicle
    assert publisher.vote_requests == []


async def test_an_option_opened_during_the_vote_is_not_on_the_ballot(
    publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    engine = await fork_engine(publisher, dice)
    [request] = publisher.vote_requests
    assert [o["id"] for o in request.options] == ["left", "right", "leap"]
    assert (request.question, request.timeout_s, request.trace_id) == ("Which way?", 30, "t-go")
    dice.push(15)  # bram's wits: success, the map opens an option
    await engine.handle_action(action_request("skill_check", {}, character_id="bram"))
    assert "map" in [o["id"] for o in publisher.last("scene.update")["options"]]

    with pytest.raises(EngineRejected, match=REFUSED):
        await engine.handle_action(action_request("choice", {"option": "left"}))
    await engine.handle_action(action_request("choice", {"option": "map"}, trace_id="t-map"))
    assert publisher.last("scene.update")["scene_id"] == "home"
    with pytest.raises(EngineRejected, match="no longer applies"):  # the vote ends too late
        await engine.handle_action(publisher.finish_vote("party-1", "right"))


async def test_a_party_choice_that_stays_puts_the_next_round_to_the_vote(
    publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    engine = await fork_engine(publisher, dice)
    dice.push(1)  # the party's leap: a natural 1, back to the fork
    first = publisher.finish_vote("party-1", "leap")
    await engine.handle_action(first)
    scene = publisher.last("scene.update")
    assert (scene["scene_id"], scene["scene_number"]) == ("fork", 2)  # stayed
    assert [r.vote_id for r in publisher.vote_requests] == ["run-1.s2", "run-1.s2.r2"]
    assert publisher.vote_requests[1].trace_id == first.trace_id
    with pytest.raises(EngineRejected, match=REFUSED):
        await engine.handle_action(action_request("choice", {"option": "right"}))
    with pytest.raises(EngineRejected, match="no longer applies"):  # round 1's id, new action
        await engine.handle_action(
            action_request(
                "choice", {"option": "left", "vote_id": "run-1.s2"}, character_id="party"
            )
        )
    await engine.handle_action(publisher.finish_vote("party-1"))  # no ballot: right wins a tie
    assert publisher.last("scene.update")["scene_id"] == "home"


async def test_a_run_that_opens_in_a_vote_scene_votes_at_once(
    publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    await fork_engine(publisher, dice, start="fork")
    [request] = publisher.vote_requests  # asked by the first join, not by the second
    assert (request.vote_id, request.trace_id) == ("run-1.s1", "t-join")


async def test_a_vote_that_party_sync_forgot_lapses_after_its_deadline(
    publisher: RecordingPublisher, dice: ScriptedRandom
) -> None:
    engine = await fork_engine(publisher, dice)  # the vote: 30 s from T0
    with pytest.raises(EngineRejected, match=REFUSED):  # an engine outage's length later
        await engine.handle_action(action_request("choice", {"option": "left"}, timestamp=at(320)))
    await engine.handle_action(action_request("choice", {"option": "left"}, timestamp=at(331)))
    assert publisher.last("scene.update")["scene_id"] == "home"


async def test_the_recording_publisher_refuses_what_party_sync_refuses() -> None:
    publisher = RecordingPublisher(clock=lambda: 0.0)
    options = [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]
    with pytest.raises(InvalidEvent, match=r"2\.\.10 options"):
        await publisher.start_vote("p", "Q?", options[:1], 30)
    with pytest.raises(InvalidEvent, match="default_option"):
        await publisher.start_vote("p", "Q?", options, 30, tie_rule="default_option")
    started = await publisher.start_vote("p", "Q?", options, 30, vote_id="v1")
    assert started["deadline"] == "1970-01-01T00:00:30.000Z"
    with pytest.raises(VoteConflict):
        await publisher.start_vote("p", "Q?", options, 30)
    assert publisher.finish_vote("p").action_id == "vote:v1"
    with pytest.raises(VoteConflict, match="already ran"):
        await publisher.start_vote("p", "Q?", options, 30, vote_id="v1")
    made = await publisher.start_vote("p", "Q?", options, 30)
    assert made["vote_id"].startswith("v-")
    assert len(publisher.vote_requests) == 6
