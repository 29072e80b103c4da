"""The HTTP API under hostile bodies, paths and keys: the expected status every time, never 500.

Bodies arrive in several TCP writes (the server must read the whole body), chunked, oversized,
malformed and with wrong content types; path ids break the id rule; API keys are missing or
wrong; request lines and headers are malformed, and no credential in them may reach any log.
Raw sockets (``ps_testkit.security_raw``) write the bytes; a "partial" body is checked by
asserting the server says nothing until the rest is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from party_sync.initdata import sign_init_data
from ps_testkit.api_events import SCENE
from ps_testkit.engines import ScriptedEngine
from ps_testkit.security_raw import Raw, capture_logs, chunked, request_head
from ps_testkit.servers import Running, make_settings, serve_in_process, serve_process, token

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
BOT = "7000000001:AAF-test-bot-token-of-party-sync"
TG_ID = 279058397
MAX_API_BODY = 262144  # api_max_body_bytes' default (the documented 256 KiB)

PIECE = {"stream_id": "n-1", "index": 0, "text": "Rain on iron.", "done": False}
VOTE = {
    "question": "Which way?",
    "options": [{"id": "L", "label": "Left"}, {"id": "R", "label": "Right"}],
    "timeout_s": 30,
    "campaign_run_id": "r1",
}


def init_data() -> str:
    fields = {
        "query_id": "AAHdF6IQAAAAAN0XohDhrOrc",
        "user": json.dumps({"id": TG_ID, "first_name": "Ann"}),
        "auth_date": str(int(time.time() - 60)),
    }
    return sign_init_data(fields, BOT)


@pytest.fixture
async def srv() -> AsyncIterator[Running]:
    settings = make_settings(api_key=KEY, telegram_bot_token=BOT)
    with capture_logs() as logs:
        async with serve_in_process(settings, engine=ScriptedEngine()) as running:
            body = {"telegram_user_id": TG_ID, "display_name": "Aria", "campaign_run_id": "r1"}
            url = f"{running.base}/api/v1/parties/p1/members/aria"
            for _ in range(10):  # a 503 (Redis slow to answer on a loaded machine): again
                async with running.http.put(url, json=body, headers=AUTH) as resp:
                    status = resp.status
                    retry_after = float(resp.headers.get("Retry-After", "0.5"))
                if status != 503:
                    break
                await asyncio.sleep(retry_after)  # (as the 503 asks)
            assert status == 204
            yield running
    assert not logs.errors(), "the server logged errors:\n" + "\n".join(logs.errors()[:5])
    assert not logs.containing(KEY), "the API key reached the logs"


#: (method, path, body, the status of success)
ROUTES: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", "/api/v1/parties/p1/events", SCENE, 202),
    ("POST", "/api/v1/runs/r1/events", SCENE, 202),
    ("POST", "/api/v1/parties/p1/votes", VOTE, 201),
    ("POST", "/api/v1/parties/p1/narration", PIECE, 202),
    (
        "PUT",
        "/api/v1/parties/p1/members/borin",
        {"telegram_user_id": 7, "display_name": "Borin", "campaign_run_id": "r1"},
        204,
    ),
]


async def send_raw(
    srv: Running,
    method: str,
    path: str,
    pieces: list[bytes],
    headers: dict[str, str],
    *,
    complete_first: bool = True,
) -> int:
    """Write the head, then each piece in its own write; before every piece but the first the
    server must still be waiting (it may not answer a request whose body has not all arrived)."""
    raw = await Raw.open(srv.base)
    try:
        await raw.write(request_head(method, path, headers))
        for i, piece in enumerate(pieces):
            if i and not complete_first:
                with contextlib.suppress(ConnectionError):
                    await raw.write(piece)
                continue
            if i:
                early = await raw.early(0.15)
                assert early == b"", f"answered before the body was complete: {early[:200]!r}"
            with contextlib.suppress(ConnectionError):
                await raw.write(piece)
        status, _, _ = await raw.response()
        return status
    finally:
        await raw.close()


def _split(body: bytes, parts: int) -> list[bytes]:
    step = max(1, len(body) // parts)
    return [body[i : i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize(("method", "path", "body", "ok"), ROUTES)
async def test_a_body_in_several_tcp_writes_is_read_whole(
    srv: Running, method: str, path: str, body: dict[str, Any], ok: int
) -> None:
    data = orjson.dumps(body)
    headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(data))}
    assert await send_raw(srv, method, path, _split(data, 3), headers) == ok


@pytest.mark.parametrize(("method", "path", "body", "ok"), ROUTES)
async def test_a_chunked_body_is_read_whole(
    srv: Running, method: str, path: str, body: dict[str, Any], ok: int
) -> None:
    data = orjson.dumps(body)
    headers = {**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    assert await send_raw(srv, method, path, chunked(*_split(data, 3)), headers) == ok


async def test_a_telegram_sign_in_split_across_writes_succeeds(srv: Running) -> None:
    data = orjson.dumps({"init_data": init_data(), "party_id": "p1", "character_id": "aria"})
    headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
    assert await send_raw(srv, "POST", "/api/v1/auth/telegram", _split(data, 4), headers) == 200


async def test_a_150_kb_party_state_event_is_accepted(srv: Running) -> None:
    client, _ = await srv.join("aria")
    event = {
        "type": "party.state",
        "payload": {
            "status": "active",
            "run_status": "in_progress",
            "flags": {"blob": "x" * 150_000},
        },
    }
    async with srv.http.post(
        srv.base + "/api/v1/parties/p1/events", json=event, headers=AUTH
    ) as resp:
        assert resp.status == 202, await resp.text()
    state = await client.until("party.state")
    assert len(state["payload"]["flags"]["blob"]) == 150_000
    await client.close()


@pytest.mark.parametrize(
    "number", ["1e20", "1.0e20", "1e300", "18446744073709551616", "9007199254740992", "-1e20"]
)
async def test_an_integer_past_the_safe_range_is_refused_and_the_party_still_opens(
    srv: Running, number: str
) -> None:
    """scene_number 1e20 was accepted (an integral float is an integer to JSON Schema) and
    stored; the server could not encode that scene again (past 64 bits), so every handshake of
    the party failed from then on, each with an ERROR traceback. An integer past ±(2^53 - 1)
    is an invalid event (422); the party's last good scene stands."""
    async with srv.http.post(
        srv.base + "/api/v1/parties/p1/events", json=SCENE, headers=AUTH
    ) as resp:
        assert resp.status == 202
    text = orjson.dumps(SCENE).decode().replace('"scene_number":1', f'"scene_number":{number}')
    headers = {**AUTH, "Content-Type": "application/json"}
    async with srv.http.post(
        srv.base + "/api/v1/parties/p1/events", data=text, headers=headers
    ) as resp:
        assert resp.status == 422, await resp.text()
        assert (await resp.json())["code"] == "invalid_event"
    client, hello = await srv.join("aria")
    assert hello["payload"]["scene"]["scene_number"] == 1
    await client.close()


@pytest.mark.parametrize(("method", "path", "body", "ok"), ROUTES)
async def test_oversized_bodies_get_413(
    srv: Running, method: str, path: str, body: dict[str, Any], ok: int
) -> None:
    del body, ok
    limit = 4096 if "/members/" in path else MAX_API_BODY
    big = b'{"pad": "' + b"x" * (limit + 10) + b'"}'
    declared = {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(big))}
    assert await send_raw(srv, method, path, _split(big, 2), declared, complete_first=False) == 413
    stream = {**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    assert (
        await send_raw(srv, method, path, chunked(*_split(big, 4)), stream, complete_first=False)
        == 413
    )
    # A Content-Length far beyond the limit is refused from the head alone.
    huge = {**AUTH, "Content-Type": "application/json", "Content-Length": str(10**12)}
    raw = await Raw.open(srv.base)
    try:
        await raw.write(request_head(method, path, huge))
        status, _, _ = await raw.response()
        assert status == 413
    finally:
        await raw.close()


MALFORMED: list[tuple[bytes, set[int]]] = [
    (b"", {400}),
    (b"{not json", {400}),
    (b"\xff\xfe{}", {400}),
    (b'{"type": "scene.update", "payload": {}', {400}),
    (b"[1, 2]", {400, 422}),
    (b'"text"', {400, 422}),
    (b"null", {400, 422}),
    (b"{}", {400, 422}),
    (b'{"type": 5, "payload": {}}', {400, 422}),
    (b'{"type": "scene.update", "payload": []}', {400, 422}),
    (b'{"type": "scene.update", "payload": {}, "seq": 5}', {400, 422}),
    (b'{"type": "system.hello", "payload": {}}', {400, 422}),
    (b'{"type": "scene.update", "payload": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", {400, 422}),
    (b'{"type": "scene.update", "payload": {"n": 1e999}}', {400, 422}),
]


@pytest.mark.parametrize(("method", "path", "body", "ok"), ROUTES)
async def test_malformed_bodies_get_4xx_never_500(
    srv: Running, method: str, path: str, body: dict[str, Any], ok: int
) -> None:
    del body, ok
    for data, statuses in MALFORMED:
        headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(data))}
        status = await send_raw(srv, method, path, [data] if data else [], headers)
        assert status in statuses | {413 if "/members/" in path and len(data) > 4096 else 400}, (
            data[:60],
            status,
        )


def _piece(stream_id: bytes, rest: bytes) -> bytes:
    return b'{"stream_id": "' + stream_id + b'", ' + rest + b"}"


#: Narration pieces at and past the edges of their rules: (body, the statuses allowed).
HOSTILE_PIECES: list[tuple[bytes, set[int]]] = [
    (_piece(b"h-1", b'"index": 0, "text": "nul \\u0000, bidi \\u202e", "done": true'), {202}),
    (
        _piece(
            b"h-2", b'"index": 0, "text": "' + "\U0001f600".encode() * 20_000 + b'", "done": true'
        ),
        {202},
    ),
    (_piece(b"h-3", b'"index": 0, "text": "' + "\U0001f600".encode() * 20_001 + b'"'), {422}),
    (_piece(b"h-4", b'"index": 0, "text": "\\ud800"'), {400, 422}),  # a lone surrogate
    (_piece(b"h-5", b'"index": 18446744073709551615, "text": "x"'), {409, 422}),  # a gap, 2**64 - 1
    (_piece(b"h-6", b'"index": 1' + b"0" * 40 + b', "text": "x"'), {400, 422}),
    (_piece(b"h-7", b'"index": 1e999, "text": "x"'), {400, 422}),
    (_piece(b"h-8", b'"index": 0.0, "text": "x"'), {202}),  # JSON Schema's integer 0, as events
    (_piece(b"h-9", b'"index": 0, "text": "x", "done": null'), {422}),
    (_piece(b"h-10", b'"index": 0, "text": {"a": [[[[1]]]]}'), {422}),
    (_piece(b"h-11", b'"index": 0, "text": "x", "action_id": "' + b"a" * 65 + b'"'), {422}),
    (_piece(b"x" * 65, b'"index": 0, "text": "x"'), {422}),
    (_piece(b"h-\\u00e1", b'"index": 0, "text": "x"'), {422}),
    (_piece(b"h-12", b'"index": 0, "index": 3, "text": "x"'), {400, 409, 422}),  # a repeated key
    (b'{"stream_id": "h-13", "index": 0, "text": "x", "pad": "' + b"y" * 200_000 + b'"}', {422}),
]


@pytest.mark.parametrize(("data", "statuses"), HOSTILE_PIECES)
async def test_hostile_narration_pieces_get_their_status_never_500(
    srv: Running, data: bytes, statuses: set[int]
) -> None:
    headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(data))}
    status = await send_raw(srv, "POST", "/api/v1/parties/p1/narration", _split(data, 3), headers)
    assert status in statuses, (data[:80], status)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "image/png",
    ],
)
async def test_wrong_content_types_never_give_500(srv: Running, content_type: str | None) -> None:
    """The body decides (JSON or not): a content type is either ignored or refused with 415."""
    data = orjson.dumps(SCENE)
    headers = {**AUTH, "Content-Length": str(len(data))}
    if content_type is not None:
        headers["Content-Type"] = content_type
    status = await send_raw(srv, "POST", "/api/v1/parties/p1/events", [data], headers)
    assert status in (202, 415)


BAD_IDS = [
    "p*",
    "p?x",
    "p 1",
    "p\n1",
    "p\x001",
    "pü",
    "p" * 3000,
    "p\r\nX-Injected: 1",
    "p%2F1",
    "{party_id}",
]
ID_ROUTES = [
    ("POST", "/api/v1/parties/{}/events", SCENE),
    ("POST", "/api/v1/runs/{}/events", SCENE),
    ("POST", "/api/v1/parties/{}/votes", VOTE),
    ("POST", "/api/v1/parties/{}/narration", PIECE),
    (
        "PUT",
        "/api/v1/parties/{}/members/aria",
        {"telegram_user_id": 7, "display_name": "X", "campaign_run_id": "r1"},
    ),
    (
        "PUT",
        "/api/v1/parties/p1/members/{}",
        {"telegram_user_id": 7, "display_name": "X", "campaign_run_id": "r1"},
    ),
    ("GET", "/api/v1/parties/{}/members", None),
    ("GET", "/api/v1/parties/p1/members/{}", None),
    ("DELETE", "/api/v1/parties/p1/members/{}", None),
]


@pytest.mark.parametrize(("method", "template", "body"), ID_ROUTES)
async def test_path_ids_follow_the_id_rule_on_every_route(
    srv: Running, method: str, template: str, body: dict[str, Any] | None
) -> None:
    """A bad id in a path is refused (400/404/422) before it reaches a key name."""
    for bad in BAD_IDS:
        path = template.format(quote(bad, safe=""))
        data = orjson.dumps(body) if body is not None else b""
        headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(data))}
        status = await send_raw(srv, method, path, [data] if data else [], headers)
        assert status in (400, 404, 422), (method, template, bad[:40], status)


KEYS: list[tuple[dict[str, str], int]] = [
    ({}, 401),
    ({"Authorization": ""}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Bearer "}, 401),
    ({"Authorization": "Bearer wrong-key"}, 401),
    ({"Authorization": f"Bearer {KEY[:-1]}"}, 401),
    ({"Authorization": f"Bearer {KEY}x"}, 401),
    ({"Authorization": f"Basic {KEY}"}, 401),
    ({"Authorization": KEY}, 401),
    ({"Authorization": f"Bearer {KEY.upper()}"}, 401),
    ({"X-Api-Key": KEY}, 401),
    ({"Authorization": f"bearer {KEY}"}, 202),
    ({"Authorization": f"Bearer   {KEY}  "}, 202),
]


@pytest.mark.parametrize(("headers", "status"), KEYS)
async def test_api_keys(srv: Running, headers: dict[str, str], status: int) -> None:
    async with srv.http.post(
        srv.base + "/api/v1/parties/p1/events", json=SCENE, headers=headers
    ) as resp:
        assert resp.status == status


async def test_the_key_is_checked_before_the_body_is_read(srv: Running) -> None:
    """A wrong key with a huge declared body: 401 at once, the body is never awaited."""
    raw = await Raw.open(srv.base)
    try:
        head = {
            "Authorization": "Bearer wrong",
            "Content-Type": "application/json",
            "Content-Length": str(10**9),
        }
        await raw.write(request_head("POST", "/api/v1/parties/p1/events", head))
        status, _, _ = await raw.response()
        assert status == 401
    finally:
        await raw.close()


async def test_without_a_configured_key_every_call_is_refused() -> None:
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        for method, template, body in ID_ROUTES:
            url = srv.base + template.format("p1")
            async with srv.http.request(
                method, url, json=body, headers={"Authorization": "Bearer "}
            ) as resp:
                assert resp.status == 401, (method, template)


# -- malformed HTTP: never a 500, never a credential in a log -------------------------------------


def _malformed_requests(secret: str) -> list[bytes]:
    events = "POST /api/v1/parties/p1/events HTTP/1.1"
    auth = f"Authorization: Bearer {secret}"
    heads = [
        [f"GET /ws?token={secret}\x01 HTTP/1.1", "Host: x"],
        [f"GET /ws?token={secret} HTTP/9.9", "Host: x"],
        [f"GET /ws?token={secret}\x00 HTTP/1.1", "Host: x"],
        [f"GET /ws?token={secret} x HTTP/1.1", "Host: x"],
        [events, "Host: x", auth + "\x01"],
        [events, "Host: x", auth, "Content-Length: -1"],
        ["GET /ws HTTP/1.1", "Host: x", auth, " Folded: yes"],
        ["GET /ws HTTP/1.1", "Host: x", auth, "Content-Length: 1", "Transfer-Encoding: chunked"],
        [f"GET /healthz?token={secret} HTTP/1.1", "Host: x", "X: " + "y" * 20000],
    ]
    requests = [("\r\n".join(head) + "\r\n\r\n").encode() for head in heads]
    lf_only = f"GET /ws?token={secret} HTTP/1.1\nHost: x\n\n".encode()
    return [*requests, lf_only]


@pytest.mark.e2e
async def test_malformed_requests_get_4xx_and_no_credential_reaches_the_process_log() -> None:
    """A real ``party-sync serve`` at DEBUG: whatever aiohttp's parser refuses, no token and no
    API key reaches its log (every logger), and no ERROR traceback is written per request."""
    secrets = (token("aria"), KEY)
    env = {"PARTY_SYNC_LOG_LEVEL": "DEBUG", "PARTY_SYNC_API_KEY": KEY}
    async with serve_process(
        ["--engine", "ps_testkit.engines:node_engine"], env=_engine_env(env)
    ) as srv:
        for secret in secrets:
            for request in _malformed_requests(secret):
                raw = await Raw.open(srv.base)
                try:
                    await raw.write(request)
                    status = await _status_or_zero(raw)
                    assert status == 0 or 400 <= status < 500, (request[:80], status)
                finally:
                    await raw.close()
        async with srv.http.get(srv.base + "/healthz") as resp:
            assert resp.status == 200
        assert srv.process is not None and srv.process.stderr is not None
        log = await _drain_log(srv)
    for secret in secrets:
        assert secret.encode() not in log, "a credential reached the log: " + _around(log, secret)
    errors = [line for line in log.splitlines() if b'"level":"error"' in line]
    assert len(errors) <= 1, (
        f"{len(errors)} error records for 20 malformed requests: {errors[:2]!r}"
    )


def _engine_env(env: dict[str, str]) -> dict[str, str]:
    tests = str(Path(__file__).resolve().parents[1])
    return {**env, "PYTHONPATH": tests, "PS_ENGINE_DIR": tempfile.mkdtemp(prefix="ps-sec-")}


async def _status_or_zero(raw: Raw) -> int:
    """The answer's status; 0 if the server closed without a (complete) answer."""
    try:
        status, _, _ = await raw.response(timeout=5)
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
        return 0
    return status


async def _drain_log(srv: Running) -> bytes:
    """The process's log so far: wait (bounded) until a marker request's access line is in."""
    assert srv.process is not None and srv.process.stderr is not None
    fd = srv.process.stderr.fileno()
    marker = "/healthz-log-marker"
    async with srv.http.get(srv.base + marker) as resp:
        assert resp.status == 404
    log = b""
    async with asyncio.timeout(10):
        while marker.encode() not in log:
            log += await asyncio.to_thread(os.read, fd, 1 << 20)
    return log


def _around(log: bytes, secret: str) -> str:
    at = log.find(secret.encode())
    return log[max(0, at - 300) : at + 100].decode(errors="replace")
