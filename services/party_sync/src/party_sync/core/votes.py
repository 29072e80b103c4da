"""Party votes: the tally, the tie rule and the deadline, as pure data and functions.

Rules (docs/protocol.md, *Votes*):

- One open vote per party. Each member casts one ballot and may change it until the vote closes;
  the latest ballot counts.
- The vote finishes when every member who is online *at the time of a cast* has voted
  (``all_voted``), or at its deadline (``timeout``), exactly once.
- The winner is the option with the most ballots. A tie (including nobody voting) is broken by
  the vote's tie rule: ``first_listed`` → the tied option listed first; ``default_option`` → the
  named default option if it is among the tied ones, else the tied option listed first.
- The result is applied to the engine as a ``choice`` action made on the party's behalf
  (``character_id`` ``party``) with the id ``vote:<vote_id>``, so it is idempotent like any action.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from party_sync.protocol.errors import PartySyncError
from party_sync.protocol.types import PARTY_ACTOR

_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TIE_RULES: Final = ("first_listed", "default_option")
MIN_OPTIONS, MAX_OPTIONS = 2, 10
MAX_TIMEOUT_S: Final = 24 * 3600.0


class CastRefusal(Enum):
    UNKNOWN = "vote_unknown"
    CLOSED = "vote_closed"
    BAD_OPTION = "vote_bad_option"


class SpecError(PartySyncError, ValueError):
    """A vote that cannot be started as asked (the API answers 422)."""


@dataclass(frozen=True, slots=True)
class VoteSpec:
    """What an engine asks for."""

    vote_id: str
    question: str
    options: tuple[tuple[str, str], ...]  # (id, label), in display order
    timeout_s: float
    tie_rule: str = "first_listed"
    default_option: str | None = None

    def check(self) -> None:
        ids = [o[0] for o in self.options]
        if not MIN_OPTIONS <= len(ids) <= MAX_OPTIONS:
            raise SpecError(f"a vote needs {MIN_OPTIONS}..{MAX_OPTIONS} options")
        if len(set(ids)) != len(ids):
            raise SpecError("option ids must be unique")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise SpecError(f"timeout_s must be in (0, {MAX_TIMEOUT_S:.0f}]")
        if self.tie_rule not in TIE_RULES:
            raise SpecError(f"tie_rule must be one of {TIE_RULES}")
        if self.tie_rule == "default_option" and self.default_option not in ids:
            raise SpecError("tie_rule default_option needs a default_option among the options")
        if self.tie_rule != "default_option" and self.default_option is not None:
            raise SpecError("default_option is only used with tie_rule default_option")


@dataclass(slots=True)
class Vote:
    """An open (or just finished) vote and its ballots."""

    spec: VoteSpec
    started_at: float
    deadline: float
    trace_id: str
    campaign_run_id: str = ""
    ballots: dict[str, str] = field(default_factory=dict)  # character_id → option id
    finished: bool = False

    @property
    def vote_id(self) -> str:
        return self.spec.vote_id

    @property
    def option_ids(self) -> list[str]:
        return [o[0] for o in self.spec.options]


@dataclass(frozen=True, slots=True)
class Outcome:
    winner: str
    tallies: dict[str, int]
    reason: str  # all_voted | timeout
    tie_broken: bool


def open_vote(spec: VoteSpec, now: float, trace_id: str, campaign_run_id: str = "") -> Vote:
    spec.check()
    return Vote(spec, now, now + spec.timeout_s, trace_id, campaign_run_id)


def start_conflict(current: Vote | None, spec: VoteSpec) -> str | None:
    """Why ``spec`` may not open now (``VoteConflict``'s detail), or None: the party's vote is
    still open, or ``spec`` reuses the id of the vote it finished (``vote:<vote_id>`` names one
    decision, applied once). The open vote is named, so an engine that sends its start again
    (its answer was lost) can tell that its own vote is the one open (ops probe)."""
    if current is not None and not current.finished:
        if current.vote_id == spec.vote_id:
            return f"vote {spec.vote_id} is open already (this start, or one with its vote_id)"
        return f"the party already has an open vote: {current.vote_id}"
    if current is not None and current.vote_id == spec.vote_id:
        return f"vote {spec.vote_id} already ran"
    return None


def tallies(vote: Vote) -> dict[str, int]:
    counts = dict.fromkeys(vote.option_ids, 0)
    for option in vote.ballots.values():
        counts[option] += 1
    return counts


def cast(
    vote: Vote | None, vote_id: str, character_id: str, option: str, now: float
) -> CastRefusal | None:
    """Record a ballot; return why it was refused, or None. A refused cast changes nothing."""
    if vote is None or vote.vote_id != vote_id:
        return CastRefusal.UNKNOWN
    if vote.finished or now >= vote.deadline:
        return CastRefusal.CLOSED
    if option not in vote.option_ids:
        return CastRefusal.BAD_OPTION
    vote.ballots[character_id] = option
    return None


def due(vote: Vote, online: Iterable[str], now: float) -> str | None:
    """Why the vote must finish now (``timeout`` / ``all_voted``), or None."""
    if vote.finished:
        return None
    if now >= vote.deadline:
        return "timeout"
    present = set(online)
    if present and present <= set(vote.ballots):
        return "all_voted"
    return None


def decide(vote: Vote, reason: str) -> Outcome:
    """The winner under the tie rule. Marks the vote finished (exactly once by the caller)."""
    counts = tallies(vote)
    best = max(counts.values())
    tied = [o for o in vote.option_ids if counts[o] == best]
    winner = tied[0]
    if len(tied) > 1 and vote.spec.tie_rule == "default_option":
        default = vote.spec.default_option
        if default in tied:
            winner = default
    vote.finished = True
    return Outcome(winner, counts, reason, tie_broken=len(tied) > 1)


#: The longest vote id: its action id ``vote:<vote_id>`` must be a whole id (64 characters).
MAX_VOTE_ID = 64 - len("vote:")


def action_id_for(vote_id: str) -> str:
    """The action a finished vote is applied as (``spec_from_json`` keeps vote ids short
    enough: two votes never share one)."""
    return f"vote:{vote_id}"


def started_payload(vote: Vote, timestamp: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "vote_id": vote.vote_id,
        "question": vote.spec.question,
        "options": [{"id": i, "label": label} for i, label in vote.spec.options],
        "timeout_s": vote.spec.timeout_s,
        "deadline": timestamp,
        "tie_rule": vote.spec.tie_rule,
    }
    if vote.spec.default_option is not None:
        payload["default_option"] = vote.spec.default_option
    return payload


def update_payload(vote: Vote, online: Collection[str]) -> dict[str, Any]:
    """``vote.update``: ``eligible`` counts the members online and those who voted (a ballot
    stands when its voter goes offline), each once: "2 of 3" while an online member has not
    voted, never "2 of 2"."""
    return {
        "vote_id": vote.vote_id,
        "tallies": tallies(vote),
        "voted": len(vote.ballots),
        "eligible": len(vote.ballots.keys() | set(online)),
    }


def recount(vote: Vote, online: Collection[str], told: int | None) -> dict[str, Any] | None:
    """A ``vote.update`` when the members online changed since the party was last ``told`` an
    ``eligible`` count (a member left, or went offline, without voting: UX probe, "1/3 voted"
    with two members left; or one came online); None when that count stands, or none was told."""
    update = update_payload(vote, online)
    return None if told is None or told == update["eligible"] else update


def finished_payload(vote: Vote, outcome: Outcome) -> dict[str, Any]:
    return {
        "vote_id": vote.vote_id,
        "winner": outcome.winner,
        "tallies": outcome.tallies,
        "reason": outcome.reason,
        "tie_broken": outcome.tie_broken,
        "applied": {
            "action_id": action_id_for(vote.vote_id),
            "action_type": "choice",
            "option": outcome.winner,
            "character_id": PARTY_ACTOR,
        },
    }


def _strings(*values: object, nullable: bool = False) -> bool:
    return all(isinstance(v, str) or (nullable and v is None) for v in values)


def spec_from_json(body: Mapping[str, Any], vote_id: object) -> VoteSpec:
    """Build a spec from an API/engine request body; raises SpecError with a clear reason."""
    timeout = body.get("timeout_s")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):  # not "10", not true
        raise SpecError("bad vote request: timeout_s must be a number of seconds")
    if not isinstance(vote_id, str):
        raise SpecError("bad vote request: vote_id must be a string")
    missing = [k for k in ("question", "options") if k not in body]
    if missing:
        raise SpecError(f"bad vote request: missing fields: {missing}")
    options = body["options"]
    if not isinstance(options, list) or any(
        not isinstance(o, Mapping) or not _strings(o.get("id"), o.get("label")) for o in options
    ):
        raise SpecError("bad vote request: options must be a list of {id, label} strings")
    extra = sorted({str(key) for o in options for key in o} - {"id", "label"})
    if extra:  # (vote.started's option holds id and label only: a field would be lost unseen)
        raise SpecError(f"bad vote request: an option holds only id and label, not {extra[:8]}")
    tie_rule, default = body.get("tie_rule", "first_listed"), body.get("default_option")
    if not _strings(body["question"], tie_rule) or not _strings(default, nullable=True):
        raise SpecError("bad vote request: question, tie_rule and default_option must be strings")
    spec = VoteSpec(
        vote_id=vote_id,
        question=body["question"],
        options=tuple((o["id"], o["label"]) for o in options),
        timeout_s=float(timeout),
        tie_rule=tie_rule,
        default_option=default,
    )
    if not _ID.fullmatch(vote_id) or any(not _ID.fullmatch(o[0]) for o in spec.options):
        raise SpecError("vote_id and option ids must match [A-Za-z0-9._:-]{1,64}")
    if len(vote_id) > MAX_VOTE_ID:  # "vote:<vote_id>" must stay a whole id: never cut, never shared
        raise SpecError(f"vote_id must be at most {MAX_VOTE_ID} characters")
    if not 1 <= len(spec.question) <= 500 or any(not 1 <= len(o[1]) <= 200 for o in spec.options):
        raise SpecError("question must be 1..500 characters and labels 1..200")
    spec.check()
    return spec
