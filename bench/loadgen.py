"""Open-loop load generator: P parties × K members over WebSocket, latency as the members see it.

Each connection plays one member of one party. Sends follow a fixed timeline (``rate`` messages a
second in all, spread evenly over the parties, the acting member rotating inside each party); they
are never delayed because the server is slow, so queueing shows up as latency, not as a lower rate.

Measured per rate step, over a window after a warm-up:

- latency from the acting client's send to each OTHER member's receipt (p50/p90/p99/p99.9/max);
- delivered messages per second (every frame any client received during the window);
- lost (expected but not received within ``settle`` seconds after the window), duplicated and
  out-of-order messages: party_sync and the peer are checked on the per-party ``seq``; the floors
  on a per-sender send id embedded in each message;
- its own health: CPU share of its core, event-loop lag and send lag. When the generator, not the
  server, is the bottleneck (CPU ≥ 95 % or loop lag p99 > 5 ms), the step says so.

Protocols: ``party_sync`` (``/ws?token=``; first message ``system.hello``), ``socketio`` (Engine.IO
4 / Socket.IO 5 over a raw WebSocket, auth ``{"token": ...}``) and ``floor`` (``/ws/<room>``).

``--scenario narration`` (party_sync only): the steps are numbers of parties (``--party-steps``),
connected as the sweep needs them. At each step member 0 of every party asks the benchmark engine
(``bench/engine.py``) by a control action to narrate, ``--narration-rate`` pieces a second, in
streams of ``--min-pieces`` to ``--max-pieces`` pieces; at the end of the measured window a stop
action returns what the engine wrote. Measured: latency from the engine's write of a piece (its
stamp, in the text) to each member's receipt, for the pieces written in the window; the engine's
own lag behind its timeline; ``narration.delta`` frames delivered per second; and, per member,
every index of every stream in order and once (a gap is out of order, a repeat a duplicate, what
never came after ``settle`` is lost, against the engine's count).

It talks to ``bench/run.py`` by lines on stdout (``READY``, ``MEASURE_START i``, ``MEASURE_END i``,
``STEP {json}``, ``DONE``; narration also ``STEP_START i`` before its warm-up and ``FAILED {json}``
when a step cannot run) and waits for ``GO`` (or ``STOP``) on stdin after ``READY``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from party_sync.auth import issue_token
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.common import (
    RUN_ID,
    SECRET,
    character_name,
    install_uvloop,
    parse_stamp,
    party_name,
    pin,
    raise_nofile,
)

PROTOCOLS = ("party_sync", "socketio", "floor")
SCENARIOS = ("actions", "narration")
#: Frames each inbound message makes the server deliver, and how many of them go to OTHER members.
EVENTS_PER_ACTION = {"party_sync": 2, "socketio": 2, "floor": 1}
_PAD = "x" * 160  # floors: a request about as large as party_sync's action.request


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass(slots=True)
class Pending:
    """One message sent: when, by whom, how many deliveries are still expected."""

    sent_at: float
    sender: Member
    remaining: int
    measured: bool


@dataclass
class Stats:
    """Counters of one rate step."""

    latencies: list[float] = field(default_factory=list)
    frames: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    unknown: int = 0


class Member(WSListener):
    """One connection: a member of a party."""

    def __init__(self, gen: LoadGen, index: int, party: int, member: int) -> None:
        self.gen = gen
        self.index = index
        self.party = party
        self.member = member
        self.transport: WSTransport | None = None
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_seq = 0
        self.last_from: dict[int, int] = {}  # floors: sender index → last send id seen
        self.closed = False
        # narration: stream id → last index taken; streams whose last piece came; pieces taken
        self.streams: dict[str, int] = {}
        self.ended: set[str] = set()
        self.taken = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.gen.protocol == "floor" and not self.joined.done():
            self.joined.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.gen.disconnects += 1
        if not self.joined.done():
            self.joined.set_exception(ConnectionError("disconnected before joining"))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            self.gen.on_message(self, frame.get_payload_as_bytes())
        elif kind is WSMsgType.CLOSE:
            self.gen.closes[str(frame.get_close_code())] += 1
            transport.disconnect()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.send(WSMsgType.TEXT, data)


@dataclass
class NarrationStats:
    """What one narration step saw besides ``Stats``: the window (``time.monotonic``), the
    engine's lag behind its timeline, end-to-end latency from the due time, the stop results."""

    #: This step's stream ids start with it (a late piece of an earlier step does not count).
    prefix: str = ""
    window_start: float = math.inf
    window_end: float = math.inf
    engine_lags: list[float] = field(default_factory=list)
    from_due: list[float] = field(default_factory=list)
    stop_ids: dict[str, int] = field(default_factory=dict)  # stop action id → party
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)  # party → scene_flags
    unstamped: int = 0


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.protocol: str = args.protocol
        self.scenario: str = getattr(args, "scenario", "actions")
        self.narration_rate: float = getattr(args, "narration_rate", 30.0)
        self.min_pieces: int = getattr(args, "min_pieces", 150)
        self.max_pieces: int = getattr(args, "max_pieces", 300)
        self.concurrency: int = getattr(args, "concurrency", 64)
        self.connect_timeout: float = getattr(args, "connect_timeout", 30.0)
        self.narr = NarrationStats()
        self.urls: list[str] = args.url
        self.parties: int = args.parties
        self.k: int = args.k
        self.members: list[Member] = []
        self.by_party: list[list[Member]] = []
        self.pending: dict[Any, Pending] = {}
        self.stats = Stats()
        self.counter = 0
        self.disconnects = 0
        self.closes: Counter[str] = Counter()
        self.events = EVENTS_PER_ACTION[self.protocol]
        self.on_message: Callable[[Member, bytes], None] = {
            "party_sync": self._on_party_sync,
            "socketio": self._on_socketio,
            "floor": self._on_floor,
        }[self.protocol]
        if self.scenario == "narration":
            if self.protocol != "party_sync":
                raise SystemExit("--scenario narration: party_sync only (the peers have no such)")
            self.on_message = self._on_narration

    # -- connecting -----------------------------------------------------------------------------
    def url_for(self, party: int, member: int) -> str:
        base = self.urls[member % len(self.urls)]  # members of one party spread over the nodes
        if self.protocol == "floor":
            return f"{base}/ws/{party_name(party)}"
        if self.protocol == "socketio":
            return f"{base}/socket.io/?EIO=4&transport=websocket"
        return f"{base}/ws?token={self.token(party, member)}"

    def token(self, party: int, member: int) -> str:
        # Every member is its own user (sub): the character ids repeat from party to party, and
        # party_sync caps the WebSockets per user (max_connections_per_user).
        return issue_token(
            SECRET,
            party_id=party_name(party),
            campaign_run_id=RUN_ID,
            character_id=character_name(member),
            display_name=f"Member {member}",
            now=time.time(),
            ttl=6 * 3600,
            sub=f"user:{party_name(party)}:{character_name(member)}",
        )

    async def connect_all(self, concurrency: int, handshake_timeout: float) -> None:
        await self.connect_parties(self.parties, concurrency, handshake_timeout)

    async def connect_parties(self, upto: int, concurrency: int, handshake_timeout: float) -> None:
        """Connect every member of the parties below ``upto`` not connected yet."""
        gate = asyncio.Semaphore(concurrency)
        new: list[Member] = []
        for party in range(len(self.by_party), min(upto, self.parties)):
            self.by_party.append([])
            for member in range(self.k):
                m = Member(self, len(self.members), party, member)
                self.members.append(m)
                self.by_party[party].append(m)
                new.append(m)

        async def one(m: Member) -> None:
            async with gate:
                for attempt in range(5):
                    try:
                        await ws_connect(
                            lambda: m,
                            self.url_for(m.party, m.member),
                            websocket_handshake_timeout=handshake_timeout,
                            max_frame_size=1 << 20,
                        )
                        break
                    except Exception:
                        if attempt == 4:
                            raise
                        await asyncio.sleep(0.2 * (attempt + 1))  # back off, bounded
                await asyncio.wait_for(asyncio.shield(m.joined), handshake_timeout)

        async with asyncio.timeout(handshake_timeout + len(new) * 0.02):
            await asyncio.gather(*(one(m) for m in new))

    # -- receiving ------------------------------------------------------------------------------
    def _delivered(self, m: Member, key: Any, now: float) -> None:
        record = self.pending.get(key)
        if record is None:
            self.stats.unknown += 1
            return
        record.remaining -= 1
        if record.remaining == 0:
            del self.pending[key]
        if record.measured and record.sender is not m:
            self.stats.latencies.append(now - record.sent_at)

    def _sequenced(self, m: Member, msg: dict[str, Any], now: float) -> None:
        seq = msg.get("seq")
        if seq is None:
            type_ = msg.get("type")
            if type_ == "system.hello":
                m.last_seq = msg["payload"]["seq"]
                if not m.joined.done():
                    m.joined.set_result(None)
            elif type_ == "system.error":
                self.stats.errors[str(msg.get("payload", {}).get("code"))] += 1
            return
        self.stats.frames += 1
        last = m.last_seq
        if seq == last + 1:
            m.last_seq = seq
        elif seq <= last:
            self.stats.duplicates += 1
            return
        else:
            self.stats.out_of_order += 1
            m.last_seq = seq
        self._delivered(m, msg.get("trace_id"), now)

    def _on_party_sync(self, m: Member, data: bytes) -> None:
        self._sequenced(m, orjson.loads(data), time.perf_counter())

    def _on_socketio(self, m: Member, data: bytes) -> None:
        now = time.perf_counter()
        head = data[:2]
        if head == b"42":
            event = orjson.loads(data[2:])
            self._sequenced(m, event[1], now)
        elif data == b"2":  # Engine.IO ping → pong
            m.send(b"3")
        elif head == b"0{":  # Engine.IO open → Socket.IO connect with auth
            auth = orjson.dumps({"token": self.token(m.party, m.member)})
            m.send(b"40" + auth)
        elif head == b"40":
            if not m.joined.done():
                m.joined.set_result(None)
        elif head == b"44":
            self.stats.errors["connect_refused"] += 1
            if not m.joined.done():
                m.joined.set_exception(ConnectionError(data.decode(errors="replace")))

    def _on_floor(self, m: Member, data: bytes) -> None:
        now = time.perf_counter()
        msg = orjson.loads(data)
        self.stats.frames += 1
        sender: int = msg["s"]
        ident: int = msg["i"]
        last = m.last_from.get(sender, -1)
        if ident == last:
            self.stats.duplicates += 1
            return
        if ident < last:
            self.stats.out_of_order += 1
        else:
            m.last_from[sender] = ident
        self._delivered(m, ident, now)

    def _on_narration(self, m: Member, data: bytes) -> None:
        now = time.monotonic()
        msg = orjson.loads(data)
        type_ = msg.get("type")
        if type_ == "narration.delta":
            p = msg["payload"]
            sid: str = p["stream_id"]
            if not sid.startswith(self.narr.prefix):
                return
            self.stats.frames += 1
            index: int = p["index"]
            last = m.streams.get(sid, -1)
            if index <= last:
                self.stats.duplicates += 1
                return
            if index != last + 1 or sid in m.ended:
                self.stats.out_of_order += 1  # a gap (the skipped pieces end up lost) or after done
            m.streams[sid] = index
            m.taken += 1
            if p["done"]:
                m.ended.add(sid)
            stamp = parse_stamp(p["text"])
            narr = self.narr
            if stamp is None:
                narr.unstamped += 1
                return
            written, due = stamp
            if narr.window_start <= written <= narr.window_end:
                self.stats.latencies.append(now - written)
                narr.from_due.append(now - due)
                if m.member == 0:  # once per piece
                    narr.engine_lags.append(written - due)
            return
        if type_ == "action.result":
            payload = msg.get("payload") or {}
            party = self.narr.stop_ids.get(payload.get("action_id", ""))
            if party is not None and party not in self.narr.reports:
                self.narr.reports[party] = payload.get("state", {}).get("scene_flags", {})
        elif type_ == "system.hello":
            if not m.joined.done():
                m.joined.set_result(None)
        elif type_ in ("system.error", "action.failed"):
            self.stats.errors[f"{type_}:{(msg.get('payload') or {}).get('code')}"] += 1

    # -- sending --------------------------------------------------------------------------------
    def send_next(self, now: float, measured: bool) -> None:
        n = self.counter
        self.counter = n + 1
        party = n % self.parties
        member = (n // self.parties) % self.k
        m = self.by_party[party][member]
        if self.protocol == "floor":
            key: Any = n
            data = b'{"i":%d,"s":%d,"type":"action.request","pad":"%s"}' % (
                n,
                m.index,
                _PAD.encode(),
            )
        else:
            key = f"b{n}"
            body = (
                b'{"type":"action.request","trace_id":"b%d","payload":{"action_id":"a%d",'
                b'"character_id":"%s","campaign_run_id":"%s","action_type":"skill_check",'
                b'"payload":{"skill":"perception"}}}'
                % (n, n, character_name(member).encode(), RUN_ID.encode())
            )
            data = b'42["action.request",%b]' % body if self.protocol == "socketio" else body
        self.pending[key] = Pending(now, m, self.events * self.k, measured)
        m.send(data)

    # -- one rate step --------------------------------------------------------------------------
    async def step(
        self, index: int, rate: float, warmup: float, duration: float, settle: float
    ) -> dict[str, Any]:
        self.stats = Stats()
        lags: list[float] = []
        send_lags: list[float] = []
        loop_probe_stop = asyncio.Event()

        async def probe() -> None:  # event-loop lag: how late a 5 ms sleep wakes up
            interval = 0.005
            while not loop_probe_stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(interval)
                lags.append(time.perf_counter() - before - interval)

        prober = asyncio.get_running_loop().create_task(probe())
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + duration
        sent = 0
        measuring = False
        frames_at_start = 0
        cpu0 = wall0 = 0.0
        try:
            while True:
                now = time.perf_counter()
                if now >= end:
                    break
                if not measuring and now >= measure_from:
                    measuring = True
                    frames_at_start = self.stats.frames
                    cpu0, wall0 = time.process_time(), now
                    self.stats.latencies.clear()
                    emit(f"MEASURE_START {index}")
                due = int((now - start) * rate) - sent
                if due > 0:
                    first_intended = start + (sent + 1) / rate
                    if measuring:
                        send_lags.append(now - first_intended)
                    for _ in range(due):
                        self.send_next(now, measuring)
                    sent += due
                await asyncio.sleep(
                    0.001
                )  # the timeline's tick (uvloop timers have 1 ms resolution)
            cpu1, wall1 = time.process_time(), time.perf_counter()
            frames_in_window = self.stats.frames - frames_at_start
            emit(f"MEASURE_END {index}")
            deadline = time.perf_counter() + settle
            while time.perf_counter() < deadline and any(  # noqa: ASYNC110 - bounded poll
                p.measured for p in self.pending.values()
            ):
                await asyncio.sleep(0.05)  # waiting for late deliveries, bounded by ``settle``
        finally:
            loop_probe_stop.set()
            gc.enable()
        await prober
        lost = sum(p.remaining for p in self.pending.values() if p.measured)
        self.pending.clear()
        window = max(1e-9, wall1 - wall0)
        lat = sorted(self.stats.latencies)
        lag_sorted = sorted(lags)
        cpu = (cpu1 - cpu0) / window
        lag_p99 = percentile(lag_sorted, 99) * 1000
        result: dict[str, Any] = {
            "index": index,
            "rate_in": rate,
            "offered_delivered": rate * self.events * self.k,
            "sent": sent,
            "delivered_per_s": frames_in_window / window,
            "samples": len(lat),
            "p50_ms": percentile(lat, 50) * 1000,
            "p90_ms": percentile(lat, 90) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            "p999_ms": percentile(lat, 99.9) * 1000,
            "max_ms": (lat[-1] * 1000) if lat else math.nan,
            "lost": lost,
            "duplicates": self.stats.duplicates,
            "out_of_order": self.stats.out_of_order,
            "errors": dict(self.stats.errors),
            "disconnects": self.disconnects,
            "closes": dict(self.closes),
            "loadgen": {
                "cpu": cpu,
                "loop_lag_p99_ms": lag_p99,
                "loop_lag_max_ms": (lag_sorted[-1] * 1000) if lag_sorted else math.nan,
                "send_lag_p99_ms": percentile(sorted(send_lags), 99) * 1000,
                "bound": cpu >= 0.95 or lag_p99 > 5.0,
            },
        }
        return result

    def _control(self, party: int, action_id: str, control: dict[str, Any]) -> None:
        """A control action of the narration scenario, sent by member 0 of ``party``."""
        body = {
            "type": "action.request",
            "trace_id": action_id,
            "payload": {
                "action_id": action_id,
                "character_id": character_name(0),
                "campaign_run_id": RUN_ID,
                "action_type": "skill_check",
                "payload": {"skill": "storytelling", "bench_narration": control},
            },
        }
        self.by_party[party][0].send(orjson.dumps(body))

    async def narration_step(
        self, index: int, parties: int, warmup: float, duration: float, settle: float
    ) -> dict[str, Any]:
        """One step of the narration scenario: ``parties`` parties narrating (see the module)."""
        await self.connect_parties(parties, self.concurrency, self.connect_timeout)
        self.stats = Stats()
        tag = f"s{index}"
        narr = self.narr = NarrationStats(prefix=tag + "-")
        for members in self.by_party:
            for m in members:
                m.streams.clear()
                m.ended.clear()
                m.taken = 0
        lags: list[float] = []
        stop_probe = asyncio.Event()

        async def probe() -> None:  # event-loop lag: how late a 5 ms sleep wakes up
            interval = 0.005
            while not stop_probe.is_set():
                before = time.monotonic()
                await asyncio.sleep(interval)
                lags.append(time.monotonic() - before - interval)

        prober = asyncio.get_running_loop().create_task(probe())
        gc.collect()
        gc.disable()
        control = {
            "op": "start",
            "rate": self.narration_rate,
            "min_pieces": self.min_pieces,
            "max_pieces": self.max_pieces,
            "tag": tag,
            "seed": index,
            "max_seconds": warmup + duration + settle + 60.0,
        }
        try:
            emit(f"STEP_START {index}")  # the warm-up counts too: a backlog there carries over
            for party in range(parties):
                self._control(party, f"n{index}-{party}-start", control)
            await asyncio.sleep(warmup)
            frames0 = self.stats.frames
            cpu0, wall0 = time.process_time(), time.monotonic()
            self.stats.latencies.clear()
            narr.window_start = wall0
            emit(f"MEASURE_START {index}")
            await asyncio.sleep(duration)
            cpu1, wall1 = time.process_time(), time.monotonic()
            narr.window_end = wall1
            frames_in_window = self.stats.frames - frames0
            emit(f"MEASURE_END {index}")
            for party in range(parties):
                narr.stop_ids[f"n{index}-{party}-stop"] = party
                self._control(party, f"n{index}-{party}-stop", {"op": "stop"})

            def complete() -> bool:
                if len(narr.reports) < parties:
                    return False
                return all(
                    m.taken >= int(narr.reports[party].get("narration_pieces", 0))
                    for party in range(parties)
                    for m in self.by_party[party]
                )

            deadline = time.monotonic() + settle + 5.0  # a stop waits for the next due piece
            while time.monotonic() < deadline and not complete():  # noqa: ASYNC110 - bounded
                await asyncio.sleep(0.05)
        finally:
            stop_probe.set()
            gc.enable()
        await prober
        lost = streams = pieces = 0
        engine_error = ""
        for party in range(parties):
            report = narr.reports.get(party)
            if report is None:
                self.stats.errors["no_stop_result"] += 1
                continue
            expected = int(report.get("narration_pieces", 0))
            pieces += expected
            streams += int(report.get("narration_streams", 0))
            if report.get("narration_errors"):
                self.stats.errors["engine_narration_error"] += int(report["narration_errors"])
                engine_error = engine_error or str(report.get("narration_error", ""))
            for m in self.by_party[party]:
                lost += max(0, expected - m.taken)
                if m.taken > expected:
                    self.stats.errors["unexpected_pieces"] += m.taken - expected
        if narr.unstamped:
            self.stats.errors["unstamped_pieces"] += narr.unstamped
        window = max(1e-9, wall1 - wall0)
        lat = sorted(self.stats.latencies)
        due = sorted(narr.from_due)
        engine = sorted(narr.engine_lags)
        lag_sorted = sorted(lags)
        cpu = (cpu1 - cpu0) / window
        lag_p99 = percentile(lag_sorted, 99) * 1000
        rate_in = parties * self.narration_rate
        return {
            "index": index,
            "scenario": "narration",
            "parties": parties,
            "rate_in": rate_in,
            "offered_delivered": rate_in * self.k,
            "sent": pieces,
            "streams": streams,
            "pieces_written_per_s": len(engine) / window,
            "delivered_per_s": frames_in_window / window,
            "samples": len(lat),
            "p50_ms": percentile(lat, 50) * 1000,
            "p90_ms": percentile(lat, 90) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            "p999_ms": percentile(lat, 99.9) * 1000,
            "max_ms": (lat[-1] * 1000) if lat else math.nan,
            "from_due_p99_ms": percentile(due, 99) * 1000,
            "engine_lag_p50_ms": percentile(engine, 50) * 1000,
            "engine_lag_p99_ms": percentile(engine, 99) * 1000,
            "engine_lag_max_ms": (engine[-1] * 1000) if engine else math.nan,
            "engine_error": engine_error[:300],
            "lost": lost,
            "duplicates": self.stats.duplicates,
            "out_of_order": self.stats.out_of_order,
            "errors": dict(self.stats.errors),
            "disconnects": self.disconnects,
            "closes": dict(self.closes),
            "loadgen": {
                "cpu": cpu,
                "loop_lag_p99_ms": lag_p99,
                "loop_lag_max_ms": (lag_sorted[-1] * 1000) if lag_sorted else math.nan,
                "send_lag_p99_ms": math.nan,
                "bound": cpu >= 0.95 or lag_p99 > 5.0,
            },
        }

    def close_all(self) -> None:
        for m in self.members:
            if m.transport is not None and not m.closed:
                m.transport.disconnect(graceful=False)


def passed(step: dict[str, Any], p99_limit_ms: float) -> bool:
    p99 = step["p99_ms"]
    if p99 is None or math.isnan(p99):
        return False
    return (
        step["lost"] == 0
        and step["duplicates"] == 0
        and step["out_of_order"] == 0
        and not step["errors"]
        and step["samples"] > 0
        and step["p99_ms"] <= p99_limit_ms
        # narration: the engine kept its timeline (else the load was not offered)
        and step.get("engine_lag_p99_ms", 0.0) <= p99_limit_ms
    )


async def read_command() -> str:
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def main_async(args: argparse.Namespace) -> int:
    gen = LoadGen(args)
    t0 = time.perf_counter()
    narration = args.scenario == "narration"
    steps: list[float] = [float(n) for n in args.party_steps] if narration else args.rates
    try:
        if narration:  # the parties of the first step now, the others as the sweep needs them
            await gen.connect_parties(
                int(steps[0]) if steps else 0, gen.concurrency, gen.connect_timeout
            )
        else:
            await gen.connect_all(args.concurrency, args.connect_timeout)
    except Exception as exc:
        emit("FAILED " + orjson.dumps({"error": f"connect: {exc!r}"}).decode())
        gen.close_all()
        return 1
    emit(
        "READY "
        + orjson.dumps(
            {"connections": len(gen.members), "connect_s": round(time.perf_counter() - t0, 3)}
        ).decode()
    )
    command = await read_command()
    if command != "GO" or args.mode == "idle":
        gen.close_all()
        await asyncio.sleep(0.2)
        emit("DONE")
        return 0
    await asyncio.sleep(args.pause)
    failing = 0
    position = index = 0
    while position < len(steps):
        if narration:
            try:
                result = await gen.narration_step(
                    index, int(steps[position]), args.warmup, args.duration, args.settle
                )
            except Exception as exc:  # e.g. the step's new parties could not connect
                emit("FAILED " + orjson.dumps({"error": f"step {index}: {exc!r}"}).decode())
                break
        else:
            result = await gen.step(index, steps[position], args.warmup, args.duration, args.settle)
        emit("STEP " + orjson.dumps(result).decode())
        index += 1
        if args.interactive:
            # The orchestrator decides: NEXT, REPEAT (the step was disturbed) or STOP.
            command = await read_command()
            if command == "REPEAT":
                await asyncio.sleep(args.pause)
                continue
            if command != "NEXT":
                break
        else:
            failing = 0 if passed(result, args.fail_p99_ms) else failing + 1
            if args.stop_on_fail and failing >= args.fail_streak:
                break
        if gen.disconnects:
            break  # connections were closed (slow consumer, policy): the sweep cannot go on
        position += 1
        await asyncio.sleep(args.pause)
    gen.close_all()
    await asyncio.sleep(0.2)
    emit("DONE")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True)
    parser.add_argument(
        "--url", action="append", required=True, help="ws://host:port (repeat for several nodes)"
    )
    parser.add_argument("--parties", type=int, default=250)
    parser.add_argument("--k", type=int, default=4, help="members per party (4)")
    parser.add_argument("--mode", choices=("load", "idle"), default="load")
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="actions",
        help="actions (default) or narration (party_sync only; steps from --party-steps)",
    )
    parser.add_argument(
        "--party-steps",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[50],
        help="narration: parties narrating at each step, comma-separated (--parties: the most)",
    )
    parser.add_argument("--narration-rate", type=float, default=30.0, help="pieces/s per party")
    parser.add_argument("--min-pieces", type=int, default=150, help="narration: shortest stream")
    parser.add_argument("--max-pieces", type=int, default=300, help="narration: longest stream")
    parser.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",") if x],
        default=[1000.0],
        help="inbound messages per second of each step, comma-separated",
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--pause", type=float, default=0.5)
    parser.add_argument("--stop-on-fail", action="store_true")
    parser.add_argument(
        "--interactive", action="store_true", help="after each STEP, wait for NEXT/REPEAT/STOP"
    )
    parser.add_argument("--fail-p99-ms", type=float, default=50.0)
    parser.add_argument(
        "--fail-streak", type=int, default=1, help="stop after this many failing steps in a row"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args(argv)
    if args.scenario == "narration" and args.party_steps:
        args.parties = max(args.parties, *args.party_steps)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu is not None:
        pin([args.cpu])
    raise_nofile(4 * args.parties * args.k + 1024)
    install_uvloop()

    async def bounded() -> int:
        async with asyncio.timeout(args.max_seconds):
            return await main_async(args)

    try:
        return asyncio.run(bounded())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
