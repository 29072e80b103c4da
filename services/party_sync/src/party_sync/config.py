"""Settings of ``party-sync serve``: one table drives the CLI flags, the ``PARTY_SYNC_*``
environment variables and the README's settings table (a test keeps the README in step).

Precedence: command-line flag, then environment variable, then default.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from party_sync.auth import HMAC_ALGORITHMS
from party_sync.backends.keys import ACTIONS_STREAM
from party_sync.protocol.errors import ConfigError

ENV_PREFIX = "PARTY_SYNC_"
#: The most serving processes ``--workers`` may ask for.
MAX_WORKERS = 256
#: The log levels log_level takes (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The most streams ``actions_stream_partitions`` may split the actions stream into.
MAX_STREAM_PARTITIONS = 1024
#: Seconds between a worker's beats to its supervisor (``serve --workers``; ``worker_timeout``).
WORKER_BEAT = 1.0


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def integer(text: str) -> int:
    """An int setting (``int``'s own message names its internals: "invalid literal for int()")."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or ``taskset``'s
    limit counts, not only the machine's cores)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def workers_count(value: str) -> int:
    """``--workers``: a count, or ``auto`` (the CPUs this process may use)."""
    text = value.strip().lower()
    if text == "auto":
        return usable_cpus()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a number of workers or auto: {value!r}") from None


#: The longest ``redis_write_delay`` and ``client_write_delay`` (seconds): a write delay is a
#: latency cost (the Redis one paid twice per action); past a few milliseconds it buys nothing more
#: (docs/redis.md).
MAX_WRITE_DELAY = 0.01
#: The largest number any setting takes: durations (seconds) up to about 31 years, sizes and
#: counts up to 2**31 - 1. Beyond, a value is a typo, and it overflows where it is used (a TTL in
#: milliseconds for Redis, a size for aiohttp's C reader, a timer).
MAX_SECONDS = 1e9
MAX_COUNT = 2**31 - 1
#: Durations Redis or the history keep in whole milliseconds: a positive value below one would
#: round to 0 (a key that expires at once, or no bound at all).
MILLISECOND_SETTINGS = frozenset(
    {
        "party_ttl",
        "presence_ttl",
        "action_record_ttl",
        "action_timeout",
        "narration_idle",
        "history_max_age",
        "presence_grace",
        "redis_command_timeout",
        "redis_probe_interval",
    }
)
#: Why an empty host is refused (serve's host, engine-http's --host): it would listen everywhere.
EMPTY_HOST = (
    "must not be empty (0.0.0.0 listens on every interface, 127.0.0.1 on this machine only)"
)


def _option(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the server. Field ``foo_bar`` ↔ ``--foo-bar`` ↔ ``PARTY_SYNC_FOO_BAR``."""

    host: str = _option("127.0.0.1", "Interface to listen on.")
    port: int = _option(8080, "TCP port for WebSocket (/ws), health checks and the HTTP API.")
    workers: int = _option(
        1,
        "Serving processes on the port (SO_REUSEPORT), each a full node of the Redis backend, "
        "supervised by the serve process (a worker that dies is restarted, its players resume; "
        f"SIGTERM drains them all); auto = the CPUs this process may use; at most {MAX_WORKERS}. "
        "More than 1 needs redis_url. 1 = no supervisor: the serve process serves.",
        workers_count,
    )
    worker_timeout: float = _option(
        10.0,
        "With workers > 1: seconds (0 = no watch, else at least 3) a worker may go without "
        "telling the supervisor it runs (it does every second, from its event loop) before it is "
        "killed and started again: a worker that is stopped (SIGSTOP) or whose loop is stuck "
        "still takes new connections on the shared port, which would wait for it. 0 suits a "
        "worker held in a debugger.",
    )
    engine: str = _option(
        "campaign_engine:create_engine",
        "Campaign Engine to host in-process, as MODULE:ATTR (an Engine, a factory of one, or "
        "its class).",
    )
    redis_url: str | None = _option(
        None, "Redis URL; unset = the embedded in-memory backend (one process)."
    )
    redis_sentinels: tuple[str, ...] = _option(
        (),
        "Redis Sentinel addresses (comma-separated host:port): find the master through them and "
        "follow a failover. With them, redis_url gives only the master's password, db and "
        "options (its host is not used; unset = redis://<redis_sentinel_master>/0).",
        _csv,
    )
    redis_sentinel_master: str | None = _option(
        None, "The name the sentinels monitor the master under (sentinel monitor <name> ...)."
    )
    redis_sentinel_password: str | None = _option(
        None, "Password of the sentinels themselves (requirepass in sentinel.conf), if any."
    )
    redis_cluster: bool = _option(
        False,
        "redis_url names any node of a Redis Cluster (7.0 or later): party_sync discovers the "
        "others, follows slot migrations and failovers, and publishes party events with sharded "
        "pub/sub (SPUBLISH). Not with redis_sentinels.",
    )
    redis_cluster_nodes: tuple[str, ...] = _option(
        (),
        "Redis Cluster: more nodes to join it through (comma-separated host:port, with "
        "redis_url's credentials and TLS): the slot map is read from any of them or the node "
        "redis_url names, whichever answers (any may be down or a replica).",
        _csv,
    )
    engine_transport: str = _option(
        "auto",
        "How actions reach the engine: inprocess, stream (Redis Streams), http, or auto "
        "(http if engine_url is set, else stream if redis_url is set, else inprocess).",
    )
    actions_stream: str = _option(
        ACTIONS_STREAM, "Redis stream that accepted actions are appended to (stream mode)."
    )
    actions_stream_maxlen: int = _option(
        100_000,
        "Approximate cap of the actions stream (XADD MAXLEN ~): the oldest entries are trimmed, "
        "handled or not (an action trimmed before any worker started it is answered "
        "action_timeout at its deadline). At least 1000.",
    )
    actions_stream_partitions: int = _option(
        1,
        "Stream mode: split the actions stream into this many streams, <actions_stream>:0 ... "
        "<actions_stream>:N-1, each party's entries in partition crc32(party_id) mod N (on a "
        "Redis Cluster each partition is its own slot); 1 = the one stream <actions_stream>. "
        "engine-worker must be given the same number (docs/engines.md).",
    )
    engine_url: str | None = _option(
        None,
        "POST each accepted action to this URL (an engine behind HTTP); takes precedence over "
        "the Redis stream and the in-process engine.",
    )
    engine_http_timeout: float = _option(5.0, "Seconds one HTTP delivery to the engine may take.")
    engine_http_retries: int = _option(
        8,
        "Retries of an HTTP delivery of an action to the engine while every attempt is refused "
        "at connect time (then the player gets engine_unavailable; action_timeout at the "
        "action's deadline if that comes first), with backoff and full jitter; once an attempt "
        "may have reached the engine (a 5xx, a timeout, a dropped connection) an action is "
        "retried until it is answered or action_record_ttl passes. Join and restate notices are "
        "retried as often, then on with a capped backoff, for up to action_record_ttl.",
    )
    engine_http_claim: str = _option(
        "node",
        "HTTP transport: who claims an action right before the engine starts it. node: this "
        "node, before its first POST (any engine host works); engine: the engine host, through "
        "the claim route (party-sync engine-http does when a delivery asks), so an action no "
        "host started by its deadline gets action_timeout even when its deliveries wait in a "
        "frozen host; costs the host one API call per action.",
    )
    engine_notice_url: str | None = _option(
        None,
        "HTTP transport: POST engine notices (join, restate) to this URL, never to engine_url; "
        "unset = notices are not sent over HTTP.",
    )
    api_key: str | None = _option(
        None,
        "Bearer key of the server API (/api/v1/...) used by engines and gateway_api, and sent "
        "with every HTTP delivery to engine_url (the engine host checks it); unset = the API "
        "refuses every call (401, saying the API is off; the start logs it) and the HTTP "
        "transport cannot start (a random key is made in development mode).",
    )
    redis_prefix: str = _option(
        "party_sync",
        "Redis mode: prefix of every key (channels party:<id>, run:<id> and the actions stream, "
        "public names, have none: deployments sharing a Redis set their own actions_stream).",
    )
    redis_probe_interval: float = _option(
        5.0,
        "Redis mode: seconds of pub/sub silence before a liveness probe; a probe published but "
        "not back within it replaces the pub/sub connection (a probe Redis could not even take, "
        "down or stalled, replaces nothing: that is an outage, not a broken connection).",
    )
    redis_write_delay: float = _option(
        0.0,
        "Redis mode: seconds a node holds a script call before sending it, so that the calls of "
        "the next moments share one write, one round trip and one wake-up (0 = at once; at most "
        "0.01). Less CPU in the node and in Redis at moderate load, for up to two such delays "
        "more latency per action (docs/redis.md).",
    )
    client_write_delay: float = _option(
        0.0,
        "Seconds the frames for the clients wait before they are written, so that those of the "
        "next moments share one write per connection (0 = at the end of the event-loop tick; at "
        "most 0.01). On the embedded backend under load 0.001 saved 11-23 % CPU per message for "
        "about 0.7 ms more median latency; in Redis mode it saved nothing measurable "
        "(docs/benchmarks.md).",
    )
    redis_command_timeout: float = _option(
        5.0,
        "Redis mode: seconds one Redis command may take before the node treats Redis as "
        "unavailable (the client gets backend_unavailable; everything retries by itself).",
    )
    redis_max_connections: int = _option(
        100,
        "Redis mode: connections each Redis client of a node (its commands', the engine stream "
        "link's, the membership directory's) keeps at most (per master with a Cluster), besides "
        "the script batcher's and pub/sub's; when all are busy a command waits for one, within "
        "redis_command_timeout.",
    )
    jwt_secret: str | None = _option(
        None,
        "HMAC secret for connection tokens; unset = development mode: a random secret, kept in "
        "./.party_sync_dev_secret so links survive a restart (serve --new-game discards it); "
        "empty is refused.",
    )
    jwt_previous_secret: str | None = _option(
        None, "The previous secret, still accepted during a rotation."
    )
    jwt_algorithms: tuple[str, ...] = _option(
        ("HS256",), "Accepted JWT algorithms (comma-separated; HS256/HS384/HS512).", _csv
    )
    telegram_bot_token: str | None = _option(
        None,
        "Telegram bot token: enables Mini App sign-in (POST /api/v1/auth/telegram); unset = "
        "that endpoint answers 503.",
    )
    telegram_bot_id: int | None = _option(
        None,
        "Telegram bot id: checks initData's Ed25519 signature (third-party validation, pinned to "
        "this bot) and enables sign-in without the bot token; with the bot token too, a present "
        "signature must verify as well as the hash.",
        integer,
    )
    telegram_test_env: bool = _option(
        False,
        "Check initData signatures with the public key of Telegram's test environment instead "
        "of production's (needs telegram_bot_id).",
    )
    telegram_max_age: float = _option(
        3600.0, "Seconds a Mini App initData is accepted after its auth_date."
    )
    telegram_token_ttl: float = _option(
        3600.0, "Lifetime in seconds of the tokens Telegram sign-in issues."
    )
    allowed_origins: tuple[str, ...] = _option(
        (),
        "Allowed Origin values (comma-separated scheme://host[:port], exactly as browsers send "
        "them; '*' is refused); empty allows any origin (development).",
        _csv,
    )
    max_message_bytes: int = _option(
        65536, "Largest client message accepted, in bytes (at least 1024)."
    )
    api_max_body_bytes: int = _option(
        262144,
        "Largest body of an event or vote published through the server API (/api/v1), in bytes "
        "(at least 4096); larger gets 413. Bounds every event too, whatever publishes it (an "
        "in-process or stream engine: InvalidEvent past this and 4096 bytes of envelope).",
    )
    request_body_timeout: float = _option(
        30.0,
        "Seconds an HTTP API request (/api/v1) has, once its head arrived, to deliver its whole "
        "body; slower gets 408 body_timeout and the connection is closed.",
    )
    send_buffer_bytes: int = _option(
        1 << 20,
        "Bytes that may wait for one slow client before it is disconnected (4002) and resumes "
        "(at least 65536).",
    )
    presence_grace: float = _option(
        5.0, "Seconds after a character's last connection closes before party.leave is sent."
    )
    presence_ttl: float = _option(
        30.0, "Seconds a connection's presence lives without a refresh (bounds a dead node)."
    )
    action_timeout: float = _option(
        10.0, "Seconds a character's action may stay in flight before the character is freed."
    )
    action_record_ttl: float = _option(
        600.0,
        "Seconds an action_id is remembered (repeats get the original result); at least "
        "action_timeout.",
    )
    narration_idle: float = _option(
        30.0,
        "Seconds a live narration stream may go without a new piece before the server closes it "
        "(an engine that died mid-stream); system.hello tells clients as narration_idle_ms.",
    )
    history_size: int = _option(
        300,
        "Events of history kept per party (for resume and a node's gap repair); the default is "
        "max_replay, the most one resume replays.",
    )
    history_max_bytes: int = _option(
        262_144,
        "Encoded bytes of history kept per party: the oldest events are dropped past it (the "
        "newest is always kept). 256 KiB holds 300 events of 874 bytes on average (measured: "
        "the reference engine's 380, the benchmark's 493), so it binds only on larger events "
        "(an event may be 256 KiB). 0 = no bound.",
    )
    history_max_age: float = _option(
        1800.0,
        "Seconds an event stays in a party's history (checked at each new event; the newest is "
        "always kept): a client away longer gets a snapshot instead of a replay. 30 min covers "
        "a blip or a locked phone, and at one action per 10 s 300 events span 25 min, so it "
        "cuts only slower parties' history. 0 = no bound.",
    )
    party_ttl: float = _option(
        3600.0, "Seconds a party's state and history are kept after its last activity."
    )
    max_replay: int = _option(
        300,
        "Most events replayed on resume; a larger gap gets a fresh snapshot. At most "
        "history_size (a resume replays only what the history holds; above it, a start WARNING).",
    )
    heartbeat: float = _option(25.0, "Seconds between WebSocket pings; no pong in time closes.")
    request_head_timeout: float = _option(
        10.0,
        "Seconds a connection has to send a complete request head (request line and headers), "
        "from when it opens or from the first byte of its next request; later, it is closed.",
    )
    keepalive_timeout: float = _option(
        15.0,
        "Seconds an idle HTTP keep-alive connection stays open between requests (an upgraded "
        "WebSocket is governed by heartbeat instead).",
    )
    max_connections_per_ip: int = _option(
        200,
        "Open connections (HTTP and WebSocket) per client address (IPv4, or IPv6 /64) on this "
        "node; more are closed at once. The socket's peer address counts: behind a reverse "
        "proxy that is the proxy's, so set 0 there and limit at the proxy. 0 = unlimited.",
    )
    max_connections_per_user: int = _option(
        20,
        "Open WebSockets per token subject (sub; per character without one) on this node; "
        "more get HTTP 429 too_many_connections. 0 = unlimited.",
    )
    handshake_rate_per_user: float = _option(
        2.0,
        "WebSocket sessions a user (token subject; per character without one) may open per "
        "second on this node, sustained; past the burst, more get HTTP 429 too_many_handshakes "
        "with Retry-After. Bounds a player who reconnects in a loop (each join and leave is an "
        "event for the whole party). A handshake that fails costs nothing. 0 = unlimited.",
    )
    handshake_burst_per_user: float = _option(
        30.0,
        "WebSocket sessions a user may open at once before handshake_rate_per_user applies "
        "(at least 1).",
    )
    rate_limit: float = _option(
        30.0, "Messages per second a connection may send (sustained; more than 0)."
    )
    rate_burst: float = _option(60.0, "Messages a connection may send in a burst (at least 1).")
    shutdown_timeout: float = _option(
        10.0, "Seconds to wait for clients to close on SIGTERM/SIGINT/SIGHUP."
    )
    event_loop: str = _option(
        "auto",
        "Event loop of the server: uvloop, asyncio (the stock loop), or auto (uvloop when it "
        "is installed, else asyncio).",
    )
    log_level: str = _option("INFO", "Log level (DEBUG, INFO, WARNING, ERROR, CRITICAL).")
    log_format: str = _option(
        "json",
        "Log format: json (one object per line) or text (one line: the message, then the "
        "fields, trace_id=... party_id=...).",
    )

    @property
    def resolved_engine_transport(self) -> str:
        """The transport ``auto`` stands for with this configuration."""
        if self.engine_transport != "auto":
            return self.engine_transport
        if self.engine_url:
            return "http"
        return "stream" if self.redis_url else "inprocess"

    @property
    def dev_mode(self) -> bool:
        """Development mode: no secret configured (a random one is made, loudly)."""
        return not self.jwt_secret


def _parser_for(f: Any) -> Callable[[str], Any]:
    custom = f.metadata.get("parse")
    if custom is not None:
        return custom  # type: ignore[no-any-return]
    if f.type in ("int", int):
        return integer
    if f.type in ("float", float):
        return number
    if f.type in ("bool", bool):
        return _bool
    return str


def options() -> list[tuple[str, str, str, Any]]:
    """``(flag, env var, help, default)`` for every setting, in declaration order."""
    return [
        (
            "--" + f.name.replace("_", "-"),
            ENV_PREFIX + f.name.upper(),
            f.metadata["help"],
            f.default,
        )
        for f in fields(Settings)
    ]


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ``ValueError`` message is what the flag's error says
    (argparse shows only an ``ArgumentTypeError``'s own: else "invalid _bool value: 'x'"), the
    same words as the environment variable's."""

    def flag_type(text: str) -> Any:
        try:
            return parse(text)
        except argparse.ArgumentTypeError:
            raise
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return flag_type


def shown_default(default: Any) -> str:
    """A setting's default as ``--help`` shows it (as the other commands show theirs), and the
    README's settings table (scripts/settings_table.py)."""
    if default is None:
        return "unset"
    if isinstance(default, tuple):
        return ",".join(default) if default else "empty"
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        # A boolean flag alone means true (``--redis-cluster``); a value still works.
        alone: dict[str, Any] = {"nargs": "?", "const": True} if f.type in ("bool", bool) else {}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            type=_flag_type(_parser_for(f)),
            # argparse formats a help text with %: a literal one (a "%" in prose) is doubled
            help=(
                f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}] "
                f"({shown_default(f.default)})"
            ).replace("%", "%%"),
            **alone,
        )


def load(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    flags: Collection[str] = (),
) -> Settings:
    """Build ``Settings`` from flags (if given), then the environment, then defaults.
    ``flags``: settings another command took as its own flags and passed in ``env``, named in
    an error by their flag (``engine-worker --redis-url``), not by the variable."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # a given setting's flag or variable, named in its errors
    for f in fields(Settings):
        given = getattr(args, f.name, None) if args is not None else None
        if given is not None:
            values[f.name] = given
            sources[f.name] = "--" + f.name.replace("_", "-")
            continue
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        try:
            values[f.name] = _parser_for(f)(raw)
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}: {exc}") from None
        sources[f.name] = (
            "--" + f.name.replace("_", "-") if f.name in flags else ENV_PREFIX + f.name.upper()
        )
    if values.get("redis_sentinels") and not values.get("redis_url"):
        # Sentinel mode needs no URL: Redis mode is on, db 0, no password (redis_connect.py).
        values["redis_url"] = f"redis://{values.get('redis_sentinel_master') or 'sentinel'}/0"
    settings = Settings(**values)
    try:
        validate(settings)
    except ConfigError as exc:
        raise ConfigError(with_sources(str(exc), sources)) from None
    return settings


_SETTING_WORD = re.compile(r"(?<![\w-])([a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?![\w-])")


def with_sources(message: str, sources: Mapping[str, str]) -> str:
    """``message`` (a check's words, which name settings as ``Settings`` does: ``rate_limit``)
    followed by where each setting it names was given, when not by default (a new-user probe:
    ``PARTY_SYNC_RATE_LIMIT=0`` said "rate_limit must be > 0", in no words the user had typed).
    Only the flag or variable: never its value (a URL or a secret)."""
    named = []
    for match in _SETTING_WORD.finditer(message):
        word = match.group(1)
        if "_" not in word and match.start() > 0:  # "host", "engine": a setting only as the subject
            continue
        source = sources.get(word)
        if source is not None and source not in named:
            named.append(source)
    return f"{message} (set by {', '.join(named)})" if named else message


def http_url_problem(name: str, url: str | None) -> str | None:
    """Why ``url`` (setting ``name``) is not an http(s) URL with a host, or None (unset
    included). The URL itself is not repeated: it may hold a password."""
    if not url:
        return None
    parts = _split(url)
    if parts is None:
        return f"{name} is not a URL (an unbalanced '[' or a bad port)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        scheme = f"{parts.scheme}://..." if parts.scheme else "no scheme"
        return f"{name} must be an http:// or https:// URL with a host (got {scheme})"
    return None


def _split(url: str) -> SplitResult | None:
    """``urlsplit(url)`` with its port read (both raise ``ValueError`` on a malformed one), or
    None for a string that is no URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (read for its ValueError)
    except ValueError:
        return None
    return parts


def _without_userinfo(entry: str) -> str:
    """``entry`` as it may be quoted: what precedes its last ``@`` (a user and password, however
    malformed the rest: no scheme, a ``/`` or ``#`` in the password) left out, its scheme kept."""
    at = entry.rfind("@")
    if at < 0:
        return entry
    scheme = entry.find("://", 0, at)
    return (entry[: scheme + 3] if scheme >= 0 else "") + "…@" + entry[at + 1 :]


def _origins_problem(origins: Sequence[str]) -> str | None:
    """Why an ``allowed_origins`` entry can never equal a browser's ``Origin`` header
    (``scheme://host[:port]``, nothing after it), or None: such an entry refuses every page.
    An entry is quoted without a user and password in it (re-check probe: the refusal of a
    trailing slash quoted the password its entry held)."""
    for origin in origins:
        if "@" in origin:  # (no origin has one: a user and password, whatever else is wrong)
            shown = _without_userinfo(origin)
            return f"allowed_origins: an origin has no user or password (got one in {shown!r})"
        if origin == "*":
            return (
                "allowed_origins: '*' is not a wildcard here; list the pages' origins "
                "(https://host[:port]), or leave allowed_origins empty to allow any (development)"
            )
        parts = _split(origin)
        if (
            parts is None
            or not (parts.scheme and parts.netloc)
            or parts.path
            or parts.query
            or parts.fragment
        ):
            return (
                f"allowed_origins: {origin!r} is not an origin: scheme://host[:port], with no "
                "path or trailing slash (as browsers send it in the Origin header)"
            )
        if parts.username is not None or parts.password is not None:
            return f"allowed_origins: an origin has no user or password (got one in {origin!r})"
        host_problem = _origin_host_problem(parts)
        if host_problem is not None:
            return f"allowed_origins: {origin!r}: {host_problem}"
        canonical = _serialized_origin(parts)
        if origin != canonical:
            return (
                f"allowed_origins: {origin!r} is never what a browser sends; it sends "
                f"{canonical!r} (scheme and host in lower case, no default port)"
            )
    return None


#: The port a browser leaves out of an Origin (RFC 6454 4: the scheme's default).
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin_host_problem(parts: SplitResult) -> str | None:
    """Why no browser's Origin can have this scheme and host (WHATWG URL: a host is sent in
    ASCII, an IP address in its one written form), or None."""
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme in ("ws", "wss"):
        return "a page's origin is http:// or https:// (ws:// is the WebSocket endpoint's URL)"
    if "%" in host:
        return "no percent-encoding or zone id in an origin's host"
    if not host.isascii():
        # (the ASCII form is not given: Python's codec is IDNA 2003, browsers use UTS 46, and
        # they differ, e.g. for ß)
        return "browsers send the host in ASCII (punycode, xn--...): write it so"
    if "*" in host or any(c.isspace() for c in host):
        return "no wildcard or space in an origin's host: list each origin"
    if ":" in host:  # an IPv6 literal: browsers write it compressed, in lower case
        try:
            written = ipaddress.IPv6Address(host).compressed
        except ValueError:
            return "not an IPv6 address"
        if written != host:
            return f"browsers send {_serialized_origin(parts, f'[{written}]')}"
        return None
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if last and (last.isdigit() or last.startswith("0x")):  # an IPv4 address (WHATWG URL)
        try:
            dotted = str(ipaddress.IPv4Address(host))
        except ValueError:
            return "browsers send an IPv4 address as four decimal numbers (a.b.c.d)"
        if dotted != host:
            return f"browsers send {_serialized_origin(parts, dotted)}"
    return None


def _serialized_origin(parts: SplitResult, host: str | None = None) -> str:
    """The origin as a browser serializes it (RFC 6454 6.1): the scheme and host in lower case
    (``hostname`` lower-cases it), the port only when it is not the scheme's default; ``host``
    as given when given (written as a browser writes it already)."""
    scheme, port = parts.scheme.lower(), parts.port
    if host is None:
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal keeps its brackets
            host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


#: What every refusal of a malformed ``redis_url`` ends with: the likely cause.
_ENCODE_HINT: Final = (
    "a user name or password holding / # ? @ : % must be percent-encoded (%2F %23 %3F %40 %3A %25)"
)
#: redis-py's own words about an option's value: they name the option, nothing of the URL.
_BAD_OPTION_VALUE: Final = re.compile(r"Invalid value for '[A-Za-z0-9_]{1,40}' in connection URL\.")
#: A Redis host: a DNS name (underscores too: container names; letters beyond ASCII too: the
#: resolver's IDNA encoding takes them), an IPv4 address, or an IPv6 address (brackets removed by
#: urlsplit) with an optional zone.
_HOST: Final = re.compile(r"[\w.-]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9._-]+)?")
#: The URL options that name a file party_sync can check for at start.
_FILE_OPTIONS: Final = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _redis_url_problem(url: str | None, *, host_used: bool = True) -> str | None:
    """What is wrong with ``redis_url`` as redis-py would read it, or None (unset included).
    No refusal repeats the URL or any part of it that may be a password's. ``host_used``:
    False with Sentinel (the host is the master's name, or not used at all)."""
    if not url:
        return None
    from redis.asyncio.connection import parse_url

    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced '[' (fix-check probe: a traceback, not this line)
        return (
            "redis_url is not a URL (an unbalanced '[': an IPv6 host is written "
            f"redis://[::1]:6379/0; and {_ENCODE_HINT})"
        )
    tcp = parts.scheme in ("redis", "rediss")
    if "#" in url or "@" in parts.query or ("@" in parts.path if tcp else "@/" in parts.path):
        # a Redis URL has no fragment, and its credentials come before the host: a '#', or an
        # '@' after the host, is a password not encoded, whose first part would be read as
        # the host, the port or an option (and logged as such), or which would leave no host
        # at all: localhost:6379 without a password (redis variants probe)
        return f"redis_url is not a URL redis-py can read: {_ENCODE_HINT}"
    try:
        parse_url(url)
    except ValueError as exc:
        if "@" not in url or _BAD_OPTION_VALUE.fullmatch(str(exc)):
            return f"redis_url: {exc}"  # redis-py's words, which name no credential
        # with credentials its words may quote a piece of the password ("Port could not be
        # cast to integer value as '<the part before a />'"): the URL is not repeated
        return (
            "redis_url is not a URL redis-py can read (redis[s]://[user:password@]host:port/db "
            f"or unix://[user:password@]/path?db=N); {_ENCODE_HINT}"
        )
    if tcp and not parts.hostname:
        return f"redis_url names no host (redis[s]://[user:password@]host:port/db); {_ENCODE_HINT}"
    if tcp and host_used and not _HOST.fullmatch(unquote(parts.hostname or "")):
        # a space, a bracket, a quote: no resolver finds it, and the node would only say so
        # later, as "Redis unavailable", again and again (the host is not repeated here)
        return (
            "redis_url: the host is neither a name (letters, digits, '.', '-', '_') nor an IP "
            f"address (an IPv6 address in brackets: redis://[::1]:6379/0); {_ENCODE_HINT}"
        )
    unknown = _unknown_redis_options(url)
    if unknown:
        return (
            f"redis_url: {', '.join(unknown)}: not an option of a {parts.scheme}:// connection "
            '(docs/redis.md, "Credentials, TLS and ACL"; the ssl_* options need rediss://)'
        )
    options = dict(parse_qsl(parts.query))
    for name in _FILE_OPTIONS:
        if name in options and not os.path.isfile(options[name]):
            return f"redis_url: {name} names no readable file: {options[name][:200]}"
    if url.startswith("unix:") and not parts.path.strip("/"):
        return (
            "redis_url: a unix:// URL needs the socket's path (unix://[user:password@]/path/to/"
            f"redis.sock?db=N); {_ENCODE_HINT}"
        )
    if not url.startswith("unix:"):
        path = parts.path.strip("/")
        if path and not path.isdigit():
            # redis-py ignores such a path and uses db 0: say so before anything is written there
            return "redis_url: the path must be a database number (redis://host:port/0), or none"
    return None


def _unknown_redis_options(url: str) -> list[str]:
    """The names in ``url``'s query that redis-py's connection for its scheme does not take:
    redis-py passes every one to the connection, whose constructor then raised ``TypeError``
    at the first connect (a traceback at start). A connection object is made for each name,
    as redis-py would make it; nothing connects."""
    from redis.asyncio.connection import Connection, parse_url

    unknown = []
    for name, value in parse_qsl(urlsplit(url).query):
        options: dict[str, Any] = dict(
            parse_url(url.partition("?")[0] + "?" + urlencode({name: value}))
        )
        kind = options.pop("connection_class", Connection)
        try:
            kind(**options)
        except TypeError:
            unknown.append(name[:40])
        except ValueError:
            pass  # a value redis-py refuses when it connects says so itself, as before
    return unknown


def _sentinel_problem(settings: Settings) -> str | None:
    """What is wrong with the Sentinel settings (docs/redis.md, "Deployment topologies")."""
    from party_sync.backends.redis_connect import (
        cluster_url_problem,
        parse_addresses,
        sentinel_url_problem,
    )

    if settings.redis_cluster and not settings.redis_url:
        return "redis_cluster needs redis_url (any node of the cluster)"
    if settings.redis_cluster and settings.redis_sentinels:
        return (
            "redis_cluster and redis_sentinels exclude each other: a Redis Cluster fails over "
            "by itself (no Sentinel)"
        )
    if settings.redis_cluster and settings.redis_url:
        problem = cluster_url_problem(settings.redis_url)
        if problem is not None:
            return problem
    if settings.redis_cluster_nodes:
        if not settings.redis_cluster:
            return "redis_cluster_nodes needs redis_cluster"
        try:
            parse_addresses(settings.redis_cluster_nodes)
        except ValueError as exc:
            return f"redis_cluster_nodes: {exc} (expected host:port,host:port)"
    if not settings.redis_sentinels:
        if settings.redis_sentinel_master:
            return "redis_sentinel_master needs redis_sentinels (host:port,host:port)"
        if settings.redis_sentinel_password:  # (it was ignored without a word: new user probe)
            return "redis_sentinel_password needs redis_sentinels (host:port,host:port)"
        return None
    try:
        parse_addresses(settings.redis_sentinels)
    except ValueError as exc:
        return f"redis_sentinels: {exc} (expected host:port,host:port)"
    if not settings.redis_sentinel_master:
        return "redis_sentinels needs redis_sentinel_master (the name in sentinel monitor <name>)"
    if not settings.redis_url:
        return "redis_sentinels needs redis_url or none at all (it is set from the master name)"
    return sentinel_url_problem(settings.redis_url)


def _is_bot_token(token: str) -> bool:
    """``<bot id>:<secret>``, the form of every bot token (never quoted in an error)."""
    bot_id, sep, secret = token.partition(":")
    return bool(sep) and bot_id.isdigit() and bool(secret) and not any(c.isspace() for c in token)


def engine_spec_parts(spec: str) -> tuple[str, str] | None:
    """``MODULE:ATTR`` as (module, attribute), or None for a spec of another form (the one rule,
    checked at start and by ``engine.loader.load_engine``)."""
    module_name, sep, attr = spec.partition(":")
    return (module_name, attr) if sep and module_name.strip() and attr.strip() else None


def _bot_ids_agree(settings: Settings) -> bool:
    """A bot token starts with its bot's id (``<id>:<secret>``): both settings name one bot."""
    token, bot_id = settings.telegram_bot_token, settings.telegram_bot_id
    if not token or bot_id is None:
        return True
    prefix = token.partition(":")[0]
    return not prefix.isdigit() or int(prefix) == bot_id


def validate(settings: Settings) -> None:
    for option in fields(settings):
        value = getattr(settings, option.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{option.name} must be a finite number")
        if isinstance(value, float) and value > MAX_SECONDS:
            raise ConfigError(f"{option.name} must be at most {MAX_SECONDS:.0e}")
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value > MAX_COUNT
            and option.name != "telegram_bot_id"  # an id, not a count: bounded below
        ):
            raise ConfigError(f"{option.name} must be at most {MAX_COUNT}")
        if option.name in MILLISECOND_SETTINGS and 0 < value < 0.001:
            raise ConfigError(f"{option.name} must be at least 0.001 (one millisecond)")
    checks: Sequence[tuple[bool, str]] = (
        (
            bool(settings.host.strip()),
            f"host {EMPTY_HOST}",
        ),
        (0 < settings.port < 65536, "port must be 1..65535"),
        (1 <= settings.workers <= MAX_WORKERS, f"workers must be 1..{MAX_WORKERS} or auto"),
        (
            settings.worker_timeout == 0 or settings.worker_timeout >= WORKER_BEAT * 3,
            f"worker_timeout must be 0 (no watch) or at least {WORKER_BEAT * 3:g} seconds (a "
            f"worker beats every {WORKER_BEAT:g} s)",
        ),
        (
            settings.workers == 1 or bool(settings.redis_url),
            f"workers {settings.workers} needs the Redis backend (redis_url): the embedded "
            "backend keeps every party in one process, and workers would share no state "
            "(use --workers 1, or set PARTY_SYNC_REDIS_URL)",
        ),
        (settings.max_message_bytes >= 1024, "max_message_bytes must be at least 1024"),
        (settings.api_max_body_bytes >= 4096, "api_max_body_bytes must be at least 4096"),
        (settings.request_body_timeout > 0, "request_body_timeout must be > 0"),
        (settings.send_buffer_bytes >= 65536, "send_buffer_bytes must be at least 65536"),
        (settings.presence_grace >= 0, "presence_grace must be >= 0"),
        (settings.presence_ttl > 0, "presence_ttl must be > 0"),
        (settings.action_timeout > 0, "action_timeout must be > 0"),
        (settings.action_record_ttl > 0, "action_record_ttl must be > 0"),
        (
            settings.action_record_ttl >= settings.action_timeout,
            "action_record_ttl must be at least action_timeout: an action's record must outlive "
            "its deadline (a resend after the record expired would be a new action, run again)",
        ),
        (settings.narration_idle > 0, "narration_idle must be > 0"),
        (settings.shutdown_timeout >= 0, "shutdown_timeout must be >= 0"),
        (settings.engine_http_timeout > 0, "engine_http_timeout must be > 0"),
        (settings.engine_http_retries >= 0, "engine_http_retries must be >= 0"),
        (settings.history_size >= 1, "history_size must be >= 1"),
        (settings.history_max_bytes >= 0, "history_max_bytes must be >= 0 (0 = no bound)"),
        (
            math.isfinite(settings.history_max_age) and settings.history_max_age >= 0,
            "history_max_age must be a finite number >= 0 (0 = no bound)",
        ),
        (settings.max_replay >= 0, "max_replay must be >= 0"),
        (settings.party_ttl > 0, "party_ttl must be > 0"),
        (settings.redis_probe_interval > 0, "redis_probe_interval must be > 0"),
        (settings.redis_command_timeout > 0, "redis_command_timeout must be > 0"),
        (settings.redis_max_connections >= 1, "redis_max_connections must be >= 1"),
        (
            0 <= settings.redis_write_delay <= MAX_WRITE_DELAY,
            f"redis_write_delay must be 0..{MAX_WRITE_DELAY} seconds",
        ),
        (
            0 <= settings.client_write_delay <= MAX_WRITE_DELAY,
            f"client_write_delay must be 0..{MAX_WRITE_DELAY} seconds",
        ),
        (bool(settings.redis_prefix), "redis_prefix must not be empty"),
        (bool(settings.actions_stream.strip()), "actions_stream must not be empty"),
        (
            # a production secret that expanded to nothing must not start a development server
            # (its /api/v1/dev/token hands anyone a token): unset it for development mode
            settings.jwt_secret is None or settings.jwt_secret.strip() != "",
            "jwt_secret must not be empty (unset it for development mode)",
        ),
        (settings.telegram_max_age > 0, "telegram_max_age must be > 0"),
        (
            settings.telegram_bot_id is None or 0 < settings.telegram_bot_id < 2**63,
            "telegram_bot_id must be a positive integer",
        ),
        (
            not settings.telegram_test_env or settings.telegram_bot_id is not None,
            "telegram_test_env needs telegram_bot_id",
        ),
        (
            not settings.telegram_bot_token or _is_bot_token(settings.telegram_bot_token),
            "telegram_bot_token must be a bot token as @BotFather gives it: <bot id>:<secret>",
        ),
        (_bot_ids_agree(settings), "telegram_bot_id differs from the id in telegram_bot_token"),
        (
            bool(settings.jwt_algorithms) and set(settings.jwt_algorithms) <= HMAC_ALGORITHMS,
            f"jwt_algorithms must be among {', '.join(sorted(HMAC_ALGORITHMS))} (connection "
            "tokens are signed with a shared secret)",
        ),
        (
            settings.resolved_engine_transport != "inprocess"
            or engine_spec_parts(settings.engine) is not None,
            f"engine must be MODULE:ATTR, got {settings.engine!r}",
        ),
        (settings.telegram_token_ttl > 0, "telegram_token_ttl must be > 0"),
        (settings.heartbeat > 0, "heartbeat must be > 0"),
        (settings.request_head_timeout > 0, "request_head_timeout must be > 0"),
        (settings.keepalive_timeout > 0, "keepalive_timeout must be > 0"),
        (settings.max_connections_per_ip >= 0, "max_connections_per_ip must be >= 0"),
        (settings.max_connections_per_user >= 0, "max_connections_per_user must be >= 0"),
        (
            settings.handshake_rate_per_user >= 0 and settings.handshake_burst_per_user >= 1,
            "handshake_rate_per_user must be >= 0 and handshake_burst_per_user >= 1",
        ),
        (settings.rate_limit > 0, "rate_limit must be > 0"),
        (settings.rate_burst >= 1, "rate_burst must be >= 1"),
        (settings.log_format in {"json", "text"}, "log_format must be json or text"),
        (
            settings.log_level.upper() in LOG_LEVELS,
            f"log_level must be one of {', '.join(LOG_LEVELS)}",
        ),
        (
            settings.event_loop in {"auto", "uvloop", "asyncio"},
            "event_loop must be auto, uvloop or asyncio",
        ),
        (
            settings.engine_transport in {"auto", "inprocess", "stream", "http"},
            "engine_transport must be auto, inprocess, stream or http",
        ),
        (
            settings.engine_http_claim in {"node", "engine"},
            "engine_http_claim must be node or engine",
        ),
        (
            settings.engine_transport != "stream" or bool(settings.redis_url),
            "engine_transport stream needs redis_url",
        ),
        (
            settings.engine_transport != "http" or bool(settings.engine_url),
            "engine_transport http needs engine_url",
        ),
        (settings.actions_stream_maxlen >= 1000, "actions_stream_maxlen must be >= 1000"),
        (
            1 <= settings.actions_stream_partitions <= MAX_STREAM_PARTITIONS,
            f"actions_stream_partitions must be 1 to {MAX_STREAM_PARTITIONS}",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    problem = (
        _origins_problem(settings.allowed_origins)
        or http_url_problem("engine_url", settings.engine_url)
        or http_url_problem("engine_notice_url", settings.engine_notice_url)
        or _redis_url_problem(settings.redis_url, host_used=not settings.redis_sentinels)
        or _sentinel_problem(settings)
    )
    if problem is not None:
        raise ConfigError(problem)
