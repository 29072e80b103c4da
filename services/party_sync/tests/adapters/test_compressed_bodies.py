"""Request bodies sent gzip- or deflate-encoded: inflated by the route's reader
(``problems.read_body``), never beyond the route's limit and never when the route refuses before
reading (aiohttp's own inflating is off: ``problems.RAW_BODIES``). A 1 MiB gzip of a gigabyte of
zeros, sent by anyone, used to cost the node two seconds of its event loop per request."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from party_sync import problems
from party_sync.problems import BadJson, BodyTooLarge, UnsupportedEncoding, read_body
from ps_testkit.api_events import SCENE
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import Running, make_settings, serve_in_process

KEY = "api-key-0123456789abcdef0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def bomb(megabytes: int) -> bytes:
    """A gzip of ``megabytes`` MiB of zeros (about 1 KiB per MiB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(megabytes)) + packer.flush()


async def read_with(body: bytes, encoding: str, limit: int) -> bytes:
    """``read_body`` of a request that carries ``body`` with Content-Encoding ``encoding``."""
    from unittest import mock

    from aiohttp.streams import StreamReader

    protocol = mock.Mock(_reading_paused=False)
    stream = StreamReader(protocol, 2**16, loop=__import__("asyncio").get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    request = make_mocked_request(
        "POST",
        "/x",
        headers={"Content-Encoding": encoding, "Content-Length": str(len(body))},
        payload=stream,
        app=web.Application(),
    )
    return await read_body(request, limit)


async def test_an_encoded_body_is_inflated_within_the_limit() -> None:
    data = orjson.dumps(SCENE)
    assert await read_with(gzip.compress(data), "gzip", 4096) == data
    assert await read_with(zlib.compress(data), "Deflate", 4096) == data
    assert await read_with(data, "identity", 4096) == data


async def test_a_bomb_is_inflated_no_further_than_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inflated: list[int] = []
    real = problems._inflate

    def counting(inflater: Any, data: bytes, room: int) -> bytes:
        out = real(inflater, data, room)
        inflated.append(len(out))
        return out

    monkeypatch.setattr(problems, "_inflate", counting)
    with pytest.raises(BodyTooLarge):
        await read_with(bomb(64), "gzip", 4096)
    assert sum(inflated) <= 4097  # not 64 MiB


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (gzip.compress(b"{}")[:-9], "gzip"),  # cut short
        (b"\x1f\x8b00000000", "gzip"),  # not gzip
        (b"{}", "deflate"),
    ],
    ids=["gzip-cut-short", "not-gzip", "not-deflate"],  # (gzip's header holds the time)
)
async def test_a_body_that_does_not_decode_is_bad_json(body: bytes, encoding: str) -> None:
    with pytest.raises(BadJson):
        await read_with(body, encoding, 4096)


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, gzip", "gzip;q=1"])
async def test_an_encoding_not_decoded_here_is_bad_json_that_says_so(encoding: str) -> None:
    """400 ``bad_json`` as documented, with ``Accept-Encoding`` (RFC 9110 §12.5.3) and a detail
    that names the encodings decoded (it said "body is not valid UTF-8 JSON")."""
    with pytest.raises(UnsupportedEncoding) as refused:
        await read_with(b"{}", encoding, 4096)
    assert refused.value.headers == {"Accept-Encoding": "gzip, deflate"}


async def post(srv: Running, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **headers}
    async with srv.http.post(
        srv.base + "/api/v1/parties/p1/events", data=body, headers=headers
    ) as resp:
        return resp.status, await resp.json()


async def test_the_api_takes_gzip_and_refuses_a_bomb_at_its_limit_or_before_reading() -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        _, hello = await srv.join("aria")
        gz = {"Content-Encoding": "gzip"}
        status, body = await post(srv, gzip.compress(orjson.dumps(SCENE)), {**AUTH, **gz})
        assert (status, body) == (202, {"seq": hello["payload"]["seq"] + 1})
        status, problem = await post(srv, bomb(64), {**AUTH, **gz})
        assert (status, problem["code"]) == (413, "too_large")
        status, problem = await post(srv, bomb(64), gz)  # no key: never read
        assert (status, problem["code"]) == (401, "unauthorized")
        async with srv.http.post(
            srv.base + "/api/v1/parties/p1/events",
            data=b"{}",
            headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "br"},
        ) as resp:
            problem = await resp.json(content_type=None)
            assert (resp.status, problem["code"]) == (400, "bad_json")
            assert resp.headers["Accept-Encoding"] == "gzip, deflate"
            assert "gzip, deflate" in problem["detail"]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"NaN", "expected a JSON value: line 1 column 1"),
        (b'{"a": 1e309}', "number is infinity when parsed as double"),
        (b'"\\ud800"', "no low surrogate in string"),
        (b"\xff{}", "not UTF-8 at byte 0"),
    ],
)
def test_a_body_that_is_no_json_is_told_why_like_a_websocket_message(body: bytes, why: str) -> None:
    """The HTTP API's bad_json said "body is not valid UTF-8 JSON" for NaN, 1e309 or a lone
    surrogate, valid UTF-8 all (schema probe); it says where and what the parser stopped at, as
    a WebSocket message's bad_json does, never the body itself."""
    with pytest.raises(BadJson) as refused:
        problems.decode_body(body)
    assert why in str(refused.value)
    assert str(refused.value).startswith("body is not valid UTF-8 JSON (")


async def test_the_api_answer_to_a_body_that_is_no_json_says_why() -> None:
    """The exception said why, but the answer had the table's fixed detail (re-check probe):
    the client reads where the parser stopped and what it met."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        for body, why in ((b'{"a":1e999}', "infinity"), (b"\xff\xfe{}", "not UTF-8 at byte 0")):
            status, problem = await post(srv, body, AUTH)
            assert (status, problem["code"]) == (400, "bad_json")
            assert why in problem["detail"] and problem["detail"].startswith("body is not valid")
        gz = {**AUTH, "Content-Encoding": "gzip"}
        status, problem = await post(srv, gzip.compress(b"{}")[:-9], gz)
        assert (status, problem["detail"]) == (400, "the body does not decode as its headers say")
