"""End to end against a real ``party-sync serve`` process, started the way a user starts it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from ps_testkit.client import Client, Closed
from ps_testkit.engines import HANGING_ENGINE, assert_stopped_in_budget
from ps_testkit.faults import poll
from ps_testkit.redis_server import RedisServer
from ps_testkit.security_raw import read_frame, ws_open
from ps_testkit.servers import (
    SECRET,
    free_port,
    party_sync_command,
    run_serve,
    serve_process,
    token,
)

pytestmark = pytest.mark.e2e


async def test_seed_flow_against_a_real_process_with_the_reference_engine() -> None:
    env = {"CAMPAIGN_ENGINE_SEED": "7"}
    async with serve_process(env=env) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        opening = await b.until("scene.update")
        assert opening["payload"]["scene_number"] == 1
        option = opening["payload"]["options"][0]["id"]
        await a.act("e2e-1", "aria", "r1", action_type="choice", payload={"option": option})
        result = await b.until("action.result")
        assert result["payload"]["action_id"] == "e2e-1"
        assert result["payload"]["outcome"] in {"success", "failure", "partial"}
        scene = await b.until("scene.update")
        assert scene["seq"] > result["seq"]
        await a.close()
        await b.close()


async def test_a_resend_after_a_restart_that_lost_the_ledger_gets_its_answer(
    tmp_path: Path,
) -> None:
    """The embedded server restarts (its ledger is gone, the reference engine's database is
    not); the client resends an action it had been answered for, as clients do after a
    reconnect. The new server takes it as new and the engine, which applied it already, answers
    it again: the same result, once, and the character can act again."""
    env = {
        "CAMPAIGN_ENGINE_SEED": "7",
        "CAMPAIGN_ENGINE_DATABASE_URL": f"sqlite:///{tmp_path / 'engine.sqlite3'}",
    }
    port = free_port()
    async with serve_process(env=env, port=port) as srv:
        a, _ = await srv.join("aria")
        opening = await a.until("scene.update")
        option = opening["payload"]["options"][0]["id"]
        choice = {"option": option}
        await a.act("lost-1", "aria", "r1", action_type="choice", payload=choice)
        first = (await a.until("action.result"))["payload"]
        await a.close()
    async with serve_process(env=env, port=port) as srv:
        a, _ = await srv.join("aria")
        await a.act("lost-1", "aria", "r1", action_type="choice", payload=choice)
        again = (await a.until("action.result", timeout=15))["payload"]
        assert again["action_id"] == "lost-1"
        assert (again["outcome"], again["narration"]) == (first["outcome"], first["narration"])
        await a.act("next-1", "aria", "r1")  # not busy: the lock went with the answer
        while True:
            message = await a.recv(timeout=15)
            if message["type"] == "system.error":
                assert message["payload"]["code"] != "character_busy", message
            if message["type"] == "action.result":
                assert message["payload"]["action_id"] == "next-1"
                break
        await a.close()


@pytest.mark.redis
async def test_seed_flow_on_redis_with_write_delays(redis: RedisServer) -> None:
    """``redis_write_delay`` (docs/redis.md) only holds script calls back, and
    ``client_write_delay`` the frames for the clients: the seed's flow, an action resent with its
    action_id, and the order of the events are as without them."""
    args = ["--redis-url", redis.url, "--engine-transport", "inprocess"]
    env = {
        "CAMPAIGN_ENGINE_SEED": "7",
        "PARTY_SYNC_REDIS_WRITE_DELAY": "0.005",
        "PARTY_SYNC_CLIENT_WRITE_DELAY": "0.005",
    }
    async with serve_process(args, env=env) as srv:
        a, _ = await srv.join("aria")
        b, _ = await srv.join("borin")
        opening = await b.until("scene.update")
        option = opening["payload"]["options"][0]["id"]
        await a.act("wd-1", "aria", "r1", action_type="choice", payload={"option": option})
        result = await b.until("action.result")
        scene = await b.until("scene.update")
        assert result["payload"]["action_id"] == "wd-1" and scene["seq"] == result["seq"] + 1
        mine = await a.until("action.result")
        assert mine["seq"] == result["seq"]
        # a resend: the recorded result again, nothing applied twice
        await a.act("wd-1", "aria", "r1", action_type="choice", payload={"option": option})
        again = await a.until("action.result")
        assert (again["seq"], again["payload"]) == (result["seq"], result["payload"])
        await a.close()
        await b.close()


async def close_code(client: Client) -> int | None:
    """The code the server closes ``client`` with (bounded wait)."""
    try:
        return await client.closed(timeout=10)
    except Closed as exc:
        return exc.code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_sigterm_tells_clients_to_reconnect_and_exits_cleanly(sig: signal.Signals) -> None:
    """SIGHUP (the terminal gone) ended the process at once: exit 129, no drain, clients got
    1006 instead of 1001 (operator probe). It drains as SIGTERM and SIGINT do."""
    async with serve_process() as srv:
        a, _ = await srv.join("aria")
        assert srv.process is not None
        srv.process.send_signal(sig)
        assert await close_code(a) == 1001
        returncode = await asyncio.to_thread(srv.process.wait, 15)
        assert returncode == 0


async def test_a_frozen_client_does_not_hold_the_drain_past_its_budget() -> None:
    """Re-check probe: a client frozen after its hello (its kernel takes the close frame, it
    never answers) held its close for 30 s: the drain overran shutdown_timeout and the process
    ended with exit code 1. Its close waits CLOSE_TIMEOUT for the answer, never past the
    drain's end: exit 0."""
    async with serve_process() as srv:
        frozen = await ws_open(srv.base, "/ws?token=" + token("aria"))
        async with asyncio.timeout(10):
            assert (await read_frame(frozen.reader)).opcode == 0x1  # its hello; then nothing
        assert srv.process is not None
        srv.process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(srv.process.wait, 30)
        await frozen.close()
        assert returncode == 0


async def test_a_slow_reader_does_not_hold_the_drain_past_its_budget() -> None:
    """A client that keeps reading, slowly, behind a backlog of megabytes: its close may wait
    while it makes progress (its 4002 or 1001 reaches it), but never past the drain's budget
    (README: "exits 0 after at most PARTY_SYNC_SHUTDOWN_TIMEOUT")."""
    key = "api-key-drain-0123456789abcdef0123"
    args = ["--api-key", key, "--shutdown-timeout", "2", "--send-buffer-bytes", str(16 << 20)]
    async with serve_process(args) as srv:
        slow = await ws_open(srv.base, "/ws?token=" + token("aria"), rcvbuf=4096, limit=1 << 16)
        async with asyncio.timeout(10):
            assert (await read_frame(slow.reader)).opcode == 0x1  # its hello
        pad = {"pad": "x" * 60_000}
        payload = {"status": "drain", "run_status": "in_progress", "flags": pad}
        event = {"type": "party.state", "payload": payload}
        headers = {"Authorization": f"Bearer {key}"}
        for _ in range(60):  # about 3.6 MB for it: minutes at its pace
            url = srv.base + "/api/v1/parties/p1/events"
            async with srv.http.post(url, json=event, headers=headers) as resp:
                assert resp.status == 202, await resp.text()

        async def read_slowly() -> None:
            with contextlib.suppress(Exception):
                for _ in range(10_000):
                    if (await read_frame(slow.reader)).opcode == 0x8:
                        return
                    await asyncio.sleep(0.5)  # about 120 KB/s (pacing, not a wait)

        reading = asyncio.create_task(read_slowly())
        assert srv.process is not None
        srv.process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(srv.process.wait, 30)
        reading.cancel()
        await slow.close()
        assert returncode == 0


@pytest.mark.parametrize("leak", [False, True, "swallow"])
async def test_sigterm_mid_action_exits_within_the_budget(tmp_path: Path, leak: bool | str) -> None:
    """The in-process engine busy with an action at SIGTERM is cancelled and closed (its thread
    ends: exit 0 within shutdown_timeout); an engine whose thread never ends, or whose call
    swallows its cancellation, cannot hold the process past shutdown_timeout + EXIT_GRACE
    (2 s): exit 1, with an ERROR naming the thread or the coroutine (engine probe: it named only
    the main thread)."""
    (tmp_path / "ps_hanging_engine.py").write_text(HANGING_ENGINE)
    env = {"PYTHONPATH": str(tmp_path), "PARTY_SYNC_SHUTDOWN_TIMEOUT": "1"}
    if leak == "swallow":
        env["SWALLOW"] = "1"
    elif leak:
        env["LEAK"] = "1"
    args = ["--engine", "ps_hanging_engine:create_engine"]
    async with serve_process(args, env=env) as srv:
        a, _ = await srv.join("aria")
        await a.act("a-1", "aria", "r1")
        await a.expect("action.accepted")
        assert srv.process is not None
        signalled = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(srv.process.wait, 15)
        took = time.monotonic() - signalled
        assert srv.process.stderr is not None
        log = srv.process.stderr.read().decode()
    named = "Engine.handle_action" if leak == "swallow" else "engine-db"
    assert_stopped_in_budget(returncode, took, log, bool(leak), named)


async def test_a_secret_short_for_its_algorithm_is_warned_of_at_start_and_the_log_stays_json() -> (
    None
):
    """Docs probe: a 40-byte secret passed the start check (32 bytes) though HS512 wants 64,
    and PyJWT's own InsecureKeyLengthWarning then printed two plain-text lines into the JSON
    log at the first token. Now the start warning knows each algorithm's hash size, and no
    library warning reaches stderr as raw text."""
    from party_sync.auth import issue_token

    secret = "q" * 40
    env = {"PARTY_SYNC_JWT_SECRET": secret, "PARTY_SYNC_JWT_ALGORITHMS": "HS512"}
    async with serve_process(env=env) as srv:
        signed = issue_token(
            secret,
            party_id="p1",
            campaign_run_id="r1",
            character_id="aria",
            display_name="Aria",
            now=time.time(),
            algorithm="HS512",
        )
        a, _ = await srv.join("aria", token_value=signed)
        await a.close()
        assert srv.process is not None
        srv.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(srv.process.wait, 15) == 0
        assert srv.process.stderr is not None
        lines = srv.process.stderr.read().decode().splitlines()
    entries = [orjson.loads(line) for line in lines]  # every line a JSON object
    assert any("use at least 64 random bytes for HS512" in e["msg"] for e in entries), lines
    assert not any(secret in line for line in lines)


async def test_token_command_mints_a_token_the_server_accepts() -> None:
    proc = await asyncio.create_subprocess_exec(
        *party_sync_command(),
        "token",
        "--party",
        "p1",
        "--run",
        "r1",
        "--character",
        "cora",
        "--name",
        "Cora",
        "--ttl",
        "60",
        env={**os.environ, "PARTY_SYNC_JWT_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    async with serve_process() as srv:
        client = await srv.connect("cora", token_value=out.decode().strip())
        hello = await client.expect("system.hello")
        assert hello["payload"]["you"] == "cora"
        assert hello["payload"]["members"][0]["display_name"] == "Cora"
        await client.close()


def test_token_command_without_a_secret_fails_clearly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PARTY_SYNC_JWT_SECRET"}
    proc = subprocess.run(
        [
            *party_sync_command(),
            "token",
            "--party",
            "p",
            "--run",
            "r",
            "--character",
            "c",
            "--name",
            "C",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,  # no development secret kept here either
    )
    assert proc.returncode == 2
    assert "PARTY_SYNC_JWT_SECRET" in proc.stderr


def test_a_bad_setting_is_a_clear_configuration_error() -> None:
    proc = run_serve("--engine", "nonexistent_module:thing")
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr and "nonexistent_module" in proc.stderr
    assert sys.executable  # the same interpreter as the tests


def test_a_port_in_use_is_one_clear_line_and_exit_code_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_serve(port=port)
    assert proc.returncode == 1
    assert f"party-sync: cannot listen on 127.0.0.1:{port}: " in proc.stderr
    assert "in use" in proc.stderr and "Traceback" not in proc.stderr


async def test_dev_mode_serve_prints_two_ready_urls_that_work(tmp_path: Path) -> None:
    """``make run``: two demo-page URLs, one per character, each opening a playable page whose
    token joins the same party; in development mode the page may also mint tokens."""
    env = {k: v for k, v in os.environ.items() if k != "PARTY_SYNC_JWT_SECRET"}
    from ps_testkit.servers import free_port

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *party_sync_command(),
        "serve",
        "--port",
        str(port),
        "--demo-tokens",
        env={**env, "PARTY_SYNC_LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,  # its development secret and the engine's database stay out of the tree
    )
    try:
        assert proc.stdout is not None
        urls: list[str] = []
        async with asyncio.timeout(20):
            while len(urls) < 2:
                line = (await proc.stdout.readline()).decode()
                assert line, "serve exited before printing its URLs"
                if "/demo?token=" in line:
                    urls.append(line.split()[-1])
        import aiohttp
        from ps_testkit.client import Client
        from yarl import URL

        base = f"http://127.0.0.1:{port}"
        assert all(url.startswith(base + "/demo?token=") for url in urls)
        async with aiohttp.ClientSession() as http:
            tokens = []
            for url in urls:
                async with http.get(url) as resp:  # the page itself
                    assert resp.status == 200
                    assert resp.content_type == "text/html"
                tokens.append(URL(url).query["token"])
            clients = [
                Client(await http.ws_connect(f"ws://127.0.0.1:{port}/ws", params={"token": t}))
                for t in tokens
            ]
            hellos = [await c.expect("system.hello") for c in clients]
            assert {h["payload"]["you"] for h in hellos} == {"aria", "borin"}
            assert len({h["payload"]["party_id"] for h in hellos}) == 1
            for c in clients:
                await c.close()
            async with http.post(f"{base}/api/v1/dev/token", json={"character_id": "cora"}) as r:
                assert r.status == 200  # development mode: the page can pick a character
                minted = (await r.json())["token"]
            cora = Client(await http.ws_connect(f"ws://127.0.0.1:{port}/ws?token={minted}"))
            assert (await cora.expect("system.hello"))["payload"]["party_id"] == "demo-party"
            await cora.close()
        assert proc.stderr is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


def dev_env() -> dict[str, str]:
    """As a user runs ``make run``: no secret, the reference engine's default database (in the
    working directory, where the suite's ``memory://`` is not)."""
    unset = ("PARTY_SYNC_JWT_SECRET", "CAMPAIGN_ENGINE_DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return {**env, "PARTY_SYNC_LOG_LEVEL": "INFO", "CAMPAIGN_ENGINE_SEED": "7"}


@contextlib.asynccontextmanager
async def dev_server(cwd: Path, *extra: str) -> AsyncIterator[DevServer]:
    """``party-sync serve --demo-tokens`` in ``cwd`` in development mode (as ``make run``)."""
    from ps_testkit.servers import free_port

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *party_sync_command(),
        "serve",
        "--port",
        str(port),
        "--demo-tokens",
        *extra,
        env=dev_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    assert proc.stdout is not None
    server = DevServer(port)
    try:
        async with asyncio.timeout(20):
            while len(server.tokens) < 2:
                line = (await proc.stdout.readline()).decode()
                assert line, "serve exited before printing its URLs"
                if "/demo?token=" in line:
                    server.tokens.append(line.split("token=")[-1].strip())
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await proc.communicate()
        server.log = err.decode()


@dataclass
class DevServer:
    port: int
    tokens: list[str] = field(default_factory=list)
    log: str = ""  # what it logged (stderr), once stopped


async def handshake(port: int, token: str) -> int:
    """The HTTP status of a WebSocket handshake with ``token`` (101: accepted)."""
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(f"ws://127.0.0.1:{port}/ws", params={"token": token})
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def test_make_run_links_survive_a_restart_until_a_new_game(tmp_path: Path) -> None:
    """``make run`` twice, and the first run's links still work; ``--new-game`` ends
    them and discards the reference engine's database."""
    async with dev_server(tmp_path) as first:
        pass
    kept = tmp_path / ".party_sync_dev_secret"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert "new, kept in" in first.log
    assert (tmp_path / "campaign_engine.sqlite3").exists()

    async with dev_server(tmp_path) as second:
        assert await handshake(second.port, first.tokens[0]) == 101  # works after a restart
        recipe = ("token", "--party", "p1", "--run", "r1", "--character", "cora", "--name", "C")
        token = await asyncio.create_subprocess_exec(  # in the directory of `make run`
            *party_sync_command(),
            *recipe,
            env=dev_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
        out, err = await token.communicate()
        assert token.returncode == 0
        assert b"development secret" in err
        assert await handshake(second.port, out.decode().strip()) == 101
    assert "earlier links still work" in second.log

    async with dev_server(tmp_path, "--new-game") as third:
        assert await handshake(third.port, first.tokens[0]) == 401  # a new game: links gone
        assert await handshake(third.port, third.tokens[0]) == 101
    assert "a new game starts" in third.log
    assert "campaign_engine.sqlite3" in third.log  # it says what it discarded
    for value in orjson.loads(kept.read_bytes()).values():
        for server in (first, second, third):
            assert value not in server.log  # the secret and the key are never logged


async def test_new_game_on_a_port_in_use_discards_nothing(tmp_path: Path) -> None:
    """``make run NEW_GAME=1`` while ``make run`` is still up: refused for the port before
    anything is discarded or written (it removed the running server's secret and database,
    then could not listen: the running server's links and the engine's game were lost)."""
    async with dev_server(tmp_path) as running:
        secret = (tmp_path / ".party_sync_dev_secret").read_bytes()
        database = (tmp_path / "campaign_engine.sqlite3").stat().st_ino
        second = await asyncio.create_subprocess_exec(
            *party_sync_command(),
            "serve",
            "--port",
            str(running.port),
            "--new-game",
            env=dev_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
        async with asyncio.timeout(20):
            _, err = await second.communicate()
        assert second.returncode == 1
        assert "address already in use" in err.decode().lower()
        assert "a new game starts" not in err.decode()
        assert "DEVELOPMENT" not in err.decode()  # refused before the banner, too
        assert (tmp_path / ".party_sync_dev_secret").read_bytes() == secret
        assert (tmp_path / "campaign_engine.sqlite3").stat().st_ino == database
        assert await handshake(running.port, running.tokens[0]) == 101


@pytest.mark.redis
async def test_start_up_log_names_the_backend_and_the_stream_transport(
    redis: RedisServer,
) -> None:
    from ps_testkit.servers import free_port

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *party_sync_command(),
        "serve",
        "--port",
        str(port),
        "--redis-url",
        redis.url,
        env={**os.environ, "PARTY_SYNC_JWT_SECRET": SECRET, "PARTY_SYNC_LOG_LEVEL": "INFO"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "serve exited before it served"
                if "party_sync serving" in line:
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    entry = orjson.loads(line)
    assert entry["engine_transport"] == "stream"
    assert entry["engine"] == f"Redis stream party_sync:actions on {redis.url}"
    assert entry["backend"] == f"redis {redis.url}"
    assert "campaign_engine" not in line


@pytest.mark.redis
@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "action-in-flight"])
async def test_sigterm_during_a_redis_stall_says_1001_and_exits_within_the_shutdown_timeout(
    redis: RedisServer, in_flight: bool
) -> None:
    """README: 1001 to every client and "exits 0 after at most PARTY_SYNC_SHUTDOWN_TIMEOUT".
    Redis is stopped (SIGSTOP): what the shutdown still asks of it (forget the node, close the
    backend) gets what is left of the budget, not a command timeout (5 s) each. With a player's
    action waiting on the stalled Redis (workers probe), its 1001 waited for that call's command
    timeout: with a shutdown_timeout below it, the players got no close frame (1006), and the
    node's last heartbeat then held the exit past the budget (exit 1; a worker of ``--workers``
    was killed for it)."""
    env = {"PARTY_SYNC_SHUTDOWN_TIMEOUT": "3", "PARTY_SYNC_REDIS_COMMAND_TIMEOUT": "5"}
    async with serve_process(["--redis-url", redis.url], env=env) as srv:
        a, _ = await srv.join("aria")
        assert srv.process is not None and redis._proc is not None
        os.kill(redis._proc.pid, signal.SIGSTOP)
        try:
            if in_flight:
                await a.act("stalled", "aria", "r1")  # its handler waits on Redis

                async def handled() -> bool:  # (counted as its handling begins)
                    async with srv.http.get(srv.base + "/metrics") as resp:
                        text = await resp.text()
                    return 'party_sync_messages_in_total{type="action.request"} 1.0' in text

                await poll(handled, 5.0, "the action received")
            started = time.monotonic()
            srv.process.send_signal(signal.SIGTERM)
            assert await close_code(a) == 1001
            assert time.monotonic() - started < 2.0  # not after the command timeout (5 s)
            # exit 0 within the budget (3 s) and some slack: not the drain's 3 s, then aiohttp's
            # own wait, then a command timeout (5 s) per step; not the watchdog's exit 1 at 5 s
            assert await asyncio.to_thread(srv.process.wait, 4.5) == 0
        finally:
            os.kill(redis._proc.pid, signal.SIGCONT)
