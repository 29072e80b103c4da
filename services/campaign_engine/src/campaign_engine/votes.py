"""Party votes: the scenes where the party decides together, and how the engine runs them.

A story scene marked ``party_vote`` in the campaign is decided by the whole party, through a vote
that party_sync runs (``EventPublisher.start_vote``; protocol-v1, *Votes*). The engine's side:

1. An action (or the join that starts the run) brings the party into such a scene. :func:`plan`
   records a :class:`~campaign_engine.state.VoteState` (``requested``) in the run and gives the
   engine a ``vote.start`` entry for the action's outbox, after its ``scene.update`` and the rest
   of its events. The request is committed with the action, as durable as its events.
2. Publishing the outbox reaches that entry and :func:`start` asks party_sync for the vote, over
   the scene's open options, with a vote id fixed by the run and the scene visit
   (:func:`vote_id_for`), so asking twice (a redelivered action republishing its outbox) gets
   ``VoteConflict`` instead of a second vote. Started → ``open``. ``VoteConflict`` → logged and
   ``open`` all the same (it is this vote, or another one is in the way). No ``start_vote`` or any
   other failure → a warning and ``off``: the characters choose, as in any scene.
3. While the vote is open, a character's ``choice`` of an option on the ballot is refused
   ("The party is voting on this — cast your vote."). Skill checks and fights go on; an option a
   check opens during the vote is not on the ballot, and a character may take it.
4. party_sync applies the winner as the party's choice (character ``party``, action_id
   ``vote:<vote_id>``, payload ``{option, vote_id}``), deduplicated by action_id like any action;
   the vote is then ``done``. If that choice keeps the party in the scene, a new round is voted
   (``<vote_id>.r2``, …). A party choice naming another vote of this run (an earlier scene's) is
   refused: it no longer applies.
5. A vote never blocks the game: once the server time of a character's choice is more than
   ``VOTE_GRACE_S`` (5 minutes) past the vote's deadline without the party's choice having come
   (party_sync forgot the vote and no restate came, rule 6), characters choose again. Not
   sooner: party_sync keeps a decision through an engine outage, and delivers it once the
   engine is back.
6. When party_sync lost the party's state (``engine.handle_restate``), the vote it ran died with
   it: :func:`replan` asks for the same vote again (same id, ballot and timeout), with the
   re-stated scene it is about.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from party_sync.engine import EngineRejected, EventPublisher
from party_sync.protocol.errors import VoteConflict

from campaign_engine.actions import PARTY_ACTOR, Choice
from campaign_engine.campaign import MAX_VOTE_OPTIONS, Scene
from campaign_engine.game import Game
from campaign_engine.state import OutboxEvent, RunState, VoteState

log = logging.getLogger("campaign_engine")

#: The outbox entry that starts a vote (engine-internal: it is never published as an event).
VOTE_START: Final = "vote.start"
#: How long past a vote's deadline its result may still be waited for before characters choose.
#: Longer than an engine outage: party_sync keeps a finished vote's decision until it reached
#: the engine, and a member's choice sent as the engine came back (through another gateway
#: node, say) overturned the vote's decision with 10 s here (scale-out probe). A vote party_sync
#: forgot with the party's state is asked for again at once (the restate, rule 6); this is the
#: way out when no restate came.
VOTE_GRACE_S: Final = 300.0
#: party_sync names the vote's action ``vote:<vote_id>`` and cuts action ids at 64 characters.
MAX_VOTE_ID: Final = 64 - len("vote:")
BLOCKING: Final = ("requested", "open")
REFUSAL: Final = "The party is voting on this — cast your vote."
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")
_PREFIX = 40  # the run's part of a vote id; the rest is ".s<scene_number>[.r<round>]"


def run_prefix(run_id: str) -> str:
    """The run's part of its vote ids: the run id itself if it is a short, clean id, otherwise
    a clean cut of it plus a digest (two runs never share a prefix)."""
    clean = _UNSAFE.sub("-", run_id)
    if clean == run_id and 0 < len(run_id) <= _PREFIX:
        return run_id
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:12]
    return f"{clean[: _PREFIX - 13]}.{digest}"


def vote_id_for(run_id: str, scene_number: int, round: int = 1) -> str:
    """The vote of a scene visit (and round): the same every time it is asked for."""
    suffix = f".s{scene_number}" + (f".r{round}" if round > 1 else "")
    return run_prefix(run_id)[: MAX_VOTE_ID - len(suffix)] + suffix


def is_run_vote(run_id: str, vote_id: str) -> bool:
    """Whether ``vote_id`` is one this engine makes for the run (of any visit or round)."""
    return re.fullmatch(re.escape(run_prefix(run_id)) + r"\.s\d+(\.r\d+)?", vote_id) is not None


def question_for(scene: Scene) -> str:
    rule = scene.vote
    return (rule.question if rule and rule.question else None) or (
        f"{scene.title}: what does the party do?"[:500]
    )


def plan(
    game: Game, state: RunState, *, requested_at: str | None, timeout_s: float | None
) -> tuple[str, dict[str, Any]] | None:
    """If the party has just come to decide (a vote scene without a vote for this visit, or whose
    last round kept the party in it), record the vote in ``state`` and return the ``vote.start``
    outbox entry. ``timeout_s`` (the engine's setting) overrides the campaign's."""
    if state.status != "in_progress" or state.in_combat:
        return None
    scene = game.scene(state)
    if scene.vote is None:
        return None
    current, round_ = state.vote, 1
    if current is not None and current.scene_number == state.scene_number:
        if current.status != "done":
            return None
        round_ = current.round + 1
    options = game.open_options(state)[:MAX_VOTE_OPTIONS]
    if len(options) < 2:  # nothing to vote on: the characters choose
        return None
    ids = [o.id for o in options]
    timeout = timeout_s or float(scene.vote.timeout_s or game.campaign.vote_timeout_s)
    vote_id = vote_id_for(state.run_id, state.scene_number, round_)
    state.vote = VoteState(vote_id, state.scene_number, round_, ids, timeout, "requested")
    state.vote.requested_at = requested_at
    return VOTE_START, _request(scene, state.vote)


def replan(
    game: Game, state: RunState, *, timeout_s: float | None
) -> tuple[str, dict[str, Any]] | None:
    """After party_sync lost the party's state (a re-statement, ``engine.handle_restate``): the
    ``vote.start`` entry that asks for the party's vote again, or None if it wants none.

    A vote of the current visit still ``requested`` or ``open`` died with party_sync's state, and
    its result will never come: it is asked for again, *the same vote* (same id, same ballot, same
    timeout), so a second re-statement (delivery is at least once) gets ``VoteConflict`` instead
    of a second vote, and whichever of them ends, its result is the one ``vote:<vote_id>`` action.
    Otherwise it is what :func:`plan` would do after any action (a new vote only where an action
    would have started one; an ``off`` vote stays off: the characters choose).
    """
    if state.status != "in_progress" or state.in_combat:
        return None
    vote, scene = state.vote, game.scene(state)
    if (
        scene.vote is not None
        and vote is not None
        and vote.scene_number == state.scene_number
        and vote.status in BLOCKING
    ):
        vote.status = "requested"
        return VOTE_START, _request(scene, vote)
    return plan(game, state, requested_at=None, timeout_s=timeout_s)


def _request(scene: Scene, vote: VoteState) -> dict[str, Any]:
    """The ``vote.start`` payload (what ``start`` asks party_sync for) of ``vote`` in ``scene``."""
    assert scene.vote is not None
    labels = {o.id: o.label for o in scene.options}
    request: dict[str, Any] = {
        "vote_id": vote.vote_id,
        "question": question_for(scene),
        "options": [{"id": i, "label": labels[i]} for i in vote.options if i in labels],
        "timeout_s": vote.timeout_s,
        "tie_rule": "first_listed",
    }
    if scene.vote.default_option in vote.options:
        request.update(tie_rule="default_option", default_option=scene.vote.default_option)
    return request


def check_choice(state: RunState, actor_id: str, choice: Choice, at: str | None) -> None:
    """Refuse a choice the party's vote settles (``at``: the server time of the action)."""
    vote = state.vote
    current = vote if vote is not None and vote.scene_number == state.scene_number else None
    if actor_id == PARTY_ACTOR:
        if choice.vote_id is None:
            return
        if current is not None and choice.vote_id == current.vote_id:
            if current.status == "done":
                raise EngineRejected(f"The party has already decided vote {choice.vote_id}.")
            return
        if is_run_vote(state.run_id, choice.vote_id):
            raise EngineRejected(
                f"Vote {choice.vote_id} no longer applies: the party has moved on since."
            )
        return  # a vote someone else started: the party's choice like any other
    if (
        current is not None
        and current.status in BLOCKING
        and choice.option in current.options
        and not lapsed(current, at)
    ):
        raise EngineRejected(f"{REFUSAL} (vote {current.vote_id})")


def settle(state: RunState, choice: Choice) -> None:
    """After the party's choice was applied: its vote is decided."""
    if state.vote is not None and choice.vote_id == state.vote.vote_id:
        state.vote.status = "done"


def lapsed(vote: VoteState, at: str | None) -> bool:
    """Whether ``at`` is more than ``VOTE_GRACE_S`` past the vote's deadline (if it knows one:
    party_sync's, or else requested_at + timeout)."""
    now, deadline = _instant(at), _instant(vote.deadline)
    if deadline is None and (asked := _instant(vote.requested_at)) is not None:
        deadline = asked + timedelta(seconds=vote.timeout_s)
    if now is None or deadline is None:
        return False
    return now > deadline + timedelta(seconds=VOTE_GRACE_S)


def _instant(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def start(
    publisher: EventPublisher, state: RunState, party_id: str, entry: OutboxEvent
) -> None:
    """Ask party_sync for the vote of a ``vote.start`` entry. Never raises: a vote that cannot
    be started leaves the choice to the characters (``off``), because the game must go on."""
    request, vote = entry.payload, state.vote
    extra = {"trace_id": entry.trace_id}
    if vote is None or vote.vote_id != request["vote_id"] or vote.status in ("off", "done"):
        log.info("not starting vote %s: it was settled meanwhile", request["vote_id"], extra=extra)
        return
    start_vote = getattr(publisher, "start_vote", None)
    if start_vote is None:
        log.warning(
            "the publisher cannot start votes: characters choose in scene %d",
            vote.scene_number,
            extra=extra,
        )
        vote.status = "off"
        return
    try:
        started = await start_vote(
            party_id,
            request["question"],
            request["options"],
            request["timeout_s"],
            vote_id=vote.vote_id,
            tie_rule=request["tie_rule"],
            default_option=request.get("default_option"),
            campaign_run_id=state.run_id,
            trace_id=entry.trace_id,
        )
    except VoteConflict as exc:
        log.info("vote %s: a vote is open already (%s)", vote.vote_id, exc, extra=extra)
        # Open, unless there is no time to lapse from (then no lock): a deadline is known when
        # this vote was started before (a second re-statement of a vote party_sync has open).
        vote.status = "open" if vote.requested_at or vote.deadline else "off"
        return
    except Exception:
        log.warning(
            "vote %s could not be started: characters choose",
            vote.vote_id,
            exc_info=True,
            extra=extra,
        )
        vote.status = "off"
        return
    deadline = started.get("deadline") if isinstance(started, Mapping) else None
    vote.status, vote.deadline = "open", deadline if isinstance(deadline, str) else None
    log.info("party vote %s started", vote.vote_id, extra=extra)


def abandon(state: RunState) -> None:
    """The outbox is being dropped: a vote it would have started will not run."""
    vote, leftover = state.vote, any(e.type == VOTE_START for e in state.outbox)
    if vote is not None and vote.status == "requested" and leftover:
        log.warning("vote %s was never started: characters choose", vote.vote_id)
        vote.status = "off"
