"""A scriptable in-process engine for gateway tests (the reference engine is tested on its own)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

from party_sync.engine.interface import (
    ActionRequest,
    EngineRejected,
    EventPublisher,
    JoinNotice,
    RestateNotice,
    publish_all,
)

Mode = Literal["answer", "reject", "crash", "silent"]


class ScriptedEngine:
    """Answers each action with ``action.result`` then ``scene.update`` (scene number + 1).

    ``gate``: when set to an unset Event, actions wait on it (to hold them in flight).
    ``mode``: answer normally, reject, crash, or stay silent (never answer).
    Restate notices are recorded in ``restates`` (and re-publish nothing: tests look at the call).
    """

    def __init__(self) -> None:
        self.calls: list[ActionRequest] = []
        self.joins: list[JoinNotice] = []
        self.restates: list[RestateNotice] = []
        self.restate_failures = 0  # the next N restates raise (a failing engine)
        self.gate: asyncio.Event | None = None
        self.mode: Mode = "answer"
        self.scene_number = 0
        self.answered: list[str] = []  # the actions whose result and scene it published
        self.publisher: EventPublisher | None = None
        self.closed = False

    async def start(self, publisher: EventPublisher) -> None:
        self.publisher = publisher

    @property
    def started(self) -> EventPublisher:
        """The publisher party_sync gave the engine (it has started)."""
        assert self.publisher is not None, "the engine has not been started"
        return self.publisher

    async def handle_join(self, notice: JoinNotice) -> None:
        self.joins.append(notice)

    async def handle_restate(self, notice: RestateNotice) -> None:
        if self.restate_failures > 0:
            self.restate_failures -= 1
            raise RuntimeError("engine bug while re-stating")
        self.restates.append(notice)

    async def handle_action(self, action: ActionRequest) -> None:
        self.calls.append(action)
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "reject":
            raise EngineRejected("that option is not open")
        if self.mode == "crash":
            raise RuntimeError("engine bug")
        if self.mode == "silent":
            return
        assert self.publisher is not None
        self.scene_number += 1
        result: dict[str, Any] = {
            "action_id": action.action_id,
            "character_id": action.character_id,
            "action_type": action.action_type,
            "outcome": "success",
            "state": (
                {"effects": [], "scene_flags": {}}  # a party-level action has no hit points
                if action.character_id == "party"
                else {"hp": 10, "max_hp": 10, "effects": [], "scene_flags": {}}
            ),
            "narration": "It works.",
        }
        await self.publisher.publish(
            action.party_id, "action.result", result, trace_id=action.trace_id
        )
        scene = {
            "scene_number": self.scene_number,
            "scene_id": f"scene-{self.scene_number}",
            "title": f"Scene {self.scene_number}",
            "narration": "The story goes on.",
            "options": [{"id": "A", "label": "Go on"}],
            "kind": "story",
        }
        await self.publisher.publish(
            action.party_id, "scene.update", scene, trace_id=action.trace_id
        )
        self.answered.append(action.action_id)

    def count(self, action_id: str) -> int:
        return sum(1 for call in self.calls if call.action_id == action_id)

    async def close(self) -> None:
        self.closed = True


class RestatingEngine(ScriptedEngine):
    """``ScriptedEngine`` that re-states as an engine with durable state does: on a restate
    notice it records it, then publishes its current scene (the last ``scene.update`` it
    published, if any) and ``party.state`` again through the normal sequenced path.
    ``restated``: the re-statements finished (their events published)."""

    restated = 0

    def scene(self) -> dict[str, Any]:
        return {
            "scene_number": self.scene_number,
            "scene_id": f"scene-{self.scene_number}",
            "title": f"Scene {self.scene_number}",
            "narration": "The story goes on.",
            "options": [{"id": "A", "label": "Go on"}],
            "kind": "story",
        }

    async def handle_restate(self, notice: RestateNotice) -> None:
        await super().handle_restate(notice)
        if self.scene_number == 0 or self.publisher is None:
            self.restated += 1
            return  # nothing played yet: nothing to re-state
        state = {
            "status": "active",
            "run_status": "in_progress",
            "scene_number": self.scene_number,
            "characters": {},
            "flags": {},
        }
        events = [("scene.update", self.scene()), ("party.state", state)]
        await publish_all(self.publisher, notice.party_id, events, trace_id=notice.trace_id)
        self.restated += 1


class NodeEngine(ScriptedEngine):
    """``ScriptedEngine`` for ``party-sync serve`` subprocesses (``--engine
    ps_testkit.engines:node_engine``), observable from the test process through files.

    Every call is appended to ``<dir>/calls-<pid>.log`` (so a test counts engine calls across
    nodes), every restate notice's ``party_id epoch`` to ``<dir>/restates-<pid>.log``. An action
    whose payload has ``"hold": true`` stays in flight until the test creates
    ``<dir>/release-<action_id>``; one with ``"reject": true`` is then refused (``EngineRejected``).
    """

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    async def handle_action(self, action: ActionRequest) -> None:
        with (self.directory / f"calls-{os.getpid()}.log").open("a") as calls:
            calls.write(action.action_id + "\n")
        if action.payload.get("hold"):
            release = self.directory / f"release-{action.action_id}"
            async with asyncio.timeout(30):
                while not release.exists():  # noqa: ASYNC110 (a file from another process)
                    await asyncio.sleep(0.01)
        if action.payload.get("reject"):
            raise EngineRejected("the test engine refuses it")
        await super().handle_action(action)

    async def handle_restate(self, notice: RestateNotice) -> None:
        with (self.directory / f"restates-{os.getpid()}.log").open("a") as restates:
            restates.write(f"{notice.party_id} {notice.epoch}\n")
        await super().handle_restate(notice)


def node_engine() -> NodeEngine:
    """The factory ``--engine ps_testkit.engines:node_engine`` loads (needs ``PS_ENGINE_DIR``)."""
    return NodeEngine(Path(os.environ["PS_ENGINE_DIR"]))


def engine_calls(directory: Path) -> list[str]:
    """Every action_id any node's ``NodeEngine`` was called with (in per-node order)."""
    calls: list[str] = []
    for log in sorted(directory.glob("calls-*.log")):
        calls.extend(log.read_text().split())
    return calls


def engine_restates(directory: Path) -> list[str]:
    """Every restate notice any ``NodeEngine`` got, as ``"<party_id> <epoch>"``."""
    lines: list[str] = []
    for log in sorted(directory.glob("restates-*.log")):
        lines.extend(log.read_text().splitlines())
    return lines


#: The source of a module ``create_engine``: an engine that never answers an action (it touches
#: the file ``PS_MARK`` names, if set, when one starts), with a thread that is not a daemon (as
#: aiosqlite's is): the thread ends when the engine is closed, unless ``LEAK`` is set. For the
#: shutdown tests of ``serve`` and ``engine-worker``, written next to them as a module.
HANGING_ENGINE = """
import asyncio, os, threading

class Engine:
    async def start(self, publisher):
        self.closed = threading.Event()
        threading.Thread(target=self.closed.wait, name="engine-db", daemon=False).start()

    async def handle_action(self, action):
        if os.environ.get("PS_MARK"):
            open(os.environ["PS_MARK"], "w").close()
        while True:  # mid-action for ever (a game master narrating)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if not os.environ.get("SWALLOW"):  # (SWALLOW: carries on when cancelled)
                    raise

    async def handle_join(self, notice): ...

    async def close(self):
        if not os.environ.get("LEAK"):
            self.closed.set()

def create_engine():
    return Engine()
"""


def assert_stopped_in_budget(
    returncode: int | None, took: float, log: str, leak: bool, named: str = "engine-db"
) -> None:
    """A process running ``HANGING_ENGINE`` with ``PARTY_SYNC_SHUTDOWN_TIMEOUT=1``, signalled
    ``took`` seconds before it ended: the engine closed, exit 0 within the budget (and a moment);
    with ``LEAK`` (or ``SWALLOW``), its watchdog ended it 2 s past the budget, exit 1, naming
    the thread (or the coroutine: ``named``)."""
    if leak:
        assert returncode == 1 and 3.0 <= took < 6.0, (returncode, took)
        assert "did not exit within shutdown_timeout" in log and named in log, log[-2000:]
    else:
        assert returncode == 0 and took < 3.0, (returncode, took, log[-2000:])


async def stop_mid_action(
    srv: Any, process: subprocess.Popen[bytes], mark: Path, action_id: str
) -> tuple[int | None, float]:
    """aria (on ``srv``, a ``servers.Running``) sends ``action_id``; once ``HANGING_ENGINE``
    in ``process`` is inside it (``mark`` exists), SIGTERM ``process``: its exit code and the
    seconds it took to end."""
    from ps_testkit.client import wait_until

    aria, _ = await srv.join("aria")
    await aria.act(action_id, "aria", "r1")
    await aria.until("action.accepted")
    await wait_until(mark.exists, timeout=20)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    returncode = await asyncio.to_thread(process.wait, 20)
    return returncode, time.monotonic() - signalled
