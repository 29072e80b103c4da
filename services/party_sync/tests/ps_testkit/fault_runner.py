"""One fault scenario from start to verdict, and its record in ``artifacts/faults/``.

``run_scenario``: start the system, connect the players (each to its own node first), wait for a
scene, play until every player has been answered twice, inject the fault, wait until every player
has been answered again after the fault's end (the recovery), play a little more, stop the
players, wait for the last answers, then check that every client converged to a fresh
``system.hello`` with a scene and its options. Then stop every process, read the engine's
chronicle and run the history check (``fault_history``). Every wait is on a condition with a
bound; a bound that runs out is recorded as a problem and the scenario goes on to its checks, so
a failing run still reports everything it saw.

The record: one JSON line per run appended to ``artifacts/faults/results.jsonl`` (figures: actions
sent, answers, applied once, lost, time to recover), and in ``artifacts/faults/<scenario>/`` the
report, every client's frames and every process's log, as evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ps_testkit.fault_history import (
    ClientHistory,
    answers,
    check_history,
    connection_stats,
    converged,
    log_errors,
    playable,
    recovery_times,
    sent_actions,
)
from ps_testkit.fault_players import Player, state_view
from ps_testkit.faults import ACTION_TIMEOUT, PARTY, RUN, EmbeddedSystem, RedisSystem

CHARACTERS = ("aria", "borin", "cora", "dara")
#: Answered actions per player before the fault, and after the recovery (the game goes on).
PLAY_BEFORE = 5
PLAY_AFTER = 5
#: Bounds of the phases (seconds).
START_LIMIT = 20.0  # every player has a scene
WARM_UP_LIMIT = 20.0  # every player answered twice
RECOVERY_LIMIT = 20.0  # every player answered again after the fault's end
AFTER_LIMIT = 10.0  # every player answered twice more
DRAIN_LIMIT = ACTION_TIMEOUT + 4.0  # the last answers
CONVERGE_LIMIT = 10.0


def artifacts_root() -> Path:
    configured = os.environ.get("PS_FAULTS_ARTIFACTS")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[4] / "artifacts" / "faults"


@dataclass(frozen=True, slots=True)
class FaultWindow:
    """When the fault began and ended (``time.monotonic()``), and what was done."""

    start: float
    end: float
    detail: dict[str, Any] = field(default_factory=dict)


#: Injects the fault (given the players, to time it) and says when it began and ended.
Inject = Callable[[Sequence[Player]], Awaitable[FaultWindow]]


@dataclass(slots=True)
class Report:
    scenario: str
    fault: str
    passed: bool = False
    figures: dict[str, Any] = field(default_factory=dict)
    scene_back_s: float | None = None  # quiet: the fault's end to every player seeing a scene
    recover_first_s: float | None = None
    recover_all_s: float | None = None
    recovery_by_client: dict[str, float | None] = field(default_factory=dict)
    fault_detail: dict[str, Any] = field(default_factory=dict)
    outcomes_by_client: dict[str, dict[str, int]] = field(default_factory=dict)
    connections_by_client: dict[str, dict[str, int]] = field(default_factory=dict)
    logs: dict[str, dict[str, Any]] = field(default_factory=dict)  # errors in process logs
    timeline: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def summary(self) -> str:
        f = self.figures
        head = (
            f"[{'PASS' if self.passed else 'FAIL'}] {self.scenario}: sent {f.get('actions_sent')}, "
            f"answered {f.get('answered')} (once {f.get('answered_once')}), results "
            f"{f.get('results')}, refusals {f.get('refusals')}, applied once "
            f"{f.get('applied_once')}/{f.get('applied')}, lost {f.get('lost')}, false failures "
            f"{f.get('false_failures')}, recover first {self.recover_first_s} s / all "
            f"{self.recover_all_s} s"
            + (f", scene back {self.scene_back_s} s" if self.scene_back_s is not None else "")
            + f", {self.duration_s:.1f} s"
        )
        for name, found in self.logs.items():
            head += f"\n  (log {name}: {found['errors']} ERROR, {found['tracebacks']} tracebacks)"
        shown = self.problems[:25]
        more = len(self.problems) - len(shown)
        lines = [head, *(f"  - {p}" for p in shown)]
        if more > 0:
            lines.append(f"  ... and {more} more (see the report)")
        return "\n".join(lines)


def _counts(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return dict(sorted(out.items()))


async def _until(
    condition: Callable[[], bool], limit: float, what: str, problems: list[str]
) -> bool:
    """Wait until ``condition()``; on timeout record ``what`` as a problem and return False."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() >= deadline:
            problems.append(f"not within {limit:.0f} s: {what}")
            return False
        await asyncio.sleep(0.05)  # polling the players' state, bounded
    return True


def _options(player: Player) -> bool:
    scene = player.client.state.scene
    return bool(scene and scene.get("options"))


def unanswered(players: Sequence[Player]) -> int:
    """Actions the players sent that have no final answer yet."""
    count = 0
    for p in players:
        got = answers(p.history)
        count += sum(1 for a in sent_actions(p.history) if not got.get(a))
    return count


async def _converge(
    system: RedisSystem | EmbeddedSystem, players: Sequence[Player], problems: list[str]
) -> dict[str, Any] | None:
    """Wait (bounded) until every player is connected and its state is a fresh hello's."""
    deadline = time.monotonic() + CONVERGE_LIMIT
    found: list[str] = []
    hello: dict[str, Any] | None = None
    while True:
        found = []
        try:
            hello = await system.fresh_hello(system.urls[0], players[0].character)
        except Exception as exc:  # no node answers: that is the finding
            found.append(f"no fresh system.hello: {type(exc).__name__}: {exc}")
        else:
            online = [p.character for p in players if p.client.connected]
            found += playable(hello, online)
            for p in players:
                if not p.client.connected:
                    found.append(f"{p.character} is not connected at the end")
                    continue
                found += [f"{p.character}: {d}" for d in converged(state_view(p.client), hello)]
        if not found or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)  # polling: events may still be on their way to the clients
    problems += [f"not converged: {d}" for d in found]
    return hello


async def run_scenario(
    scenario: str,
    fault: str,
    system: RedisSystem | EmbeddedSystem,
    inject: Inject,
    *,
    quiet: bool = False,
) -> Report:
    """Run one scenario on ``system`` (not started yet; closed at the end) and report it.

    ``quiet``: the players stop and every action is answered before the fault, and they start
    again only once each shows a scene with options in a new epoch (for faults that lose the
    party's short-lived state: the engine must re-state it, as nobody has anything to resend).
    """
    t0 = time.monotonic()
    report = Report(scenario, fault)
    problems = report.problems
    timeline = report.timeline
    players: list[Player] = []
    window: FaultWindow | None = None
    hello: dict[str, Any] | None = None
    try:
        await system.start()
        timeline["started"] = time.monotonic() - t0
        urls = system.urls
        for i, character in enumerate(CHARACTERS):
            mine = urls[i % len(urls) :] + urls[: i % len(urls)]
            players.append(Player(character, mine, party=PARTY, run=RUN))
        for p in players:
            await p.connect()
        await _until(
            lambda: all(p.client.state.scene for p in players),
            START_LIMIT,
            "every player sees a scene at the start",
            problems,
        )
        for p in players:
            p.start_playing()
        timeline["playing"] = time.monotonic() - t0
        await _until(
            lambda: all(len(p.successes_since(0.0)) >= PLAY_BEFORE for p in players),
            WARM_UP_LIMIT,
            f"every player answered {PLAY_BEFORE} times before the fault",
            problems,
        )
        epochs: dict[str, str] = {}
        if quiet:  # the players stop, and wait for nothing, before the fault
            await asyncio.gather(*(p.stop_playing() for p in players))
            await _until(
                lambda: unanswered(players) == 0,
                DRAIN_LIMIT,
                "every action answered before the fault (quiet)",
                problems,
            )
            epochs = {p.character: p.client.state.epoch for p in players}
        window = await inject(players)
        report.fault_detail = {
            **window.detail,
            "held_s": round(window.end - window.start, 3),
        }
        timeline["fault_start"] = window.start - t0
        timeline["fault_end"] = window.end - t0
        end = window.end
        if quiet:  # nobody acts: only the engine's re-statement can bring the scene back
            back = await _until(
                lambda: all(
                    p.client.state.epoch != epochs[p.character] and _options(p) for p in players
                ),
                RECOVERY_LIMIT,
                "every idle player shows a scene with options in the new epoch",
                problems,
            )
            if back:
                report.scene_back_s = round(time.monotonic() - end, 3)
            for p in players:
                p.start_playing()
        recovered = await _until(
            lambda: all(p.successes_since(end) for p in players),
            RECOVERY_LIMIT,
            "every player answered (action.result) again after the fault",
            problems,
        )
        timeline["recovered"] = time.monotonic() - t0
        if recovered:
            mark = time.monotonic()
            await _until(
                lambda: all(len(p.successes_since(mark)) >= PLAY_AFTER for p in players),
                AFTER_LIMIT,
                f"every player answered {PLAY_AFTER} times more after recovering",
                problems,
            )
        await asyncio.gather(*(p.stop_playing() for p in players))
        timeline["stopped"] = time.monotonic() - t0
        await _until(
            lambda: unanswered(players) == 0,
            DRAIN_LIMIT,
            "every action sent has its answer (drain)",
            problems,
        )
        hello = await _converge(system, players, problems)
        timeline["converged"] = time.monotonic() - t0
    except Exception as exc:  # a harness step failed: record it and still check what was seen
        problems.append(f"scenario aborted: {type(exc).__name__}: {exc}")
    finally:
        for p in players:
            with contextlib.suppress(Exception):
                await p.close()
        await system.close()
    try:
        chronicle = await system.chronicle()
    except Exception as exc:
        problems.append(f"cannot read the chronicle: {type(exc).__name__}: {exc}")
        chronicle = []
    histories = [p.history for p in players]
    verdict = check_history(histories, chronicle)
    problems += verdict.problems
    report.figures = verdict.figures()
    report.figures["chronicle_decisions"] = len(chronicle)
    if window is not None:
        report.recovery_by_client = recovery_times(histories, window.end)
        times = list(report.recovery_by_client.values())
        known = [t for t in times if t is not None]
        report.recover_first_s = min(known) if known else None
        report.recover_all_s = max(known) if known and len(known) == len(times) else None
    report.outcomes_by_client = {
        p.character: _counts([o.result for o in p.outcomes]) for p in players
    }
    report.connections_by_client = {h.character_id: connection_stats(h) for h in histories}
    for proc in system.procs():
        found = log_errors(proc.tail(100_000))
        if found["errors"] or found["tracebacks"]:
            report.logs[proc.log_path.name] = found
    report.duration_s = round(time.monotonic() - t0, 3)
    report.timeline = {k: round(v, 3) for k, v in timeline.items()}
    report.passed = not problems
    _record(report, histories, hello, system, t0)
    return report


def _record(
    report: Report,
    histories: Sequence[ClientHistory],
    hello: dict[str, Any] | None,
    system: RedisSystem | EmbeddedSystem,
    t0: float,
) -> None:
    root = artifacts_root()
    root.mkdir(parents=True, exist_ok=True)
    line = {
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "scenario": report.scenario,
        "fault": report.fault,
        "passed": report.passed,
        **report.figures,
        "scene_back_s": report.scene_back_s,
        "recover_first_s": report.recover_first_s,
        "recover_all_s": report.recover_all_s,
        "problems": len(report.problems),
        "log_errors": sum(found["errors"] for found in report.logs.values()),
        "duration_s": report.duration_s,
    }
    with (root / "results.jsonl").open("a") as out:
        out.write(json.dumps(line) + "\n")
    evidence = root / report.scenario
    (evidence / "report.json").write_text(
        json.dumps({**asdict(report), "fresh_hello": hello}, indent=2, default=str)
    )
    for history in histories:
        with (evidence / f"client-{history.character_id}.jsonl").open("w") as out:
            for frame in history.frames:
                row = {**asdict(frame), "at": round(frame.at - t0, 4)}
                out.write(json.dumps(row, default=str) + "\n")


def scenario_directory(scenario: str) -> Path:
    """A clean ``artifacts/faults/<scenario>/`` for the run's database and process logs."""
    directory = artifacts_root() / scenario
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory
