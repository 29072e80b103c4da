"""Projection.apply: the party state folded from the event stream (seq must be the previous + 1)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.client.state import PartyState
from party_sync.core.projection import DEFAULT_RUN_STATUS, DEFAULT_STATUS, Projection
from party_sync.protocol import types as t

OPTIONS = [{"id": "open-gate", "label": "Force the gate"}, {"id": "turn-back", "label": "Go back"}]


def fold(events: list[tuple[str, dict[str, Any]]]) -> Projection:
    proj = Projection()
    for seq, (type_, payload) in enumerate(events, start=1):
        proj.apply(type_, payload, seq)
    return proj


def join(cid: str, name: str | None = None) -> tuple[str, dict[str, Any]]:
    return t.PARTY_JOIN, {"character_id": cid, "display_name": name or cid.title()}


def leave(cid: str, reason: str) -> tuple[str, dict[str, Any]]:
    return t.PARTY_LEAVE, {"character_id": cid, "reason": reason}


def vote_started(vote_id: str = "v1") -> tuple[str, dict[str, Any]]:
    return t.VOTE_STARTED, {
        "vote_id": vote_id,
        "question": "What now?",
        "options": OPTIONS,
        "timeout_s": 60,
        "deadline": "2026-11-25T21:02:05.000Z",
        "tie_rule": "first_listed",
    }


def test_a_new_projection() -> None:
    proj = Projection()
    assert proj.seq == 0
    assert proj.member_list() == []
    assert proj.scene is None and proj.combat is None and proj.vote is None
    assert proj.scene_number == 0
    assert proj.status == DEFAULT_STATUS == "active"
    assert proj.run_status == DEFAULT_RUN_STATUS == "pending"


@pytest.mark.parametrize("seq", [0, 2, 5, -1])
def test_seq_must_follow_the_last_one_and_a_refused_event_changes_nothing(seq: int) -> None:
    proj = Projection()
    with pytest.raises(ValueError, match="does not follow"):
        proj.apply(t.PARTY_JOIN, {"character_id": "aria", "display_name": "Aria"}, seq)
    assert proj.seq == 0
    assert proj.members == {}


def test_a_repeated_seq_is_refused() -> None:
    proj = fold([join("aria")])
    with pytest.raises(ValueError, match="does not follow"):
        proj.apply(t.PARTY_LEAVE, {"character_id": "aria", "reason": "left"}, 1)
    assert proj.is_online("aria")
    assert proj.seq == 1


def test_join_and_leave_shape_the_roster() -> None:
    proj = fold([join("aria"), join("borin"), join("cara")])
    assert [m["character_id"] for m in proj.member_list()] == ["aria", "borin", "cara"]
    assert all(m["online"] for m in proj.member_list())

    proj.apply(*leave("aria", t.LEAVE_DISCONNECTED), 4)
    proj.apply(*leave("borin", t.LEAVE_EXPIRED), 5)
    proj.apply(*leave("cara", t.LEAVE_LEFT), 6)
    assert proj.member_list() == [
        {"character_id": "aria", "display_name": "Aria", "online": False},
        {"character_id": "borin", "display_name": "Borin", "online": False},
    ]
    assert not proj.is_online("aria")
    assert not proj.is_online("cara")
    assert proj.seq == 6


def test_a_rejoin_is_online_again_keeps_its_place_and_takes_the_new_name() -> None:
    proj = fold([join("aria"), join("borin"), leave("aria", t.LEAVE_DISCONNECTED)])
    proj.apply(*join("aria", "Aria the Bold"), 4)
    assert proj.member_list() == [
        {"character_id": "aria", "display_name": "Aria the Bold", "online": True},
        {"character_id": "borin", "display_name": "Borin", "online": True},
    ]


def test_a_leave_of_an_unknown_character_adds_nobody() -> None:
    proj = fold([leave("ghost", t.LEAVE_DISCONNECTED), leave("ghost2", t.LEAVE_LEFT)])
    assert proj.members == {}
    assert proj.seq == 2


def test_scene_combat_and_party_state_are_the_latest_payloads() -> None:
    scene1 = {"scene_number": 1, "scene_id": "s1", "title": "A", "narration": "", "options": []}
    scene2 = {**scene1, "scene_number": 2, "scene_id": "s2"}
    combat = {"active": True, "round": 1, "combatants": []}
    state = {"status": "paused", "run_status": "in_progress"}
    proj = fold(
        [
            (t.SCENE_UPDATE, scene1),
            (t.COMBAT_UPDATE, combat),
            (t.SCENE_UPDATE, scene2),
            (t.PARTY_STATE, state),
        ]
    )
    assert proj.scene == scene2
    assert proj.scene_number == 2
    assert proj.combat == combat
    assert proj.status == "paused"
    assert proj.run_status == "in_progress"


def test_events_without_state_still_advance_seq() -> None:
    proj = fold([(t.ACTION_RESULT, {"action_id": "a1", "character_id": "aria"})])
    assert proj.seq == 1
    assert proj.members == {}


def test_a_vote_opens_with_zero_tallies_and_the_online_members_as_eligible() -> None:
    proj = fold([join("aria"), join("borin"), join("cara"), leave("cara", t.LEAVE_DISCONNECTED)])
    proj.apply(*vote_started("v1"), 5)
    assert proj.vote == {
        "vote_id": "v1",
        "question": "What now?",
        "options": OPTIONS,
        "deadline": "2026-11-25T21:02:05.000Z",
        "tallies": {"open-gate": 0, "turn-back": 0},
        "voted": 0,
        "eligible": 2,
    }


def test_vote_update_and_finished_apply_to_the_open_vote_only() -> None:
    proj = fold([join("aria"), vote_started("v1")])
    update = {"vote_id": "v1", "tallies": {"open-gate": 1, "turn-back": 0}, "voted": 1}
    proj.apply(t.VOTE_UPDATE, {**update, "eligible": 1}, 3)
    proj.apply(t.VOTE_UPDATE, {**update, "vote_id": "v0", "voted": 9, "eligible": 9}, 4)
    proj.apply(t.VOTE_FINISHED, {"vote_id": "v0"}, 5)  # another (stale) vote: ignored
    vote = proj.vote
    assert vote is not None
    assert vote["tallies"] == {"open-gate": 1, "turn-back": 0}
    assert (vote["voted"], vote["eligible"]) == (1, 1)
    proj.apply(t.VOTE_FINISHED, {"vote_id": "v1", "winner": "open-gate"}, 6)
    assert proj.vote is None
    proj.apply(t.VOTE_UPDATE, {**update, "eligible": 1}, 7)  # no vote open: ignored
    assert proj.vote is None


def test_a_new_vote_replaces_the_open_one() -> None:
    proj = fold([join("aria"), vote_started("v1"), vote_started("v2")])
    assert proj.vote is not None
    assert proj.vote["vote_id"] == "v2"


# -- property: the roster follows join/leave ---------------------------------------------------

roster_events: st.SearchStrategy[tuple[str, str, str]] = st.tuples(
    st.sampled_from(["join", "disconnected", "expired", "left"]),
    st.sampled_from(["aria", "borin", "cara"]),
    st.sampled_from(["A", "B"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(roster_events, max_size=30))
def test_roster_matches_a_dict_model(script: list[tuple[str, str, str]]) -> None:
    proj = Projection()
    model: dict[str, tuple[str, bool]] = {}  # character → (display name, online)
    for seq, (kind, cid, name) in enumerate(script, start=1):
        if kind == "join":
            proj.apply(t.PARTY_JOIN, {"character_id": cid, "display_name": name}, seq)
            model[cid] = (name, True)
        else:
            proj.apply(t.PARTY_LEAVE, {"character_id": cid, "reason": kind}, seq)
            if kind == "left":
                model.pop(cid, None)
            elif cid in model:
                model[cid] = (model[cid][0], False)
        assert {
            m["character_id"]: (m["display_name"], m["online"]) for m in proj.member_list()
        } == model
        assert all(proj.is_online(c) == (c in model and model[c][1]) for c in model)
    assert proj.seq == len(script)


# -- from_hello: a client's projection starts from the snapshot --------------------------------

CHARACTERS = ["aria", "borin", "cara"]
event_strategy: st.SearchStrategy[tuple[str, dict[str, Any]]] = st.one_of(
    st.builds(join, st.sampled_from(CHARACTERS), st.sampled_from(["A", "B"])),
    st.builds(
        leave,
        st.sampled_from(CHARACTERS),
        st.sampled_from([t.LEAVE_DISCONNECTED, t.LEAVE_EXPIRED, t.LEAVE_LEFT]),
    ),
    st.builds(
        lambda n: (t.SCENE_UPDATE, {"scene_number": n, "scene_id": f"s{n}", "options": []}),
        st.integers(1, 5),
    ),
    st.builds(lambda r: (t.COMBAT_UPDATE, {"active": True, "round": r}), st.integers(1, 3)),
    st.builds(
        lambda s: (t.PARTY_STATE, {"status": s, "run_status": "in_progress"}),
        st.sampled_from(["active", "paused"]),
    ),
    st.builds(vote_started, st.sampled_from(["v1", "v2"])),
    st.builds(
        lambda v, n: (
            t.VOTE_UPDATE,
            {"vote_id": v, "tallies": {"open-gate": n, "turn-back": 0}, "voted": n, "eligible": 3},
        ),
        st.sampled_from(["v1", "v2"]),
        st.integers(0, 3),
    ),
    st.builds(
        lambda v: (t.VOTE_FINISHED, {"vote_id": v, "winner": "open-gate"}),
        st.sampled_from(["v1", "v2"]),
    ),
)


def hello_of(proj: Projection) -> dict[str, Any]:
    """What the gateway puts in a hello from a snapshot of ``proj`` (core/snapshot.py)."""
    return {
        "seq": proj.seq,
        "members": proj.member_list(),
        "scene": proj.scene,
        "combat": proj.combat,
        "party_state": proj.party_state,
        "vote": None if proj.vote is None else {**proj.vote, "your_vote": None},
    }


def test_from_hello_reads_the_snapshot() -> None:
    proj = fold([join("aria"), join("borin"), leave("borin", t.LEAVE_DISCONNECTED)])
    proj.apply(*vote_started("v1"), 4)
    copy = Projection.from_hello(hello_of(proj))
    assert copy.seq == 4
    assert copy.member_list() == proj.member_list()
    assert copy.vote == {**(proj.vote or {}), "your_vote": None}
    assert Projection.from_hello({"seq": 0}) == Projection()


@settings(max_examples=200, deadline=None)
@given(st.lists(event_strategy, max_size=20), st.lists(event_strategy, max_size=20))
def test_a_projection_from_a_hello_follows_the_server_one(
    before: list[tuple[str, dict[str, Any]]], after: list[tuple[str, dict[str, Any]]]
) -> None:
    """Take a hello after ``before``, fold ``after`` on both sides: the client's projection is the
    server's (the vote aside from the connection's ``your_vote``) at every step."""
    server = fold(before)
    client = Projection.from_hello(hello_of(server))
    for seq, (type_, payload) in enumerate(after, start=server.seq + 1):
        server.apply(type_, payload, seq)
        client.apply(type_, payload, seq)
        assert hello_of(client) == hello_of(server)
        assert (client.status, client.run_status) == (server.status, server.run_status)


@settings(max_examples=100, deadline=None)
@given(st.lists(event_strategy, max_size=20), st.lists(event_strategy, max_size=20))
def test_the_python_clients_state_is_the_projection(
    before: list[tuple[str, dict[str, Any]]], after: list[tuple[str, dict[str, Any]]]
) -> None:
    """``party_sync.client``'s ``PartyState`` folds events with these rules, not its own."""
    server = fold(before)
    hello = {
        **hello_of(server),
        "party_id": "p1",
        "campaign_run_id": "r1",
        "you": "aria",
        "epoch": "e1",
        "status": server.status,
        "run_status": server.run_status,
    }
    state = PartyState.from_hello(hello)
    for seq, (type_, payload) in enumerate(after, start=server.seq + 1):
        server.apply(type_, payload, seq)
        state.apply(type_, seq, payload)
        assert state.seq == server.seq
        assert state.members == server.members
        assert (state.scene, state.combat, state.party_state) == (
            server.scene,
            server.combat,
            server.party_state,
        )
        assert (state.status, state.run_status) == (server.status, server.run_status)
        expected_vote = None if server.vote is None else {**server.vote, "your_vote": None}
        assert state.vote == expected_vote
        assert state.online == [c for c in server.members if server.is_online(c)]
    with pytest.raises(ValueError, match="does not follow"):
        state.apply(t.SCENE_UPDATE, state.seq + 2, {"scene_number": 1})
