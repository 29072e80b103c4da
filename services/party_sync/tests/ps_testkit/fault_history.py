"""The fault tier's history check: pure functions over everything the clients saw (no I/O).

A client's history is a list of ``Frame``s in the order they happened: ``open`` (a connection was
made), ``sent`` (a message went out on it), ``recv`` (a message came in on it), ``close``. The
checks (docs/redis.md, "Faults, measured"):

- every action a client sent got **exactly one** final answer at that client: its
  ``action.result`` (seen again with the same epoch and seq on a resend: the same answer) or a
  ``system.error`` carrying ``in_reply_to.action_id`` (any code but ``action_in_flight``, which
  says "still running, keep waiting"); none is *lost*, none gets two different answers;
- every action was applied **at most once** (the engine's chronicle), and every ``action.result``
  anyone saw is backed by a decision in the chronicle;
- nobody was told "failed" (a final error) about an action the chronicle shows applied;
- on every connection, after its ``system.hello``, events come at exactly ``seq + 1`` (a resumed
  hello continues the client's own last seq of that epoch; a non-resumed hello is a fresh
  snapshot, a resync); a repeated ``action.result`` (the original answer to a resend) is the
  only event allowed at an old seq;
- across all clients, one ``(epoch, seq)`` is one message (a repeat is not that event: it
  carries its original seq or, docs/protocol.md, the connection's last seq when its stream has
  not passed the original or the answer is of another epoch);
- at the end every online client's state is what a fresh ``system.hello`` shows, and that hello
  has a scene with options (``converged``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FrameKind = Literal["open", "sent", "recv", "close"]

#: Not a final answer: the first attempt is still running, its answer will come.
IN_FLIGHT = "action_in_flight"
#: Errors that, about an action, say its outcome is unknown (docs/protocol.md: "not final ... send
#: the same action_id again to learn it"): never a false failure, and not a second answer beside
#: the one that came (a node that accepted an action and could not append it to its stream says
#: so, then appends it again in the background: the engine may well apply it).
OUTCOME_UNKNOWN = frozenset({"backend_unavailable"})


@dataclass(frozen=True, slots=True)
class Frame:
    """One thing a client did or saw: ``at`` (seconds, any clock shared by one run), the
    connection number ``conn`` (0, 1, ... per client), and the decoded ``message`` (sent/recv),
    the ``url`` (open) or the close ``code`` (close)."""

    at: float
    conn: int
    kind: FrameKind
    message: Mapping[str, Any] | None = None
    url: str = ""
    code: int | None = None


@dataclass(slots=True)
class ClientHistory:
    character_id: str
    frames: list[Frame] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Answer:
    """A final answer as its sender saw it: ``result`` (with its epoch and seq) or ``error``."""

    kind: Literal["result", "error"]
    at: float
    code: str = ""  # the error code
    epoch: str = ""
    seq: int = 0

    @property
    def key(self) -> tuple[str, str, int]:
        """Answers with one key are one answer seen twice (a resend's repeat)."""
        return (self.kind, self.code or self.epoch, self.seq)


@dataclass(frozen=True, slots=True)
class Seen:
    """A received party event with the epoch of the connection it came on. ``repeat``: an
    ``action.result`` at or below the connection's last seq (a resend's answer, not an event of
    the stream)."""

    character_id: str
    conn: int
    at: float
    epoch: str
    message: Mapping[str, Any]
    repeat: bool = False


def _action_id(message: Mapping[str, Any] | None) -> str | None:
    if not message:
        return None
    payload = message.get("payload") or {}
    if message.get("type") in ("action.request", "action.result"):
        value = payload.get("action_id")
    elif message.get("type") == "system.error":
        value = (payload.get("in_reply_to") or {}).get("action_id")
    else:
        value = None
    return value if isinstance(value, str) else None


def sent_actions(history: ClientHistory) -> dict[str, float]:
    """Every action_id this client put on the wire, with when it first went out."""
    first: dict[str, float] = {}
    for frame in history.frames:
        if frame.kind == "sent" and frame.message and frame.message.get("type") == "action.request":
            action_id = _action_id(frame.message)
            if action_id is not None and action_id not in first:
                first[action_id] = frame.at
    return first


def events_with_epochs(history: ClientHistory) -> list[Seen]:
    """The client's received events (messages with a seq), each with its connection's epoch."""
    epochs: dict[int, str] = {}
    last: dict[int, int] = {}  # per connection, after its hello
    seen: list[Seen] = []
    for frame in history.frames:
        if frame.kind != "recv" or frame.message is None:
            continue
        message = frame.message
        if message.get("type") == "system.hello":
            p = message["payload"]
            epochs[frame.conn] = str(p["epoch"])
            last[frame.conn] = int(p["resumed_from"] if p["resumed"] else p["seq"])
        elif "seq" in message:
            epoch = epochs.get(frame.conn, "")
            seq = int(message["seq"])
            had = last.get(frame.conn)
            repeat = message.get("type") == "action.result" and had is not None and seq <= had
            if not repeat:
                last[frame.conn] = seq if had is None else max(had, seq)
            seen.append(Seen(history.character_id, frame.conn, frame.at, epoch, message, repeat))
    return seen


def _without_seq(message: Mapping[str, Any]) -> str:
    """A message's identity apart from its seq (a repeat may carry another one)."""
    return repr(sorted((k, repr(v)) for k, v in message.items() if k != "seq"))


def answers(history: ClientHistory) -> dict[str, list[Answer]]:
    """The final answers each of this client's own actions got *at this client*. A repeat that
    is, but for its seq, a result this client also got in its stream is that answer (sent with
    the connection's last seq because the stream had not passed it: it followed in order)."""
    mine = sent_actions(history)
    found: dict[str, list[Answer]] = defaultdict(list)
    items = events_with_epochs(history)
    in_stream = {
        _without_seq(item.message): (item.epoch, int(item.message["seq"]))
        for item in items
        if item.message.get("type") == "action.result" and not item.repeat
    }
    for item in items:
        action_id = _action_id(item.message)
        if item.message.get("type") == "action.result" and action_id in mine:
            epoch, seq = item.epoch, int(item.message["seq"])
            if item.repeat:
                epoch, seq = in_stream.get(_without_seq(item.message), (epoch, seq))
            found[action_id].append(Answer("result", item.at, epoch=epoch, seq=seq))
    for frame in history.frames:
        if frame.kind == "recv" and frame.message and frame.message.get("type") == "system.error":
            action_id = _action_id(frame.message)
            code = str(frame.message["payload"]["code"])
            if action_id in mine and code != IN_FLIGHT:
                found[action_id].append(Answer("error", frame.at, code=code))
    for listed in found.values():
        listed.sort(key=lambda a: a.at)
    return dict(found)


def distinct(listed: Iterable[Answer]) -> list[Answer]:
    """One answer per key, the first time it was seen."""
    out: dict[tuple[str, str, int], Answer] = {}
    for answer in listed:
        out.setdefault(answer.key, answer)
    return list(out.values())


def check_seqs(history: ClientHistory) -> list[str]:
    """Per connection: events at exactly last + 1 after the hello; resumes continue the client's
    own last seq of that epoch; only a repeated ``action.result`` may come at an old seq."""
    problems: list[str] = []
    name = history.character_id
    last_in_epoch: dict[str, int] = {}  # what the client had of each epoch, across connections
    last: dict[int, int] = {}  # per connection, after its hello
    epochs: dict[int, str] = {}
    for frame in history.frames:
        if frame.kind != "recv" or frame.message is None:
            continue
        message = frame.message
        if message.get("type") == "system.hello":
            p = message["payload"]
            epoch = str(p["epoch"])
            if p["resumed"]:
                had = last_in_epoch.get(epoch)
                if had is None or had != p["resumed_from"]:
                    problems.append(
                        f"{name} conn {frame.conn}: resumed from {p['resumed_from']} in epoch "
                        f"{epoch}, but the client had seq {had} of it"
                    )
                last[frame.conn] = int(p["resumed_from"])
            else:
                last[frame.conn] = int(p["seq"])
            epochs[frame.conn] = epoch
            last_in_epoch[epoch] = last[frame.conn]
            continue
        if "seq" not in message:
            continue
        seq = int(message["seq"])
        if frame.conn not in last:
            problems.append(f"{name} conn {frame.conn}: {message.get('type')} {seq} before hello")
            continue
        expected = last[frame.conn] + 1
        if seq == expected:
            last[frame.conn] = seq
            last_in_epoch[epochs[frame.conn]] = seq
        elif seq < expected and message.get("type") == "action.result":
            continue  # the original answer to a resent action_id
        elif seq < expected:
            problems.append(
                f"{name} conn {frame.conn}: duplicate {message.get('type')} at seq {seq} "
                f"(expected {expected})"
            )
        else:
            problems.append(
                f"{name} conn {frame.conn}: gap: expected seq {expected}, got {seq} "
                f"({message.get('type')}) in epoch {epochs[frame.conn]}"
            )
            last[frame.conn] = seq  # report each gap once
            last_in_epoch[epochs[frame.conn]] = seq
    return problems


def check_consistency(histories: Sequence[ClientHistory]) -> list[str]:
    """One ``(epoch, seq)`` is one message, whoever received it and however often. A repeat is
    not the stream's event at its seq (it may carry the connection's last seq, or be of another
    epoch): ``answers`` checks it instead."""
    first: dict[tuple[str, int], Seen] = {}
    problems: list[str] = []
    for history in histories:
        for item in events_with_epochs(history):
            if item.repeat:
                continue
            key = (item.epoch, int(item.message["seq"]))
            earlier = first.setdefault(key, item)
            if earlier.message != item.message:
                problems.append(
                    f"epoch {key[0]} seq {key[1]}: {earlier.character_id} saw "
                    f"{_shown(earlier.message)} but {item.character_id} saw {_shown(item.message)}"
                )
    return problems


@dataclass(slots=True)
class Verdict:
    """The figures of one run and every broken guarantee, in words."""

    actions_sent: int = 0
    answered: int = 0  # got at least one final answer at the sender
    answered_once: int = 0  # exactly one distinct final answer
    results: int = 0  # answered with action.result
    refusals: dict[str, int] = field(default_factory=dict)  # final errors by code
    applied: int = 0  # sent actions the chronicle shows applied
    applied_once: int = 0
    lost: int = 0  # sent, never answered
    lost_applied: int = 0  # of those, applied by the engine anyway
    false_failures: int = 0  # told "failed", yet applied
    problems: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "actions_sent": self.actions_sent,
            "answered": self.answered,
            "answered_once": self.answered_once,
            "results": self.results,
            "refusals": dict(sorted(self.refusals.items())),
            "applied": self.applied,
            "applied_once": self.applied_once,
            "lost": self.lost,
            "lost_applied": self.lost_applied,
            "false_failures": self.false_failures,
        }


def check_history(
    histories: Sequence[ClientHistory], chronicle_action_ids: Sequence[str]
) -> Verdict:
    """Every check but convergence, over every client's history and the engine's chronicle
    (the ``action_id`` of each decision, in order)."""
    verdict = Verdict()
    applied = Counter(chronicle_action_ids)
    seen_results: set[str] = set()
    for history in histories:
        for item in events_with_epochs(history):
            if item.message.get("type") == "action.result":
                action_id = _action_id(item.message)
                if action_id is not None:
                    seen_results.add(action_id)
    for history in histories:
        name = history.character_id
        got = answers(history)
        for action_id in sent_actions(history):
            verdict.actions_sent += 1
            times = applied.get(action_id, 0)
            if times:
                verdict.applied += 1
            if times == 1:
                verdict.applied_once += 1
            if times > 1:
                verdict.problems.append(f"{name}: {action_id} applied {times} times")
            final = distinct(got.get(action_id, []))
            known = [a for a in final if a.code not in OUTCOME_UNKNOWN]
            if known:
                final = known
            if not final:
                verdict.lost += 1
                verdict.lost_applied += bool(times)
                verdict.problems.append(
                    f"{name}: {action_id} never answered"
                    + (" (the chronicle shows it applied)" if times else "")
                )
                continue
            verdict.answered += 1
            if len(final) == 1:
                verdict.answered_once += 1
            else:
                shown = ", ".join(a.code or f"result@{a.epoch}:{a.seq}" for a in final)
                verdict.problems.append(f"{name}: {action_id} answered {len(final)} ways: {shown}")
            first = final[0]
            if first.kind == "result":
                verdict.results += 1
            else:
                verdict.refusals[first.code] = verdict.refusals.get(first.code, 0) + 1
            for answer in final:
                if answer.kind == "error" and times and answer.code not in OUTCOME_UNKNOWN:
                    verdict.false_failures += 1
                    verdict.problems.append(
                        f"{name}: told {answer.code} about {action_id}, which the chronicle "
                        "shows applied"
                    )
        verdict.problems.extend(check_seqs(history))
    for action_id in sorted(seen_results - applied.keys()):
        verdict.problems.append(f"action.result for {action_id}, which the chronicle lacks")
    verdict.problems.extend(check_consistency(histories))
    return verdict


def recovery_times(histories: Sequence[ClientHistory], fault_end: float) -> dict[str, float | None]:
    """Per client: seconds from ``fault_end`` to its first own ``action.result`` received after
    it (None: none came)."""
    out: dict[str, float | None] = {}
    for history in histories:
        firsts = [
            a.at
            for listed in answers(history).values()
            for a in listed
            if a.kind == "result" and a.at >= fault_end
        ]
        out[history.character_id] = round(min(firsts) - fault_end, 3) if firsts else None
    return out


def converged(view: Mapping[str, Any], hello: Mapping[str, Any]) -> list[str]:
    """How a client's state (``view``: the fields of a ``system.hello`` payload that a client
    folds: epoch, seq, status, run_status, members, scene, combat, party_state, vote) differs
    from a fresh hello's payload; [] when it is the same. ``vote.your_vote`` is per character
    and not compared."""
    diffs: list[str] = []
    for key in ("epoch", "seq", "status", "run_status", "scene", "combat", "party_state"):
        if view.get(key) != hello.get(key):
            diffs.append(f"{key}: {view.get(key)!s:.100} != hello's {hello.get(key)!s:.100}")
    if _members(view.get("members")) != _members(hello.get("members")):
        diffs.append(f"members: {view.get('members')} != hello's {hello.get('members')}")
    if _vote(view.get("vote")) != _vote(hello.get("vote")):
        diffs.append(f"vote: {view.get('vote')} != hello's {hello.get('vote')}")
    return diffs


def playable(hello: Mapping[str, Any], online: Iterable[str]) -> list[str]:
    """What keeps a fresh ``system.hello`` from showing a playable party: no scene, no options,
    ``run_status: pending``, or one of the ``online`` characters (connections that never closed)
    shown offline."""
    problems: list[str] = []
    scene = hello.get("scene")
    if not scene:
        problems.append("the fresh hello has no scene")
    elif not scene.get("options"):
        problems.append(f"the fresh hello's scene {scene.get('scene_id')} has no options")
    if hello.get("run_status") == "pending":
        problems.append("the fresh hello says run_status pending")
    shown = {m["character_id"]: m["online"] for m in hello.get("members") or ()}
    for character in online:
        if not shown.get(character, False):
            problems.append(f"{character} is connected but the fresh hello shows them offline")
    return problems


def _shown(message: Mapping[str, Any]) -> str:
    return f"{message.get('type')} {dict(message.get('payload') or {})!s:.120}"


def _members(members: Any) -> list[tuple[str, str, bool]]:
    return sorted(
        (str(m["character_id"]), str(m["display_name"]), bool(m["online"])) for m in members or ()
    )


def _vote(vote: Any) -> dict[str, Any] | None:
    if not vote:
        return None
    return {k: v for k, v in dict(vote).items() if k != "your_vote"}


def connection_stats(history: ClientHistory) -> dict[str, int]:
    """How a client's connections went: made, hellos that resumed, fresh snapshots, and closes by
    code."""
    stats: dict[str, int] = {"connections": 0, "resumed": 0, "snapshots": 0}
    for frame in history.frames:
        if frame.kind == "open":
            stats["connections"] += 1
        elif frame.kind == "recv" and frame.message and frame.message.get("type") == "system.hello":
            stats["resumed" if frame.message["payload"]["resumed"] else "snapshots"] += 1
        elif frame.kind == "close":
            key = f"closed_{frame.code}"
            stats[key] = stats.get(key, 0) + 1
    return stats


def log_errors(text: str, limit: int = 5) -> dict[str, Any]:
    """What a process's log says went wrong: ERROR/CRITICAL lines and tracebacks, counted, and
    the first few distinct ERROR messages (timestamps cut off). Evidence for the report, not a
    check: a failure the players never noticed is still worth a look."""
    errors: list[str] = []
    tracebacks = 0
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            tracebacks += 1
        for level in (" ERROR ", " CRITICAL "):
            if level in line:
                errors.append(level.strip() + " " + line.split(level, 1)[1][:200])
    return {
        "errors": len(errors),
        "tracebacks": tracebacks,
        "first": list(dict.fromkeys(errors))[:limit],
    }
