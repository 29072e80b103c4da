#!/usr/bin/env python3
"""Side-by-side client-CPU benchmark: redis-py asyncio RedisCluster vs coredis RedisCluster.

Why party_sync uses redis-py's asyncio ``RedisCluster`` and not coredis (docs/redis.md, "Redis
Cluster", "The client"). Not part of ``make bench``: coredis is not a dependency, so run it from
a venv of its own, against a running three-master cluster (ports of your choice):

    python3 -m venv /tmp/cc && /tmp/cc/bin/pip install redis==8.1.0 hiredis coredis
    for p in 17101 17102 17103; do redis-server --port $p --cluster-enabled yes \
        --cluster-config-file /tmp/nodes-$p.conf --save '' --appendonly no --daemonize yes; done
    redis-cli --cluster create 127.0.0.1:17101 127.0.0.1:17102 127.0.0.1:17103 \
        --cluster-replicas 0 --cluster-yes
    /tmp/cc/bin/python bench/cluster_clients.py --ports 17101,17102,17103 --reps 5

Every measurement runs in a fresh worker subprocess per (client, test); inside it one
warm-up pass is done, then --reps timed passes.  CPU is time.process_time() of the
worker process (user+sys of the client only); wall is time.perf_counter().
The publisher for the pub/sub test is a separate process (plain redis-py sync
connections, one per shard, pipelined SPUBLISH) and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LUA = "redis.call('INCR', KEYS[1]); return redis.call('GET', KEYS[1])"
PIPE_LEN = 64
N_KEYS = 1000  # keys {party:0} .. {party:999}
N_CHANNELS = 100  # channels party:0 .. party:99
PAYLOAD = b"x" * 100


def key(i: int) -> str:
    return f"{{party:{i % N_KEYS}}}"


def channels() -> list[str]:
    return [f"party:{i}" for i in range(N_CHANNELS)]


# --------------------------------------------------------------------------- helpers
def slot_owner_map(ports: list[int]) -> dict[int, int]:
    """slot -> port, from CLUSTER SLOTS (sync redis-py)."""
    import redis

    r = redis.Redis(port=ports[0])
    out: dict[int, int] = {}
    for start, end, primary, *_ in r.execute_command("CLUSTER SLOTS"):
        for s in range(start, end + 1):
            out[s] = int(primary[1])
    r.close()
    return out


def spread(names: list[str], ports: list[int]) -> dict[int, int]:
    from redis.crc import key_slot

    owner = slot_owner_map(ports)
    counts: dict[int, int] = dict.fromkeys(ports, 0)
    for n in names:
        counts[owner[key_slot(n.encode())]] += 1
    return counts


# --------------------------------------------------------------------------- publisher
def publisher_main(ports: list[int]) -> None:
    """Reads 'N' lines on stdin; publishes N SPUBLISH messages round-robin over the
    channels, each to the shard owning the channel's slot; answers 'done'."""
    import redis
    from redis.crc import key_slot

    owner = slot_owner_map(ports)
    conns = {p: redis.Redis(port=p) for p in ports}
    chans = channels()
    chan_port = [owner[key_slot(c.encode())] for c in chans]
    for line in sys.stdin:
        n = int(line)
        pipes = {p: c.pipeline(transaction=False) for p, c in conns.items()}
        queued = 0
        for i in range(n):
            ci = i % N_CHANNELS
            pipes[chan_port[ci]].execute_command("SPUBLISH", chans[ci], PAYLOAD)
            queued += 1
            if queued == 600:
                for p in pipes.values():
                    p.execute()
                queued = 0
        for p in pipes.values():
            p.execute()
        print("done", flush=True)


# --------------------------------------------------------------------------- redis-py
async def rp_client(ports):
    from redis.asyncio import RedisCluster

    rc = RedisCluster(host="127.0.0.1", port=ports[0])
    await rc.initialize()
    return rc


async def rp_script_pipeline(ports, n_pipes, reps):
    rc = await rp_client(ports)
    sha = await rc.script_load(LUA)
    # redis-py 8.1.0 blocks ClusterPipeline.evalsha(); record the error, then use
    # execute_command("EVALSHA", ...) which the cluster pipeline routes by key slot.
    note = None
    try:
        rc.pipeline(transaction=False).evalsha(sha, 1, key(0))
    except Exception as e:
        note = f"pipe.evalsha() -> {type(e).__name__}: {e}"

    async def one_pass():
        k = 0
        last = None
        for _ in range(n_pipes):
            pipe = rc.pipeline(transaction=False)
            for _ in range(PIPE_LEN):
                pipe.execute_command("EVALSHA", sha, 1, key(k))
                k += 1
            last = await pipe.execute()
        assert len(last) == PIPE_LEN and int(last[0]) > 0, last[:3]

    res = await timed(one_pass, reps, n_pipes * PIPE_LEN)
    res["note"] = note
    await rc.aclose()
    return res


def one_by_one(script, n):
    """A pass of ``n`` script calls, each awaited before the next (both clients' script objects
    are called as ``script(keys=[...])``)."""

    async def one_pass():
        r = None
        for i in range(n):
            r = await script(keys=[key(i)])
        assert int(r) > 0

    return one_pass


async def rp_script_single(ports, n, reps):
    rc = await rp_client(ports)
    res = await timed(one_by_one(rc.register_script(LUA), n), reps, n)
    await rc.aclose()
    return res


async def rp_pubsub(ports, n_msgs, reps, mode):
    """mode 'per_node': one task per shard, get_sharded_message(target_node=..., timeout=1)
    mode 'rr': single loop get_sharded_message(timeout=0.01) (library round-robin)."""
    rc = await rp_client(ports)
    ps = rc.pubsub()
    await ps.ssubscribe(*channels())
    nodes = rc.get_primaries()
    state = {"count": 0, "target": 0}
    done = asyncio.Event()

    def on_msg(m):
        if m is not None and m["type"] in ("smessage", b"smessage"):
            state["count"] += 1
            if state["count"] >= state["target"]:
                done.set()

    # drain subscribe confirmations
    for node in nodes:
        while await ps.get_sharded_message(target_node=node, timeout=0.2) is not None:
            pass

    async def per_node_reader(node):
        while True:
            on_msg(
                await ps.get_sharded_message(
                    ignore_subscribe_messages=True, target_node=node, timeout=1.0
                )
            )

    async def rr_reader():
        while True:
            on_msg(await ps.get_sharded_message(ignore_subscribe_messages=True, timeout=0.01))

    if mode == "per_node":
        tasks = [asyncio.create_task(per_node_reader(n)) for n in nodes]
    else:
        tasks = [asyncio.create_task(rr_reader())]
    res = await pubsub_timed(state, done, n_msgs, reps, ports)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ps.aclose()
    await rc.aclose()
    return res


# --------------------------------------------------------------------------- coredis
def cd_client(ports):
    import coredis

    return coredis.RedisCluster(host="127.0.0.1", port=ports[0])


async def cd_script_pipeline(ports, n_pipes, reps, use_script_obj=False):
    client = cd_client(ports)
    async with client:
        sha = await client.script_load(LUA)
        script = client.register_script(LUA)

        async def one_pass():
            k = 0
            res = None
            for _ in range(n_pipes):
                async with client.pipeline(transaction=False) as pipe:
                    for _ in range(PIPE_LEN):
                        if use_script_obj:
                            script(keys=[key(k)], client=pipe)
                        else:
                            pipe.evalsha(sha, keys=[key(k)])
                        k += 1
                res = pipe.results
            assert len(res) == PIPE_LEN and int(res[0]) > 0, res[:3]

        return await timed(one_pass, reps, n_pipes * PIPE_LEN)


async def cd_script_single(ports, n, reps):
    client = cd_client(ports)
    async with client:
        return await timed(one_by_one(client.register_script(LUA), n), reps, n)


async def cd_pubsub(ports, n_msgs, reps, mode):
    client = cd_client(ports)
    state = {"count": 0, "target": 0}
    done = asyncio.Event()
    async with (
        client,
        client.sharded_pubsub(channels=channels(), ignore_subscribe_messages=True) as ps,
    ):

        async def reader():
            async for m in ps:
                # coredis reports SPUBLISH deliveries with type "message"
                if m["type"] in ("message", "smessage"):
                    state["count"] += 1
                    if state["count"] >= state["target"]:
                        done.set()

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.2)
        res = await pubsub_timed(state, done, n_msgs, reps, ports)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return res


# --------------------------------------------------------------------------- timing
async def timed(one_pass, reps, n_ops):
    await one_pass()  # warm-up
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        await one_pass()
        c1, w1 = time.process_time(), time.perf_counter()
        cpu.append((c1 - c0) / n_ops * 1e6)
        wall.append(n_ops / (w1 - w0))
    return {"cpu_us": cpu, "ops_per_s": wall}


async def pubsub_timed(state, done, n_msgs, reps, ports):
    pub = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "_publisher",
        "--ports",
        ",".join(map(str, ports)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    cpu, wall = [], []
    try:
        for rep in range(reps + 1):  # first = warm-up
            state["count"] = 0
            state["target"] = n_msgs
            done.clear()
            c0, w0 = time.process_time(), time.perf_counter()
            pub.stdin.write(b"%d\n" % n_msgs)
            await pub.stdin.drain()
            await asyncio.wait_for(done.wait(), 60)
            c1, w1 = time.process_time(), time.perf_counter()
            line = await asyncio.wait_for(pub.stdout.readline(), 30)
            assert line.strip() == b"done", line
            await asyncio.sleep(0.1)
            if state["count"] != n_msgs:
                raise AssertionError(f"got {state['count']} != {n_msgs}")
            if rep:
                cpu.append((c1 - c0) / n_msgs * 1e6)
                wall.append(n_msgs / (w1 - w0))
    finally:
        pub.stdin.close()
        await pub.wait()
    return {"cpu_us": cpu, "msgs_per_s": wall}


# --------------------------------------------------------------------------- driver
TESTS = {
    ("redis-py", "script_pipeline"): lambda a: rp_script_pipeline(a.ports, a.n_pipes, a.reps),
    ("coredis", "script_pipeline"): lambda a: cd_script_pipeline(a.ports, a.n_pipes, a.reps),
    ("coredis", "script_pipeline_scriptobj"): lambda a: cd_script_pipeline(
        a.ports, a.n_pipes, a.reps, use_script_obj=True
    ),
    ("redis-py", "script_single"): lambda a: rp_script_single(a.ports, a.n_single, a.reps),
    ("coredis", "script_single"): lambda a: cd_script_single(a.ports, a.n_single, a.reps),
    ("redis-py", "spubsub_per_node"): lambda a: rp_pubsub(a.ports, a.n_msgs, a.reps, "per_node"),
    ("redis-py", "spubsub_rr"): lambda a: rp_pubsub(a.ports, a.n_msgs, a.reps, "rr"),
    ("coredis", "spubsub"): lambda a: cd_pubsub(a.ports, a.n_msgs, a.reps, "iter"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="all")
    ap.add_argument("--ports", default="17101,17102,17103")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-pipes", type=int, default=100)  # x64 calls per pass
    ap.add_argument("--n-single", type=int, default=2000)
    ap.add_argument("--n-msgs", type=int, default=20000)
    ap.add_argument("--client")
    ap.add_argument("--test")
    ap.add_argument("--json-out", default=os.path.join(HERE, "results.json"))
    a = ap.parse_args()
    a.ports = [int(p) for p in a.ports.split(",")]

    if a.mode == "_publisher":
        publisher_main(a.ports)
        return
    if a.mode == "_worker":
        try:
            res = asyncio.run(TESTS[(a.client, a.test)](a))
        except Exception as e:  # report, don't hide
            import traceback

            res = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        print("RESULT " + json.dumps(res))
        return

    import coredis
    import redis

    try:
        import hiredis

        hv = hiredis.__version__
    except Exception:
        hv = None
    print(
        f"redis-py {redis.__version__} (hiredis {hv}, HIREDIS_AVAILABLE="
        f"{redis.utils.HIREDIS_AVAILABLE}), coredis {coredis.__version__}, "
        f"python {sys.version.split()[0]}"
    )
    print("keys per shard port:", spread([key(i) for i in range(N_KEYS)], a.ports))
    print("channels per shard port:", spread(channels(), a.ports))
    results = {}
    for client, test in TESTS:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "_worker",
            "--client",
            client,
            "--test",
            test,
            "--ports",
            ",".join(map(str, a.ports)),
            "--reps",
            str(a.reps),
            "--n-pipes",
            str(a.n_pipes),
            "--n-single",
            str(a.n_single),
            "--n-msgs",
            str(a.n_msgs),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        res = json.loads(line[-1][7:]) if line else {"error": p.stderr[-2000:]}
        results[f"{client}/{test}"] = res
        if "error" in res:
            print(f"{client:9s} {test:27s} ERROR {res['error']}")
            if res.get("tb") and "-v" in sys.argv:
                print(res["tb"])
        else:
            rate_k = "ops_per_s" if "ops_per_s" in res else "msgs_per_s"
            print(
                f"{client:9s} {test:27s} median CPU {statistics.median(res['cpu_us']):7.2f} us/op"
                f"  (runs: {', '.join(f'{x:.2f}' for x in res['cpu_us'])})"
                f"  median wall {statistics.median(res[rate_k]):9.0f} {rate_k}"
            )
            if res.get("note"):
                print(f"          note: {res['note']}")
        sys.stdout.flush()
    with open(a.json_out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
