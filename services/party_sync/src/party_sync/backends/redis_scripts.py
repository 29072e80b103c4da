"""The Lua scripts of the Redis backend, how they are called, and the edge where Redis errors stop.

Each party operation that reads and writes shared state is one script over the party's keys (one
hash tag, one slot), so it is atomic across nodes: the Redis rendering of the pure rules in
``party_sync.core``. The scripts live in ``backends/lua/``; every party script is the shared
prelude ``_lib.lua`` followed by its body, registered once as a redis-py ``Script`` (EVALSHA, with
SCRIPT LOAD at start and again by redis-py after a Redis restart forgets them).

On a Redis Cluster (``sharded``) every script is registered with its classic ``PUBLISH`` calls
made ``SPUBLISH`` (sharded pub/sub: the party's channel ``party:<id>`` hashes to the same slot as
its keys' tag ``{party:<id>}``, so the script publishes in its own slot, and the message goes to
the subscribers of that shard only). The one-Redis scripts are unchanged, at no cost.

``unavailable()`` is the one place foreign exceptions are converted: every Redis or socket error
becomes ``BackendUnavailable`` (style: "foreign exceptions are mapped at the edge").
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from party_sync.backends.keys import PARTY_KEYS, KeySpace, PartyKeys, party_channel
from party_sync.backends.redis_batch import ScriptBatcher, ShardedBatcher
from party_sync.backends.redis_connect import TRANSPORT_CLOSED
from party_sync.backends.redis_wire import Script, load_script
from party_sync.core.history import HistoryBounds
from party_sync.core.limits import RateGate
from party_sync.core.projection import DEFAULT_RUN_STATUS, DEFAULT_STATUS
from party_sync.core.snapshot import Snapshot
from party_sync.protocol import types as t
from party_sync.protocol.errors import BackendUnavailable

log = logging.getLogger(__name__)

#: What a script argument may be (redis-py encodes str, bytes, int and float).
Arg = str | bytes | int | float

PARTY_SCRIPTS = (
    "publish",
    "publish_many",
    "connect",
    "disconnect",
    "hand_over_grace",
    "settle",
    "leave",
    "refresh",
    "expire",
    "range",
    "head",
    "snapshot",
    "begin_action",
    "claim_action",
    "refuse_action",
    "take_over",
    "time_out_action",
    "narrate",
    "close_narration",
)


def _source(name: str) -> str:
    return (resources.files("party_sync.backends") / "lua" / f"{name}.lua").read_text("utf-8")


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEFINES = re.compile(r"local\s+(?:function\s+)?([A-Za-z_][A-Za-z0-9_\s,]*?)\s*(?:=|\(|$)")


def _words(lua: str) -> set[str]:
    """The identifiers a piece of Lua uses (comments left out)."""
    return set(_WORD.findall(re.sub(r"--[^\n]*", "", lua)))


def prelude_for(lib: str, body: str) -> str:
    """The part of ``_lib.lua`` that ``body`` needs: its header (the KEYS and ARGV locals, up to
    the first ``local function``), then, in their order, only the top-level definitions that the
    body uses, directly or through each other.

    Each call of a script runs its whole prelude again (EVAL keeps no state between calls), so
    every closure it creates is made, then collected, on every call: the full prelude cost about
    43k instructions per call, most of a small script's cost (bench/analysis.md section 12). A
    top-level definition starts at a line beginning with ``local`` and runs to the next one.
    """
    cut = lib.find("\nlocal function")
    if cut < 0:
        return lib
    header, rest = lib[: cut + 1], lib[cut + 1 :]
    chunks: list[tuple[set[str], str]] = []
    for part in re.split(r"\n(?=local\s)", rest):
        match = _DEFINES.match(part)
        names = {n.strip() for n in match.group(1).split(",")} if match else set()
        chunks.append((names, part))
    wanted = _words(body)
    chosen = [False] * len(chunks)
    grew = True
    while grew:  # the closure of what is used: a definition may use earlier ones
        grew = False
        for i, (names, part) in enumerate(chunks):
            if not chosen[i] and (not names or names & wanted):
                chosen[i] = True
                wanted |= _words(part)
                grew = True
    return header + "\n".join(part for i, (_, part) in enumerate(chunks) if chosen[i])


#: The lines of ``_lib.lua``'s header that name the party's keys (``K_META = KEYS[1]``, ...).
_KEY_LINES = re.compile(r"^local K_META,.*?KEYS\[12\]\n", re.S | re.M)
#: ``_lib.lua``'s names of the party's keys, in ``PartyKeys`` order, then the extra key's.
_KEY_NAMES = (*(f"K_{name.upper()}" for name in PARTY_KEYS), "K_ACTION")


def key_layout(text: str) -> tuple[int, ...] | None:
    """Which of the party's eleven keys a script (its prelude and body) is given, as indexes into
    ``PartyKeys``: only those it names, when it names its keys only through ``_lib.lua``'s
    ``K_`` locals; ``None`` (all eleven, then the extra ones from ``KEYS[12]``) when it reads
    ``KEYS`` itself (``touch()``, an action record or the narration hash as ``KEYS[12]``).

    Each key given to a script is a string Lua makes, and hashes, on every call (bench/analysis.md
    section 18): ``begin_action`` uses two of the twelve.
    """
    code = re.sub(r"--[^\n]*", "", _KEY_LINES.sub("", text, count=1))
    if "KEYS" in code:
        return None
    used = _words(code)
    layout = tuple(i for i, name in enumerate(_KEY_NAMES[:-1]) if name in used)
    return layout or None  # at least one key: a Cluster client routes a script by its keys


def _name_keys(text: str, layout: tuple[int, ...] | None) -> str:
    """The script with its header naming the keys of ``layout`` in the order they are given."""
    if layout is None:
        return text
    names = [_KEY_NAMES[i] for i in layout] + ["K_ACTION"]  # K_ACTION: the key after them
    code = re.sub(r"--[^\n]*", "", _KEY_LINES.sub("", text, count=1))
    names = [n for n in names if n in _words(code)]
    lines = "".join(
        f"local {', '.join(names[i : i + 4])} = "
        f"{', '.join(f'KEYS[{i + j + 1}]' for j in range(len(names[i : i + 4])))}\n"
        for i in range(0, len(names), 4)
    )
    return _KEY_LINES.sub(lambda _: lines, text, count=1)


def party_script(
    lib: str, body: str, *, sharded: bool = False
) -> tuple[str, tuple[int, ...] | None]:
    """A party script as registered, and the party keys it is given (``key_layout``): the prelude
    it needs (``prelude_for``), then its body, its header naming only those keys; ``sharded``
    (Redis Cluster): every ``PUBLISH`` of the party channel is ``SPUBLISH``."""
    text = prelude_for(lib, body) + "\n" + body
    layout = key_layout(text)
    text = _name_keys(text, layout)
    if sharded:
        text = text.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
    return text, layout


def script_text(lib: str, body: str, *, sharded: bool = False) -> str:
    """``party_script``'s text."""
    return party_script(lib, body, sharded=sharded)[0]


#: The first word of a refusal that says Redis cannot take writes now, whatever is asked: out of
#: memory under ``noeviction``, a replica, a failed save (``stop-writes-on-bgsave-error``), too
#: few replicas (``min-replicas-to-write``), a master gone, loading its data, a script running.
STATE_REFUSALS: Final = frozenset(
    {"OOM", "READONLY", "MISCONF", "NOREPLICAS", "MASTERDOWN", "LOADING", "BUSY"}
)
#: Those that make the node not ready: all but READONLY, the old master's answer in a failover's
#: second, which the connections follow by themselves (``redis_connect``): the node serves
#: again within that second, and 503s from every node for 5 s after it would take the whole
#: service out of a load balancer for longer than the failover did.
NOT_READY_REFUSALS: Final = STATE_REFUSALS - {"READONLY"}
#: Seconds a refusal of Redis's state keeps the node not ready (``RedisBackend.ready``), and
#: between two log lines about refusals (each says how many more came meanwhile).
REFUSED_FOR = 5.0


class Refusals:
    """The commands Redis refused, for this process: logged at most once per ``REFUSED_FOR``
    (memory probe: Redis at ``maxmemory`` under ``noeviction`` refused every write, and each
    player's message and each connection wrote one ERROR line with the refusal: hundreds in
    seconds), and when Redis last refused for its state (``STATE_REFUSALS``: the node is not
    ready meanwhile; ``/readyz`` said "ready" while every action was refused)."""

    def __init__(self) -> None:
        self._gate = RateGate(REFUSED_FOR)
        self.state_refused_at = float("-inf")  # time.monotonic() of the last one
        self.state_reason = ""
        self._last_at = float("-inf")  # of any refusal

    def refused(self, what: str, exc: ResponseError, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        reason = str(exc)
        # redis-py takes the code off the text of the ones it has a class for (OOM, READONLY...)
        code = getattr(exc, "status_code", None) or reason.split(" ", 1)[0]
        if not reason.startswith(code):
            reason = f"{code} {reason}"
        if "EXEC without MULTI" in reason:  # redis-py raises EXEC's reply, not MULTI's
            reason += (
                " (Redis refused the MULTI before it, most likely a NOPERM: give the user "
                "+@transaction; its commands then ran one by one, not as one transaction)"
            )
        state = code in STATE_REFUSALS
        if code in NOT_READY_REFUSALS:
            self.state_refused_at, self.state_reason = now, reason
        quiet, self._last_at = now - self._last_at, now
        more = self._gate.admit(now)
        if more is None:
            return
        if not more:
            counted = ""
        elif quiet > REFUSED_FOR:  # a new episode: the count is the end of the one before
            counted = f"; {more} more after the last line of the one before, {quiet:.0f} s ago"
        else:
            counted = f"; {more} more since the last such line"
        if state:  # an outage of Redis's making: the calls fail as in a stall, and say so
            log.warning("redis refuses writes: %s (refused %s%s)", reason, what, counted)
        else:  # a script or command refused: a bug, not an outage
            log.error("redis refused %s: %s%s", what, reason, counted)

    def refusing(self, now: float, since: float = float("-inf")) -> str | None:
        """Why Redis refuses writes, if it did within the last ``REFUSED_FOR`` seconds (and
        after ``since``: a backend asks about its own lifetime only)."""
        if since < self.state_refused_at > now - REFUSED_FOR:
            return self.state_reason
        return None


#: This process's (``unavailable`` counts every refusal here).
REFUSALS = Refusals()


class unavailable:  # lower case: used as a function, ``with unavailable("publish"):``
    """Run Redis calls; any failure of Redis (a lost connection, a timeout, a Cluster failing
    over, a refused command) is ``BackendUnavailable`` (retryable for the client).

    A plain class, usable with ``with`` (the hot paths: no await is needed to translate an error)
    and with ``async with`` (beside an async context manager on one line). Not
    ``contextlib.asynccontextmanager``: that makes an async generator and its wrapper per use,
    about 3 µs against 0.7 µs, twice per action in Redis mode."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            return
        what = self.what
        if isinstance(exc, (ClusterDownError, TryAgainError, AskError)):
            # a Cluster failing over or resharding (MOVED is an AskError): an outage of that
            # shard, not a bug
            raise BackendUnavailable(f"redis cluster unavailable during {what}: {exc}") from exc
        if isinstance(exc, ResponseError):  # a command refused: Redis's state, or a bug of ours
            REFUSALS.refused(what, exc)
            raise BackendUnavailable(f"redis refused {what}") from exc
        if isinstance(exc, (RedisError, RedisClusterException, OSError, TimeoutError)):
            raise BackendUnavailable(f"redis unavailable during {what}") from exc
        if isinstance(exc, RuntimeError) and TRANSPORT_CLOSED in str(exc):
            # uvloop's answer to a write on a transport that closed under redis-py (a connect
            # racing Redis's restart): a lost connection, as asyncio's own ConnectionError is
            raise BackendUnavailable(f"redis connection lost during {what}") from exc

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        self.__exit__(kind, exc, tb)


@dataclass(frozen=True, slots=True)
class Limits:
    """The numbers every party script needs (the ARGV header)."""

    history_size: int
    party_ttl: float
    action_record_ttl: float
    presence_ttl: float
    action_timeout: float
    #: the history's bytes and age bounds (0 = none), with history_size its HistoryBounds
    history_max_bytes: int = 0
    history_max_age: float = 0.0

    @property
    def history(self) -> HistoryBounds:
        return HistoryBounds(self.history_size, self.history_max_bytes, self.history_max_age)


class Scripts:
    """The registered scripts plus the KEYS and ARGV conventions of ``_lib.lua``."""

    def adopt(self, limits: Limits) -> None:
        """Write with ``limits`` from the next call on (an engine worker takes the nodes'
        settings when they change: ``RedisBackend.adopt``)."""
        self.limits = limits
        self._history = limits.history.header()  # ARGV[4], parsed once by _lib.lua's prelude
        # ARGV[3] and ARGV[6] as text once (hiredis formats a number on every call)
        self._party_ttl_ms = str(int(limits.party_ttl * 1000))
        self._record_ttl_ms = str(int(max(limits.action_record_ttl, limits.action_timeout) * 1000))

    def __init__(
        self,
        client: Redis | RedisCluster,
        keys: KeySpace,
        limits: Limits,
        *,
        timeout: float = 5.0,
        delay: float = 0.0,
    ) -> None:
        """``delay``: the batcher's write delay (``redis_write_delay``)."""
        self.keys = keys
        self.adopt(limits)
        lib = _source("_lib")
        sharded = isinstance(client, RedisCluster)
        self._party: dict[str, Script] = {}
        # the party keys each script is given (key_layout; None: all eleven)
        self._layout: dict[str, tuple[int, ...] | None] = {}
        for name in PARTY_SCRIPTS:
            text, self._layout[name] = party_script(lib, _source(name), sharded=sharded)
            self._party[name] = client.register_script(text)
        self.index_forget = client.register_script(_source("index_forget"))
        self._client = client
        self.batcher: ScriptBatcher | ShardedBatcher = (
            ShardedBatcher(client, timeout=timeout, delay=delay)
            if isinstance(client, RedisCluster)
            else ScriptBatcher(client, timeout=timeout, delay=delay)
        )
        # Per call: the party's eleven key names and its channel (cached, bounded), and an epoch
        # candidate unique to this process (random per process, then counted).
        self._party_names: dict[str, tuple[PartyKeys, str]] = {}
        self._epoch_base = "ep-" + secrets.token_hex(6)
        self._epochs = itertools.count()

    async def load(self) -> None:
        """SCRIPT LOAD every script (redis-py also reloads one on NOSCRIPT)."""
        with unavailable("script load"):
            for script in (*self._party.values(), self.index_forget):
                await load_script(self._client, script)

    def _names(self, party_id: str) -> tuple[PartyKeys, str]:
        names = self._party_names.get(party_id)
        if names is None:
            if len(self._party_names) >= 10_000:
                self._party_names.clear()
            names = (self.keys.party_keys(party_id), party_channel(party_id))
            self._party_names[party_id] = names
        return names

    def party_keys(
        self,
        party_id: str,
        action_id: str | None = None,
        narration: bool = False,
        action_ids: Sequence[str] = (),
        layout: tuple[int, ...] | None = None,
    ) -> list[str]:
        """A party script's KEYS: the party's keys (cached; those of ``layout`` if given: the
        script's ``key_layout``), then the action record's or the narration hash's if the script
        needs one (or several action records: publish_many)."""
        names = self._names(party_id)[0]
        keys = list(names) if layout is None else [names[i] for i in layout]
        if action_id is not None:
            keys.append(self.keys.action(party_id, action_id))
        elif narration:
            keys.append(self.keys.narration(party_id))
        for other in action_ids:
            keys.append(self.keys.action(party_id, other))
        return keys

    def header(self, party_id: str, now: float) -> list[Arg]:
        """ARGV[1..6]: epoch candidate, channel, party_ttl ms, history bounds (``"300"`` or
        ``"300:262144:1800000"``: HistoryBounds.header), now, record ttl ms."""
        return [
            f"{self._epoch_base}{next(self._epochs):x}",
            self._names(party_id)[1],
            self._party_ttl_ms,
            self._history,
            f"{now:.6f}",
            self._record_ttl_ms,
        ]

    async def forget_index(
        self, pipe: Pipeline | ClusterPipeline, index: str, party_id: str, score: float
    ) -> None:
        """Queue ``index_forget.lua`` on ``pipe``. In a Cluster pipeline as ``EVAL`` of its text:
        redis-py does not load a Cluster pipeline's scripts first, and a promoted replica has
        none cached (a small script, in the sweeps only)."""
        if isinstance(pipe, ClusterPipeline):
            pipe.eval(text(self.index_forget.script), 1, index, party_id, repr(score))
        else:
            await self.index_forget(keys=[index], args=[party_id, repr(score)], client=pipe)

    async def run(
        self,
        name: str,
        party_id: str,
        now: float,
        args: Sequence[Arg] = (),
        *,
        action_id: str | None = None,
        narration: bool = False,
        action_ids: Sequence[str] = (),
        client: Any = None,
        published: str | None = None,
    ) -> Any:
        """Call one party script (``client`` may be a pipeline, which queues it instead).
        ``published``: an ``Idempotency-Key`` whose record is the script's record key
        (``publish.lua``), in place of an action's."""
        keys = self.party_keys(party_id, action_id, narration, action_ids, self._layout[name])
        if published is not None:
            keys.append(self.keys.published(party_id, published))
        argv = [*self.header(party_id, now), *args]
        if client is None:  # shared with the other calls of this tick (redis_batch)
            return await self.batcher.run(self._party[name], keys, argv)
        if isinstance(client, ClusterPipeline):
            # EVAL of the text, not EVALSHA: redis-py loads no scripts before a Cluster
            # pipeline, and a promoted replica has none cached (NOSCRIPT would fail the whole
            # pipeline). Redis finds the compiled script by the text's SHA1; the cost is the
            # text on the wire, for the pipelined presence and vote steps only.
            script = self._party[name]
            return client.eval(text(script.script), len(keys), *keys, *argv)
        return await self._party[name](keys=keys, args=argv, client=client)


def fold_args(type_: str, payload: Mapping[str, Any]) -> list[Arg]:
    """What ``fold`` in ``_lib.lua`` needs to apply an event to the projection.

    Raises (KeyError, TypeError) on a payload the projection cannot fold, before anything is
    recorded, as ``Projection.apply`` does in memory. Payloads travel as JSON, never re-encoded by
    Lua (cjson would turn ``[]`` into ``{}``).
    """
    if type_ == t.PARTY_JOIN:
        return [payload["character_id"], payload["display_name"]]
    if type_ == t.PARTY_LEAVE:
        return [payload["character_id"], str(payload.get("reason", ""))]
    if type_ in (t.SCENE_UPDATE, t.COMBAT_UPDATE, t.PARTY_STATE):
        return [orjson.dumps(payload)]
    if type_ == t.VOTE_STARTED:
        vote = {k: payload[k] for k in ("vote_id", "question", "options", "deadline")}
        tallies = {option["id"]: 0 for option in payload["options"]}
        return [payload["vote_id"], orjson.dumps(vote), orjson.dumps(tallies)]
    if type_ == t.VOTE_UPDATE:
        return [
            payload["vote_id"],
            orjson.dumps(payload["tallies"]),
            int(payload["voted"]),
            int(payload["eligible"]),
        ]
    if type_ == t.VOTE_FINISHED:
        return [payload["vote_id"]]
    if type_ == t.ACTION_RESULT:
        return [payload["action_id"], payload["character_id"]]
    return []


def text(value: Any) -> str:
    """A script reply element as str (replies are bytes; numbers may come as int)."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """A flat HGETALL-style reply ``[k1, v1, k2, v2, ...]`` as a dict with str keys."""
    return {text(k): v for k, v in zip(flat[::2], flat[1::2], strict=True)}


def _json(value: Any) -> dict[str, Any] | None:
    return None if value is None else orjson.loads(value)


def snapshot_from(reply: Sequence[Any]) -> Snapshot:
    """The ``Snapshot`` from ``snapshot.lua``'s reply (the projection's rules, see ``fold``)."""
    epoch, seq, member_ids, names_flat, online_ids, state_flat, ballots_flat = reply[:7]
    flights_flat, streams_flat = reply[7], reply[8]
    names = {k: text(v) for k, v in _pairs(names_flat).items()}
    online = {text(c) for c in online_ids}
    state = _pairs(state_flat)
    members = [
        {"character_id": cid, "display_name": names.get(cid, cid), "online": cid in online}
        for cid in map(text, member_ids)
    ]
    scene = _json(state.get("scene"))
    party_state = _json(state.get("party_state"))
    vote = None
    if "vote_id" in state:
        vote = {
            **orjson.loads(state["vote"]),
            "tallies": orjson.loads(state["vote_tallies"]),
            "voted": int(state["vote_voted"]),
            "eligible": int(state["vote_eligible"]),
        }
    return Snapshot(
        epoch=text(epoch),
        seq=int(seq),
        members=members,
        status=str(party_state["status"]) if party_state else DEFAULT_STATUS,
        run_status=str(party_state["run_status"]) if party_state else DEFAULT_RUN_STATUS,
        scene_number=int(scene["scene_number"]) if scene is not None else 0,
        scene=scene,
        combat=_json(state.get("combat")),
        party_state=party_state,
        vote=vote,
        ballots={k: text(v) for k, v in _pairs(ballots_flat).items()},
        actions_in_flight=_flights(flights_flat),
        narration=_streams(streams_flat),
    )


def _flights(flat: Sequence[Any]) -> list[dict[str, str]]:
    """``snapshot.lua``'s actions in flight, oldest first (as ``ActionLedger.in_flight``)."""
    rows = sorted(
        (float(text(flat[i + 3])), text(flat[i]), text(flat[i + 1]), text(flat[i + 2]))
        for i in range(0, len(flat), 4)
    )
    return [
        {"action_id": action_id, "character_id": character_id, "action_type": action_type}
        for _, action_id, character_id, action_type in rows
    ]


def _streams(flat: Sequence[Any]) -> list[dict[str, Any]]:
    """``snapshot.lua``'s open narration streams, oldest first (as ``NarrationBook``)."""
    rows = sorted((float(text(flat[i + 4])), text(flat[i]), i) for i in range(0, len(flat), 5))
    out: list[dict[str, Any]] = []
    for _, stream_id, i in rows:
        entry: dict[str, Any] = {
            "stream_id": stream_id,
            "index": int(text(flat[i + 1])),
            "text": text(flat[i + 2]),
        }
        if flat[i + 3]:
            entry["action_id"] = text(flat[i + 3])
        out.append(entry)
    return out
