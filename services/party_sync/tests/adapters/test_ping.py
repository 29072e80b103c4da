"""``system.ping`` → ``system.pong``: to the asking connection only, and nothing else changes."""

from __future__ import annotations

import pytest
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import serve_in_process

pytestmark = pytest.mark.usefixtures("backend_kind")  # memory and redis


async def test_a_ping_gets_a_pong_with_its_trace_id_on_its_own_connection_only() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("bram")
        await a.expect("party.join")  # bram's
        await a.send({"type": "system.ping", "trace_id": "ping-a-1", "payload": {}})
        pong = await a.expect("system.pong")
        assert pong["trace_id"] == "ping-a-1" and pong["payload"] == {} and "seq" not in pong
        await a.send({"type": "system.ping", "payload": {}})  # no trace id: one is made for it
        assert (await a.expect("system.pong"))["trace_id"]
        # bram's next message is the pong of his own ping: aria's two never reached him
        await b.send({"type": "system.ping", "trace_id": "ping-b-1", "payload": {}})
        first = await b.recv()
        assert (first["type"], first["trace_id"]) == ("system.pong", "ping-b-1")
        # a ping with a payload, or a pong from a client, is refused and the link stays usable
        await a.send({"type": "system.ping", "trace_id": "ping-a-2", "payload": {"x": 1}})
        assert (await a.expect("system.error"))["payload"]["code"] == "schema_violation"
        await a.send({"type": "system.pong", "payload": {}})
        assert (await a.expect("system.error"))["payload"]["code"] == "server_only_type"
        await a.send({"type": "system.ping", "trace_id": "ping-a-3", "payload": {}})
        assert (await a.expect("system.pong"))["trace_id"] == "ping-a-3"
        await a.close()
        await b.close()
