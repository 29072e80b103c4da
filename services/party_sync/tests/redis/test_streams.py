"""The Redis Streams engine transport: engines in their own processes (docs/engines.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from party_sync.backends.keys import ACTIONS_STREAM
from party_sync.engine.interface import RestateNotice
from party_sync.engine.stream_link import StreamEngineLink
from ps_testkit.client import wait_until
from ps_testkit.cluster import TESTS_DIR, Cluster, assert_ordered
from ps_testkit.engines import engine_calls, engine_restates
from ps_testkit.servers import party_sync_command
from redis.asyncio import Redis

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

STREAM = ("--engine-transport", "stream")


async def _lengths(r: Redis, streams: Sequence[str]) -> list[int]:
    return [int(await r.xlen(name)) for name in streams]


async def until_redis(
    cluster: Cluster, read: Callable[[Redis], Awaitable[Any]], expected: Any, timeout: float = 15
) -> None:
    """Until ``read`` (of the cluster's Redis) returns ``expected``: a bounded poll of state in
    another process, with no event to await."""
    redis = Redis.from_url(cluster.redis.url)
    try:
        async with asyncio.timeout(timeout):
            while await read(redis) != expected:  # noqa: ASYNC110 (a bounded poll)
                await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


@contextlib.contextmanager
def worker(
    cluster: Cluster,
    *extra: str,
    engine: str = "ps_testkit.engines:node_engine",
    env_extra: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``party-sync engine-worker`` on the cluster's Redis, as its own process."""
    env = {
        **os.environ,
        **(env_extra or {}),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p
        ),
        "PS_ENGINE_DIR": str(cluster.engine_dir),
        "PARTY_SYNC_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [*party_sync_command(), "engine-worker", engine, "--redis-url", cluster.redis.url, *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def test_seed_flow_with_the_engine_in_a_worker_process(cluster: Cluster) -> None:
    async with cluster.node(*STREAM) as node:
        with worker(cluster):
            a, _ = await node.join("aria")
            b, _ = await node.join("borin")
            await a.expect("party.join")
            await a.act("s-1", "aria", "r1", trace_id="trace-stream-1")
            result = await b.expect("action.result")
            scene = await b.expect("scene.update")
            assert result["payload"]["action_id"] == "s-1"
            assert result["trace_id"] == scene["trace_id"] == "trace-stream-1"
            assert engine_calls(cluster.engine_dir) == ["s-1"]
            assert_ordered(b)
            await a.close()
            await b.close()


async def test_reference_engine_in_a_worker_records_the_decision_in_its_chronicle(
    cluster: Cluster, tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path / 'engine.sqlite3'}"
    env = {"CAMPAIGN_ENGINE_DATABASE_URL": database, "CAMPAIGN_ENGINE_SEED": "11"}
    async with cluster.node(*STREAM) as node:
        with worker(cluster, engine="campaign_engine:create_engine", env_extra=env):
            a, _ = await node.join("aria")
            b, _ = await node.join("borin")
            opening = await b.until("scene.update", timeout=15)  # the join reached the worker
            option = opening["payload"]["options"][0]["id"]
            await a.act(
                "c-1",
                "aria",
                "r1",
                action_type="choice",
                payload={"option": option},
                trace_id="trace-chronicle",
            )
            result = await b.until("action.result", timeout=15)
            assert result["payload"]["action_id"] == "c-1"
            await b.until("scene.update")
            await a.close()
            await b.close()
    chronicle = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "campaign_engine",
            "chronicle",
            "r1",
            "--json",
            "--database-url",
            database,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    entries = orjson.loads(chronicle.stdout)
    decisions = [d for d in _walk(entries) if isinstance(d, dict) and d.get("action_id") == "c-1"]
    assert decisions, chronicle.stdout[:2000]
    assert decisions[0]["trace_id"] == "trace-chronicle"


def _walk(node: object) -> Iterator[object]:
    """Every value in a JSON document (the chronicle's layout is the engine's own)."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


async def wait_for_stream_read(cluster: Cluster, timeout: float = 15.0) -> None:
    """Until the workers' group has read every entry of the actions stream and acked them all."""
    client = Redis.from_url(cluster.redis.url)
    try:
        async with asyncio.timeout(timeout):
            while True:
                groups = await client.xinfo_groups(ACTIONS_STREAM)
                group = groups[0] if groups else {}
                read = group.get("last-delivered-id", b"0-0") != b"0-0"
                if read and group["pending"] == 0 and group["lag"] == 0:
                    return
                await asyncio.sleep(0.02)  # polling Redis state (another process), bounded
    finally:
        await client.aclose()


async def test_an_action_timed_out_while_no_engine_runs_is_never_applied_later(
    cluster: Cluster,
) -> None:
    """A timeout is final: the player told ``action_timeout`` (no worker running) must never see
    the action applied when a worker starts later; a resend gets the same final answer."""
    async with cluster.node(*STREAM, "--action-timeout", "0.3") as node:
        a, _ = await node.join("aria")
        await a.act("w-1", "aria", "r1")
        err = await a.expect("system.error")
        assert err["payload"]["code"] == "action_timeout"
        assert err["payload"]["in_reply_to"]["action_id"] == "w-1"
        await a.act("w-1", "aria", "r1")  # the resend gets the final answer again
        again = await a.expect("system.error")
        assert again["payload"]["code"] == "action_timeout"
        with worker(cluster):
            await wait_for_stream_read(cluster)  # the worker has read "w-1" (and acked it)
            await a.act("w-2", "aria", "r1")
            result = await a.expect("action.result", timeout=15)
            assert result["payload"]["action_id"] == "w-2"
        # One worker reads the stream in order: "w-1" came first and was skipped, not applied.
        assert engine_calls(cluster.engine_dir) == ["w-2"]
        await a.close()


async def test_a_worker_killed_holding_an_action_is_taken_over_and_the_result_sent_once(
    cluster: Cluster,
) -> None:
    async with cluster.node(*STREAM) as node:
        a, _ = await node.join("aria")
        b, _ = await node.join("borin")
        await a.expect("party.join")
        with worker(cluster, "--claim-idle", "1") as first:
            await a.act("held", "aria", "r1", payload={"hold": True})
            await wait_until(lambda: engine_calls(cluster.engine_dir) == ["held"], timeout=10)
            first.send_signal(signal.SIGKILL)  # dies holding the action: never acknowledged
            await asyncio.to_thread(first.wait, 10)
        with worker(cluster, "--claim-idle", "1"):
            await wait_until(
                lambda: engine_calls(cluster.engine_dir) == ["held", "held"], timeout=15
            )
            (Path(cluster.engine_dir) / "release-held").touch()
            result = await b.expect("action.result", timeout=10)
            assert result["payload"]["action_id"] == "held"
            await b.expect("scene.update")
            await a.act("after", "aria", "r1")
            nxt = await b.expect("action.result", timeout=10)  # no second result for "held"
            assert nxt["payload"]["action_id"] == "after"
            assert_ordered(b)
        await a.close()
        await b.close()


async def test_engine_rejections_from_a_worker_reach_the_player(cluster: Cluster) -> None:
    async with cluster.node(*STREAM) as node:
        with worker(cluster, engine="campaign_engine:create_engine"):
            a, _ = await node.join("aria")
            await a.act("bad-1", "aria", "r1", action_type="choice", payload={"option": "nope"})
            err = await a.until("system.error", timeout=15)
            assert err["payload"]["code"] == "action_rejected"
            assert err["payload"]["in_reply_to"]["action_id"] == "bad-1"
            await a.close()


async def test_an_engine_worker_process_outlives_redis_down_at_start_and_an_empty_restart(
    cluster: Cluster,
) -> None:
    """A Redis outage: the worker neither exits while Redis is down nor stops consuming
    when Redis comes back empty (its consumer group gone); restate notices reach the engine."""
    redis = cluster.redis
    await asyncio.to_thread(redis.stop)
    with worker(cluster) as proc:
        assert proc.stderr is not None
        async with asyncio.timeout(15):  # it runs, and says once that the stream is unavailable
            while b"actions stream unavailable" not in (
                line := await asyncio.to_thread(proc.stderr.readline)
            ):
                assert line, "the worker exited"
        await asyncio.to_thread(redis.start)
        link = StreamEngineLink(redis.url, ACTIONS_STREAM, 1000)
        try:
            await link.notify_restate(RestateNotice("p1", "r1", "epoch-1", "trace-re-1"))
            await wait_until(lambda: engine_restates(cluster.engine_dir) == ["p1 epoch-1"], 15)
            await asyncio.to_thread(redis.restart)  # empty: no stream, no group
            await link.notify_restate(RestateNotice("p1", "r1", "epoch-2", "trace-re-2"))
            await wait_until(
                lambda: engine_restates(cluster.engine_dir) == ["p1 epoch-1", "p1 epoch-2"], 15
            )
        finally:
            await link.close()
        assert proc.poll() is None


PARTITIONS = ("--actions-stream-partitions", "3")


async def test_a_node_and_a_worker_process_on_three_partitions(cluster: Cluster) -> None:
    """``serve`` and ``engine-worker`` given the same count: the parties' actions go to their
    partitions (several of them), every one is answered; a worker given another count refuses to
    start, naming the nodes' count."""
    from party_sync.engine.partitions import partition_of, stream_names

    parties = [f"pp-{n}" for n in range(6)]
    streams = stream_names(ACTIONS_STREAM, 3)
    assert len({partition_of(p, 3) for p in parties}) == 3  # every partition has a party
    async with cluster.node(*STREAM, *PARTITIONS) as node:
        with worker(cluster, *PARTITIONS):
            for n, party in enumerate(parties):
                a, _ = await node.join("aria", party=party)
                await a.act(f"pa-{n}", "aria", "r1")
                result = await a.until("action.result", timeout=15)
                assert result["payload"]["action_id"] == f"pa-{n}"
                await a.close()
            # the worker deletes an entry once it has handled it, a moment after the result
            # went out (a stop at once, on a loaded machine, found one left: [1, 0, 0])
            await until_redis(cluster, lambda r: _lengths(r, streams), [0, 0, 0])
        redis = Redis.from_url(cluster.redis.url)
        try:
            # entries ever added to each (the worker deleted the ones it handled)
            lengths = [int((await redis.xinfo_stream(name))["entries-added"]) for name in streams]
            assert [int(await redis.xlen(name)) for name in streams] == [0, 0, 0]
            assert await redis.xlen(ACTIONS_STREAM) == 0
            assert await redis.get(f"{ACTIONS_STREAM}:partitions") == b"3"
        finally:
            await redis.aclose()
        assert all(length > 0 for length in lengths), lengths
        assert sorted(engine_calls(cluster.engine_dir)) == sorted(f"pa-{n}" for n in range(6))
        with worker(cluster) as wrong:  # one partition, as by default
            code = await asyncio.to_thread(wrong.wait, 20)
            assert wrong.stderr is not None
            error = wrong.stderr.read().decode()
        assert code == 2, error
        assert "--actions-stream-partitions 3" in error


async def test_a_deployment_under_its_own_prefix_and_stream_beside_the_default_one(
    cluster: Cluster,
) -> None:
    """docs/redis.md, ``redis_prefix``: deployments sharing a Redis each set their own prefix and
    actions stream; ``engine-worker --redis-prefix`` answers in its nodes' keys. A worker of the
    default deployment runs beside it and takes none of its actions."""
    own = ("--redis-prefix", "otherdep", "--actions-stream", "otherdep:actions")
    async with cluster.node(*STREAM, *own) as node:
        with (
            worker(cluster),
            worker(cluster, "--redis-prefix", "otherdep", "--stream", "otherdep:actions"),
        ):
            a, _ = await node.join("aria", party="op-1")
            await a.act("op-act", "aria", "r1")
            result = await a.until("action.result", timeout=15)
            assert result["payload"]["action_id"] == "op-act"
            await a.act("op-act", "aria", "r1")  # its record, in this prefix, holds the answer
            again = await a.until("action.result", timeout=10)
            assert again["payload"] == result["payload"]
            await a.close()
            # the default worker has made its stream (on a loaded machine it had not started
            # yet when the test was over: "no such key")
            await until_redis(cluster, lambda r: r.exists(ACTIONS_STREAM), 1)
        redis = Redis.from_url(cluster.redis.url)
        try:
            assert await redis.keys("otherdep:{party:op-1}:*")
            assert not await redis.keys("party_sync:*{party:op-1}*")
            assert int((await redis.xinfo_stream("otherdep:actions"))["entries-added"]) > 0
            # the default deployment's stream (its worker made it): nothing ever added
            assert int((await redis.xinfo_stream(ACTIONS_STREAM))["entries-added"]) == 0
        finally:
            await redis.aclose()
