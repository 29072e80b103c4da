"""The handshake: tokens (401) and origins (403); nothing happens for a refused connection."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt
import pytest
from party_sync.backends.memory import MemoryBackend
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import SECRET, make_settings, serve_in_process, token


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "sub": "u1",
        "party_id": "p1",
        "campaign_run_id": "r1",
        "character_id": "aria",
        "display_name": "Aria",
        "aud": "party_sync",
        "iat": now,
        "exp": now + 60,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


async def test_bad_tokens_are_refused_with_401_and_leave_no_trace() -> None:
    engine = ScriptedEngine()
    async with serve_in_process(engine=engine) as srv:
        cases = {
            "missing": {},
            "expired": {"token": jwt.encode(claims(exp=int(time.time()) - 120), SECRET)},
            "bad signature": {
                "token": jwt.encode(claims(), "another-secret-0123456789abcdef012345")
            },
            "wrong audience": {"token": jwt.encode(claims(aud="someone-else"), SECRET)},
            "no party": {"token": jwt.encode(claims(party_id=None), SECRET)},
            "no exp": {"token": jwt.encode(claims(exp=None), SECRET)},
            "alg none": {"token": jwt.encode(claims(), "", algorithm="none")},
            "garbage": {"token": "not-a-jwt"},
        }
        for name, params in cases.items():
            assert await srv.handshake_status(params) == 401, name
        assert engine.joins == []
        b, hello = await srv.join("borin")
        assert hello["payload"]["members"] == [
            {"character_id": "borin", "display_name": "Borin", "online": True}
        ]
        await b.close()


class _OffsetClock(MemoryBackend):
    """A backend whose clock (Redis's, in Redis mode) is ``offset`` seconds off this process's."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def clock(self) -> float:
        return time.time() + self.offset


@pytest.mark.parametrize("offset", [120.0, -120.0])
async def test_tokens_are_judged_by_the_clock_the_backend_keeps(offset: float) -> None:
    """Clock probe: the handshake checked exp/iat/nbf by the node's own clock, the open
    connection's expiry by Redis's. A node 2 min behind Redis refused fresh tokens as "not yet
    valid"; one 2 min ahead refused valid ones as expired, and one behind opened tokens long
    past exp and closed them at once (4001). Both now read the backend's clock."""
    backend = _OffsetClock(offset)
    async with serve_in_process(engine=ScriptedEngine(), backend=backend, dev_mode=True) as srv:
        now = int(backend.clock())
        fresh = jwt.encode(claims(iat=now, exp=now + 60), SECRET)
        async with srv.http.post(
            srv.base + "/api/v1/dev/token", json={"character_id": "cora"}
        ) as r:
            minted = (await r.json())["token"]  # a demo token: minted on that clock too
        for character, value in (("aria", fresh), ("cora", minted)):
            client, hello = await srv.join(character, token_value=value)
            assert hello["payload"]["you"] == character
            await client.send({"type": "system.ping", "payload": {}})
            await client.until("system.pong")  # open, not closed as expired
            await client.close()
        past = jwt.encode(claims(iat=now - 100, exp=now - 40), SECRET)  # beyond the leeway
        assert await srv.handshake_status({"token": past}) == 401


class _Unmeasured(_OffsetClock):
    """A Redis backend's clock before Redis first answered: this machine's, ``offset`` seconds
    off the deployment's, until ``known``."""

    def __init__(self, offset: float) -> None:
        super().__init__(offset)
        self.known = False

    def clock(self) -> float:
        return super().clock() if self.known else time.time()

    def clock_known(self) -> bool:
        return self.known


async def test_a_token_is_not_refused_for_good_before_the_backends_clock_is_read() -> None:
    """Clock probe: a node started while Redis was down judged tokens by its own clock, 2 min
    behind Redis's, and refused fresh ones 401 ("not yet valid"): the clients stop at a 401.
    Until the backend's clock is read such a token is answered 503 with Retry-After (clients
    try again), and accepted once it is; a token with nothing wrong with its times is not held."""
    backend = _Unmeasured(120.0)
    async with serve_in_process(engine=ScriptedEngine(), backend=backend) as srv:
        now = time.time() + backend.offset  # the deployment's clock, which minted it
        fresh = {"token": jwt.encode(claims(iat=int(now), exp=int(now) + 600), SECRET)}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await srv.http.ws_connect(srv.ws_url, params=fresh)
        assert refused.value.status == 503 and refused.value.headers is not None
        assert refused.value.headers["Retry-After"] == "1"
        bad = {"token": jwt.encode(claims(), "another-secret-0123456789abcdef012345")}
        assert await srv.handshake_status(bad) == 401  # a bad signature is bad whatever the time
        backend.known = True
        assert await srv.handshake_status(fresh) == 101


async def test_bearer_header_is_accepted() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        ws = await srv.http.ws_connect(
            srv.ws_url, headers={"Authorization": f"Bearer {token('aria')}"}
        )
        from ps_testkit.client import Client

        client = Client(ws)
        assert (await client.expect("system.hello"))["payload"]["you"] == "aria"
        await client.close()


async def test_which_token_counts_is_the_header_then_the_first_query_parameter() -> None:
    """As README, Tokens, says (a proxy checking tokens must check the same one): the Bearer
    header over ``?token=``, and the first of two ``token`` parameters."""
    from ps_testkit.client import Client

    async with serve_in_process(engine=ScriptedEngine()) as srv:
        both = await srv.http.ws_connect(
            srv.ws_url + "?token=" + token("borin"),
            headers={"Authorization": f"Bearer {token('aria')}"},
        )
        client = Client(both)
        assert (await client.expect("system.hello"))["payload"]["you"] == "aria"
        await client.close()
        two = await srv.http.ws_connect(f"{srv.ws_url}?token={token('borin')}&token=forged")
        client = Client(two)
        assert (await client.expect("system.hello"))["payload"]["you"] == "borin"
        await client.close()


async def test_previous_secret_still_verifies_during_rotation() -> None:
    old = "old-secret-0123456789abcdef0123456789abcd"
    settings = make_settings(jwt_previous_secret=old)
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        client = await srv.connect("aria", token_value=token("aria", secret=old))
        assert (await client.expect("system.hello"))["payload"]["you"] == "aria"
        await client.close()


async def test_origin_allowlist(caplog: pytest.LogCaptureFixture) -> None:
    from party_sync.transport import http as http_transport

    http_transport._ORIGINS_TOLD.clear()  # (told once per process: this test's own tellings)
    settings = make_settings(allowed_origins=("https://app.example",))
    async with serve_in_process(settings, engine=ScriptedEngine()) as srv:
        params = {"token": token("aria")}
        assert await srv.handshake_status(params, headers={"Origin": "https://evil.example"}) == 403
        assert await srv.handshake_status(params, headers={"Origin": "https://app.example"}) == 101
        assert await srv.handshake_status(params) == 101  # non-browser clients send no Origin
        # two Origin headers are no allowed origin, whichever comes first
        reader, writer = await asyncio.open_connection("127.0.0.1", int(srv.base.rsplit(":")[-1]))
        writer.write(
            (
                f"GET /ws?token={params['token']} HTTP/1.1\r\nHost: x\r\n"
                "Origin: https://app.example\r\nOrigin: https://evil.example\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ).encode()
        )
        status_line = await reader.readline()
        writer.close()
        assert status_line.split()[1] == b"403", status_line
    # each refusal said, and why: the two headers as such (docs probe: an origin "" was logged)
    told = {
        (getattr(r, "origin", None), r.getMessage().split(" (")[0])
        for r in caplog.records
        if r.getMessage().startswith("WebSocket handshake refused")
    }
    assert told == {
        ("https://evil.example", "WebSocket handshake refused: origin not in allowed_origins"),
        ("(several Origin headers)", "WebSocket handshake refused: several Origin headers"),
    }


async def test_a_websocket_version_other_than_13_is_answered_426_with_the_version_spoken() -> None:
    """RFC 6455 §4.2.2: drafts 7 and 8 (which aiohttp alone would upgrade) and unknown versions
    get 426 and ``Sec-WebSocket-Version: 13``; a version 13 upgrade is unaffected."""
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        base = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        url = f"{srv.ws_url.replace('ws://', 'http://')}?token={token('aria')}"
        for version in ("8", "7", "14", "abc"):
            async with srv.http.get(url, headers={**base, "Sec-WebSocket-Version": version}) as r:
                assert r.status == 426, version
                assert r.headers["Sec-WebSocket-Version"] == "13"
                assert "version 13" in await r.text()
        async with srv.http.get(url, headers={**base, "Sec-WebSocket-Version": "13"}) as r:
            assert r.status == 101
        assert await srv.handshake_status({"token": token("aria")}) == 101
        # none at all, or 13 named beside another (in either order: aiohttp reads the first),
        # or the header twice (RFC 6455 §11.3.5: not more than once in a request)
        port = int(srv.base.rsplit(":")[-1])
        for lines in (
            "",
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 8\r\n",
            "Sec-WebSocket-Version: 8\r\nSec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                (
                    f"GET /ws?token={token('aria')} HTTP/1.1\r\nHost: x\r\n"
                    f"Upgrade: websocket\r\nConnection: Upgrade\r\n{lines}"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                ).encode()
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            writer.close()
            assert head.split()[1] == "426", (lines, head)
            assert "Sec-WebSocket-Version: 13" in head
        # an upgrade without a key: 400, counted
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
        async with srv.http.get(url, headers=headers) as r:
            assert r.status == 400
        metrics = await (await srv.http.get(f"{srv.base}/metrics")).text()
        assert 'party_sync_handshakes_refused_total{status="426"} 8.0' in metrics
        assert 'party_sync_handshakes_refused_total{status="400"} 1.0' in metrics


async def test_an_upgrade_that_is_no_websocket_handshake_is_400_before_the_token_is_read() -> None:
    """Security probe: an upgrade without ``Sec-WebSocket-Key`` (or with one that is not the
    base64 of 16 bytes) was told 401 without a token, and with one, aiohttp's 400 "Handshake
    error: '<the client's key>'": docs/protocol.md says 400, before the token is read, like the
    426. The key is sent once (RFC 6455 §11.3.1); ``Connection`` names ``Upgrade`` (§4.2.1). The
    answer never repeats what the client sent."""
    async with serve_in_process(make_settings(), engine=ScriptedEngine()) as srv:
        port = int(srv.base.rsplit(":")[-1])

        async def status(query: str, lines: str) -> tuple[str, str]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                (
                    f"GET /ws{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    f"Sec-WebSocket-Version: 13\r\n{lines}\r\n"
                ).encode()
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            _, _, length = head.lower().partition("content-length:")
            size = int(length.split("\r\n")[0]) if length else 0  # (none on a 101)
            body = (await reader.readexactly(size)).decode() if size else ""
            writer.close()
            return head.split()[1], body

        good = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        upgrade = "Connection: Upgrade\r\n"
        for query in ("", f"?token={token('aria')}"):
            for lines in (
                upgrade,  # no key
                upgrade + "Sec-WebSocket-Key: shortKEYsaid\r\n",
                upgrade + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n",  # unpadded: no base64
                upgrade + "Sec-WebSocket-Key: QUFBQUFBQUFBQUFBQUFBQUFB\r\n",  # 18 bytes
                upgrade + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZ\u00e9==\r\n",  # not ASCII
                upgrade + good + good,  # twice
                "Connection: keep-alive\r\n" + good,  # Connection does not name Upgrade
                good,  # no Connection
            ):
                said, body = await status(query, lines)
                assert said == "400", (query, lines, said, body)
                assert "not a WebSocket handshake" in body, body
                assert "shortKEYsaid" not in body and "QUFB" not in body and "dGhl" not in body
        # a valid handshake is unaffected (Connection may name more than Upgrade)
        said, _ = await status(
            f"?token={token('aria')}", "Connection: keep-alive, Upgrade\r\n" + good
        )
        assert said == "101"
        assert (await status("", upgrade + good))[0] == "401"  # then the token is read
        metrics = await (await srv.http.get(f"{srv.base}/metrics")).text()
        assert 'party_sync_handshakes_refused_total{status="400"} 16.0' in metrics
