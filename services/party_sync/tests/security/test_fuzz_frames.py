"""Generated frames against a running server; every answer checked by the schema oracle.

Targets: the app in process on a loopback port on both backends (memory, and a private
redis-server), and one real ``party-sync serve`` process. The oracle
(``ps_testkit.security_oracle``) says which reply each frame must get; besides that, nothing
the server sends may break its schema (``check_server_message`` on every received message,
and the suite's ``validate_outgoing`` on every frame the in-process server writes), no frame
may make the server log an ERROR (one client must not be able to write a traceback per
message), and the server must still serve a ping action afterwards.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from ps_testkit.engines import ScriptedEngine
from ps_testkit.security_fuzz import (
    EXAMPLES,
    MAX_BYTES,
    Frame,
    cases,
    connect,
    fresh_binding,
    play,
)
from ps_testkit.security_oracle import STABLE_CODES, check_error, ping
from ps_testkit.security_raw import LogCapture, capture_logs
from ps_testkit.servers import Running, make_settings, serve_in_process, serve_process

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

TESTS_DIR = Path(__file__).resolve().parents[1]


def fuzz_settings() -> Any:
    return make_settings(max_message_bytes=MAX_BYTES, rate_limit=1000.0, rate_burst=1000.0)


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    with capture_logs() as capture:
        yield capture
    assert not capture.errors(), "the server logged errors:\n" + "\n".join(capture.errors()[:5])


@pytest.fixture
async def in_process(backend_kind: str, logs: LogCapture) -> AsyncIterator[Running]:
    async with serve_in_process(fuzz_settings(), engine=ScriptedEngine()) as srv:
        yield srv


@pytest.fixture
async def process(tmp_path: Path) -> AsyncIterator[Running]:
    env = {
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
        ),
        "PS_ENGINE_DIR": str(tmp_path),
        "PARTY_SYNC_LOG_LEVEL": "ERROR",  # anything on stderr is an error record
    }
    args = [
        "--engine",
        "ps_testkit.engines:node_engine",
        "--engine-transport",
        "inprocess",
        "--max-message-bytes",
        str(MAX_BYTES),
        "--rate-limit",
        "1000",
        "--rate-burst",
        "1000",
    ]
    async with serve_process(args, env=env) as srv:
        yield srv
        assert srv.process is not None
        assert srv.process.poll() is None, "the server process died"
        async with srv.http.get(srv.base + "/healthz") as resp:
            assert resp.status == 200
        stderr = _available(srv.process.stderr.fileno()) if srv.process.stderr else b""
        assert not stderr.strip(), f"the server logged errors: {stderr[:3000]!r}"


def _available(fd: int) -> bytes:
    """What a pipe holds now, without blocking."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@FUZZ
@given(case=cases)
async def test_generated_frames_in_process(in_process: Running, case: list[Frame]) -> None:
    await play(in_process, case)


@pytest.mark.e2e
@FUZZ
@given(case=cases)
async def test_generated_frames_real_process(process: Running, case: list[Frame]) -> None:
    await play(process, case)


# -- payload nesting (64 levels: too_deep) -------------------------------------------------------


def _nested(levels: int) -> Any:
    inner: Any = 1
    for i in range(levels):
        inner = [inner] if i % 2 else {"k": inner}
    return inner


def _deep_action(action_id: str, levels: int, binding: Any) -> bytes:
    message = ping(action_id, binding)
    message["payload"]["payload"] = {"deep": _nested(levels - 2)}  # total depth = levels + 2
    return orjson.dumps(message) if levels < 250 else _dumps_deep(message, levels)


def _dumps_deep(message: dict[str, Any], levels: int) -> bytes:
    """orjson cannot encode past 254 levels: build the deep part as text."""
    opened = "".join('{"k":' if i % 2 == 0 else "[" for i in range(levels))
    closed = "".join("}" if i % 2 == 0 else "]" for i in reversed(range(levels)))
    message = {**message, "payload": {**message["payload"], "payload": {"deep": "@@"}}}
    return orjson.dumps(message).replace(b'"@@"', (opened + "1" + closed).encode())


@pytest.mark.parametrize("levels", [300, 1100])
async def test_a_deep_payload_is_refused_at_parse_time_with_a_final_code(
    in_process: Running, levels: int
) -> None:
    """Deeper than the stream link can re-encode (orjson: 254), or than orjson parses at all
    (1,024): refused with a stable, non-retryable code naming the action — never accepted, never
    ``engine_unavailable`` (retryable: a well-behaved client would retry forever) — and the
    connection goes on."""
    binding = fresh_binding()
    client = await connect(in_process, binding)
    await client.ws.send_str(_deep_action("deep-1", levels, binding).decode())
    answer = await client.recv()
    while answer["type"] in ("party.join", "scene.update"):
        answer = await client.recv()
    assert answer["type"] == "system.error", f"a {levels}-level payload was accepted: {answer}"
    code = answer["payload"]["code"]
    assert code in STABLE_CODES and not answer["payload"]["retryable"], answer
    assert code not in ("internal_error", "engine_unavailable", "engine_error"), answer
    if levels < 1024:  # it parses as JSON: its action_id is known and echoed
        check_error(answer, _expected_deep(), b"")
        assert answer["payload"]["in_reply_to"]["action_id"] == "deep-1"
    await client.send(ping("after-deep", binding))
    assert (await client.until("action.result"))["payload"]["action_id"] == "after-deep"
    await client.close()


def _expected_deep() -> Any:
    from ps_testkit.security_oracle import Expected

    return Expected("error", action_id="deep-1", type="action.request")


async def test_a_reasonably_nested_payload_is_still_accepted(in_process: Running) -> None:
    binding = fresh_binding()
    client = await connect(in_process, binding)
    await client.ws.send_str(_deep_action("nest-1", 16, binding).decode())
    result = await client.until("action.result")
    assert result["payload"]["action_id"] == "nest-1"
    await client.close()


@pytest.mark.e2e
async def test_a_deep_payload_on_the_stream_transport_is_refused_the_same_way(
    redis_server: Any, tmp_path: Path
) -> None:
    """The transport that broke (orjson cannot re-encode it for the actions stream): a real node
    in Redis mode with the default engine transport (stream) and a worker."""
    del tmp_path
    redis_server.command("FLUSHALL")
    env = {"PARTY_SYNC_LOG_LEVEL": "ERROR"}
    args = ["--redis-url", redis_server.url, "--max-message-bytes", str(MAX_BYTES)]
    async with serve_process(args, env=env) as srv:
        binding = fresh_binding()
        client = await connect(srv, binding)
        await client.ws.send_str(_deep_action("deep-s", 300, binding).decode())
        async with asyncio.timeout(15):
            answer = await client.until("system.error", timeout=15)
        assert answer["payload"]["in_reply_to"].get("action_id") == "deep-s", answer
        assert not answer["payload"]["retryable"], answer
        assert answer["payload"]["code"] not in ("engine_unavailable", "internal_error"), answer
        await client.close()
        assert srv.process is not None and srv.process.stderr is not None
        stderr = _available(srv.process.stderr.fileno())
        assert b"Traceback" not in stderr and b'"level":"error"' not in stderr, stderr[:2000]
