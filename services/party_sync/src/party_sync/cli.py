"""``party-sync``: ``serve`` runs the server, ``token`` mints a connection token."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from party_sync import __version__, config, devmode, logs
from party_sync.auth import HMAC_ALGORITHMS, MAX_TIMESTAMP, issue_token, min_secret_bytes
from party_sync.backends.keys import ACTIONS_STREAM
from party_sync.devmode import DEV_SECRET_FILE
from party_sync.protocol.errors import ConfigError, EngineStartError, ListenError, one_line

if TYPE_CHECKING:
    from party_sync.backends.redis_backend import RedisBackend

log = logging.getLogger("party_sync")


def _finite_positive(value: float) -> bool:
    return 0 < value < float("inf")  # false for NaN too


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (not inf, nan, 0 or negative), at most
    ``config.MAX_SECONDS`` (as every setting of ``serve``)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not _finite_positive(value) or value > config.MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be a finite number > 0 seconds, at most {config.MAX_SECONDS:.0e}, not {text!r}"
        )
    return value


#: The most entries ``engine-worker --batch`` may take at once.
MAX_WORKER_BATCH = 1000
#: The most read loops ``engine-worker --concurrency`` may run per stream.
MAX_CONCURRENCY = 256


def _count(text: str, most: int) -> int:
    """A whole number 1..``most`` written in ASCII digits (``int`` also takes ``1_000`` and
    other scripts' digits, which no operator means)."""
    digits = text.strip()
    value = int(digits) if digits.isascii() and digits.isdigit() else 0
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"must be a whole number 1..{most}, not {text!r}")
    return value


def _batch(text: str) -> int:
    """An argparse type: entries an engine worker takes at once, 1..``MAX_WORKER_BATCH``."""
    return _count(text, MAX_WORKER_BATCH)


def _concurrency(text: str) -> int:
    """An argparse type: read loops an engine worker runs per stream, 1..``MAX_CONCURRENCY``."""
    return _count(text, MAX_CONCURRENCY)


def _partitions(text: str) -> int:
    """An argparse type: a count of actions-stream partitions, 1..``MAX_STREAM_PARTITIONS``."""
    return _count(text, config.MAX_STREAM_PARTITIONS)


def _name(text: str) -> str:
    """An argparse type: a name that is not empty (nor only blanks)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _port(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be a port 1..65535, not {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose error is two lines (what is wrong, and where the options are)
    instead of the whole usage first: ``serve``'s usage alone is 57 lines, above the error."""

    #: The subcommands' parsers by name (``_parser``), so that an argument no command takes is
    #: refused by the command's own parser, which names it (``party-sync serve: error: …``).
    commands: Mapping[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")

    def options(self) -> tuple[frozenset[str], frozenset[str]]:
        """Every option string of this parser, and those that take exactly one value (the one
        place that reads argparse's list of actions)."""
        actions = self._actions
        return (
            frozenset(o for a in actions for o in a.option_strings),
            frozenset(o for a in actions if a.nargs is None for o in a.option_strings),
        )

    def unknown_options(self, given: Sequence[str]) -> list[str]:
        """The arguments in ``given`` that look like options and are none of this parser's,
        nor an abbreviation of one (a value that follows its option is never one: values that
        begin with ``-`` are glued to theirs first, ``glue_dashed_values``)."""
        known, _ = self.options()
        return [
            arg
            for arg in given
            if arg.startswith("-")
            and arg != "-"
            and not any(o.startswith(arg.partition("=")[0]) for o in known)
        ]

    def glue_dashed_values(self, given: Sequence[str]) -> list[str]:
        """``--api-key -Xk3…`` as ``--api-key=-Xk3…``: argparse reads a value that begins with
        ``-`` as an option ("expected one argument"), and ``secrets.token_urlsafe`` makes such a
        key once in 64 (new-user probe: docs/engines.md's ``--api-key "$PARTY_SYNC_API_KEY"``
        failed so). A value is glued to its option unless it is one of the command's options
        (or an abbreviation of one), so ``--api-key --port 1`` is still refused."""
        at = next((i for i, arg in enumerate(given) if arg in self.commands), None)
        if at is None:
            return list(given)
        parser = self.commands[given[at]]
        if not isinstance(parser, _Parser):
            return list(given)
        every, valued = parser.options()

        def an_option(arg: str) -> bool:
            name = arg.partition("=")[0]
            return name in every or (
                name.startswith("--") and len(name) > 2 and any(o.startswith(name) for o in every)
            )

        out, rest = list(given[: at + 1]), list(given[at + 1 :])
        i = 0
        while i < len(rest):
            arg = rest[i]
            if arg == "--":  # what follows is positional
                out.extend(rest[i:])
                break
            value = rest[i + 1] if i + 1 < len(rest) else ""
            if arg in valued and value.startswith("-") and not an_option(value):
                out.append(f"{arg}={value}")
                i += 2
                continue
            out.append(arg)
            i += 1
        return out

    def parse_command(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """``parse_args``, with an unrecognized argument refused by its command's parser, and a
        value that begins with ``-`` taken as its option's (``glue_dashed_values``)."""
        given = self.glue_dashed_values(list(sys.argv[1:] if argv is None else argv))
        # An unknown option is named first: argparse would say only what is required and
        # missing (new user probe: ``party-sync --bogus`` never named ``--bogus``, nor did
        # ``party-sync token --bogus``)
        at = next((i for i, arg in enumerate(given) if arg in self.commands), len(given))
        parts: list[tuple[argparse.ArgumentParser, list[str]]] = [(self, given[:at])]
        if at < len(given):
            parts.append((self.commands[given[at]], given[at + 1 :]))
        for parser, args_of in parts:
            if isinstance(parser, _Parser):
                unknown = parser.unknown_options(args_of)
                if unknown:
                    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args, extra = self.parse_known_args(given)
        if extra:
            command = getattr(args, "command", None) or ""
            # the command's own only when they all come after its name (else before it: ours)
            after = given[given.index(command) + 1 :] if command in given else []
            mine = command in self.commands and all(arg in after for arg in extra)
            (self.commands[command] if mine else self).error(
                f"unrecognized arguments: {' '.join(extra)}"
            )
        return args


def _log_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format``, as ``serve`` takes them (the same environment)."""
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=None,
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL [env PARTY_SYNC_LOG_LEVEL] (INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        default=None,
        help="json (one object per line) or text [env PARTY_SYNC_LOG_FORMAT] (json)",
    )


def _log_level(value: str) -> str:
    if value.upper() not in config.LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(config.LOG_LEVELS)}")
    return value.upper()


def _parser() -> _Parser:
    parser = _Parser(prog="party-sync", description="party_sync realtime gateway")
    parser.add_argument("--version", action="version", version=f"party_sync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.commands = commands.choices

    serve = commands.add_parser("serve", help="run the WebSocket gateway")
    config.add_arguments(serve)
    serve.add_argument(
        "--demo-tokens",
        action="store_true",
        help="print ready connection URLs for two demo characters of one party",
    )
    serve.add_argument(
        "--new-game",
        action="store_true",
        help="start a new game: discard the development secret file (so, the old demo links) "
        "and the in-process reference engine's SQLite database "
        "(in a checkout: make run NEW_GAME=1)",
    )

    host = commands.add_parser(
        "engine-http",
        help="host a Campaign Engine behind HTTP (the other end of PARTY_SYNC_ENGINE_URL)",
    )
    host.add_argument("engine", help="MODULE:ATTR of the engine (or a factory of one)")
    host.add_argument("--host", default="127.0.0.1", help="interface (127.0.0.1)")
    host.add_argument("--port", type=_port, default=8090, help="port (8090)")
    host.add_argument(
        "--path", default="/actions", help="path party_sync POSTs actions to (/actions)"
    )
    host.add_argument(
        "--notice-path",
        default="/notices",
        help="path party_sync POSTs join and restate notices to (/notices); point "
        "PARTY_SYNC_ENGINE_NOTICE_URL at it",
    )
    host.add_argument(
        "--party-sync-url",
        default=os.environ.get("PARTY_SYNC_URL", "http://127.0.0.1:8080"),
        help="party_sync's base URL for publishing events; several nodes separated by commas "
        "(the next is used when one cannot be reached) [env PARTY_SYNC_URL; default "
        "http://127.0.0.1:8080]",
    )
    host.add_argument(
        "--api-key",
        default=None,
        help="party_sync's server API key [env PARTY_SYNC_API_KEY]",
    )
    _log_arguments(host)

    worker = commands.add_parser(
        "engine-worker",
        help="host a Campaign Engine on the Redis actions stream (consumer group, at least once)",
        epilog="Every other PARTY_SYNC_* setting is read from the environment as serve reads it "
        "(e.g. PARTY_SYNC_REDIS_SENTINEL_PASSWORD, PARTY_SYNC_REDIS_COMMAND_TIMEOUT; TLS "
        "options go in the rediss:// URL): give the worker the nodes' environment.",
    )
    worker.add_argument("engine", help="MODULE:ATTR of the engine (or a factory of one)")
    worker.add_argument(
        "--redis-url",
        default=os.environ.get("PARTY_SYNC_REDIS_URL"),
        help="the Redis party_sync uses [env PARTY_SYNC_REDIS_URL]",
    )
    worker.add_argument(
        "--redis-sentinels",
        default=None,
        help="find the master through these sentinels, host:port,host:port "
        "[env PARTY_SYNC_REDIS_SENTINELS]",
    )
    worker.add_argument(
        "--redis-sentinel-master",
        default=None,
        help="the master's name in the sentinels [env PARTY_SYNC_REDIS_SENTINEL_MASTER]",
    )
    worker.add_argument(
        "--redis-cluster",
        action="store_true",
        default=None,
        help="--redis-url names any node of a Redis Cluster [env PARTY_SYNC_REDIS_CLUSTER]",
    )
    worker.add_argument(
        "--redis-cluster-nodes",
        default=None,
        help="more nodes of the cluster to join it through, host:port,host:port "
        "[env PARTY_SYNC_REDIS_CLUSTER_NODES]",
    )
    worker.add_argument(
        "--redis-prefix",
        type=_name,
        default=None,
        help="the prefix of party_sync's keys, the serving nodes' [env PARTY_SYNC_REDIS_PREFIX] "
        "(party_sync); the actions stream's name is --stream, whatever the prefix",
    )
    worker.add_argument(
        "--stream",
        type=_name,
        default=os.environ.get("PARTY_SYNC_ACTIONS_STREAM", ACTIONS_STREAM),
        help="the actions stream [env PARTY_SYNC_ACTIONS_STREAM] (party_sync:actions)",
    )
    worker.add_argument(
        "--actions-stream-partitions",
        type=_partitions,
        default=None,
        help="read this many partitions of the stream, <stream>:0 ... <stream>:N-1 (1: the one "
        "stream); must be the serving nodes' count, else the worker refuses to start (not "
        "with --burst, which drains the streams of an old count) "
        "[env PARTY_SYNC_ACTIONS_STREAM_PARTITIONS] (1)",
    )
    worker.add_argument(
        "--group",
        type=_name,
        default="campaign-engine",
        help="consumer group (default campaign-engine)",
    )
    worker.add_argument(
        "--consumer", type=_name, default=None, help="consumer name (default host-pid)"
    )
    worker.add_argument(
        "--claim-idle",
        type=_seconds,
        default=30.0,
        help="seconds before a dead worker's pending actions are taken over (30; at most 1e9)",
    )
    worker.add_argument(
        "--batch",
        type=_batch,
        default=1,
        help="entries to take from the stream at once (1: the default, a worker takes one action "
        "at a time and an idle worker the next; more: fewer round trips to Redis, but the "
        "entries taken wait behind a slow one while other workers may be idle; at most 1000)",
    )
    worker.add_argument(
        "--concurrency",
        type=_concurrency,
        default=1,
        help="actions this worker's engine handles at once, per partition (1: one at a time; "
        "N: N read loops, each a consumer of its own, <consumer>/1 ... <consumer>/N, as N "
        "workers would be; for an engine that waits on I/O, e.g. a language model; at most "
        f"{MAX_CONCURRENCY})",
    )
    worker.add_argument(
        "--burst", action="store_true", help="exit once the stream has nothing more to do"
    )
    worker.add_argument(
        "--keep-handled",
        action="store_true",
        help="leave handled entries in the stream (default: delete each once acknowledged; "
        "keep them only for another consumer group reading the stream, which is then bounded "
        "by actions_stream_maxlen alone)",
    )
    _log_arguments(worker)

    token = commands.add_parser("token", help="print a connection token for the configured secret")
    token.add_argument("--party", required=True, help="party_id claim")
    token.add_argument("--run", required=True, help="campaign_run_id claim")
    token.add_argument("--character", required=True, help="character_id claim")
    token.add_argument(
        "--name", default=None, help="display_name claim (default: the character id)"
    )
    token.add_argument(
        "--ttl",
        type=float,
        default=3600.0,
        help="lifetime in seconds (3600); the token must expire by the end of year 9999",
    )
    token.add_argument(
        "--sub",
        default=None,
        help="sub claim: the user the per-user limits count (default character:<party>/<id>)",
    )
    token.add_argument(
        "--secret",
        default=None,
        help="HMAC secret (default: $PARTY_SYNC_JWT_SECRET, else the development secret of a "
        f"`party-sync serve` started in this directory: ./{DEV_SECRET_FILE}); signed with the "
        "first of $PARTY_SYNC_JWT_ALGORITHMS (HS256)",
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    from party_sync.problems import check_port_free
    from party_sync.server import build_server, make_link, new_node_id, serve, with_dev_secret

    settings = config.load(args)
    logs.configure(settings.log_level, settings.log_format, secrets=logs.secrets_of(settings))
    _tracing("party-sync")  # off unless OTEL_* asks for an exporter
    _refuse_redis_misconfiguration(  # before a file is written or an engine loaded
        settings, stream=settings.resolved_engine_transport == "stream"
    )
    # A port in use is refused before anything is discarded or written: `--new-game` beside a
    # running server removed its development secret and the engine's database, then could
    # not listen (its links stopped working; the running engine wrote to a deleted file).
    check_port_free(settings.host, settings.port)
    _refuse_engine_per_worker(settings, os.environ)
    dev_mode = settings.dev_mode
    link = None
    node_id = new_node_id()
    if settings.resolved_engine_transport == "inprocess":
        if dev_mode:  # the reference engine in this process writes its narration live
            devmode.narrate_by_default(
                os.environ, engine_in_process=True, engine_spec=settings.engine
            )
        if settings.workers == 1:
            # Loaded before a development secret is written: the engine's own settings (its
            # CAMPAIGN_ENGINE_* variables) stop a start that cannot work with nothing left
            # behind. (With workers, each loads its own, and the supervisor serves nothing: the
            # first worker says once what is wrong.)
            link = make_link(settings, node_id)
    workdir = Path.cwd()
    # (after the checks above: a start refused for a setting discards nothing)
    if args.new_game:
        removed = devmode.new_game(
            workdir,
            engine_in_process=settings.resolved_engine_transport == "inprocess",
            engine_spec=settings.engine,
            environ=dict(os.environ),
        )
        log.warning(
            "--new-game: a new game starts (the old demo links no longer work)",
            extra={"removed": [str(path) for path in removed]},
        )
    kept = None
    if dev_mode:
        try:
            kept = devmode.load_or_create(workdir / DEV_SECRET_FILE)
        except OSError as exc:  # a read-only directory: a secret for this process only
            log.warning("cannot keep the development secret (%s): links end with this process", exc)
        if kept is None:
            origin = "random, for this process only"
        elif kept.created:
            origin = f"new, kept in {kept.path} for the next start (--new-game resets it)"
        else:
            origin = f"the one kept in {kept.path}: earlier links still work"
        log.warning(
            "PARTY_SYNC_JWT_SECRET is not set: DEVELOPMENT secret (%s). Set a secret in "
            "production.",
            origin,
            extra={"dev_secret_file": str(kept.path) if kept else None},
        )
        banner = [
            "",
            "!" * 72,
            "!! DEVELOPMENT MODE: development JWT secret (set PARTY_SYNC_JWT_SECRET)",
            f"!! secret: {origin}",
            "!" * 72,
        ]
        print("\n".join(banner), file=sys.stderr, flush=True)
    settings = with_dev_secret(settings, kept)
    # Known only now (a development secret and API key are made late): never log them.
    logs.protect(*logs.secrets_of(settings))
    if settings.workers > 1:
        # N serving processes on the port, supervised by this one (party_sync/workers.py); every
        # worker gets these settings, the development secret included (read above, once).
        from party_sync.workers import start_group

        lines = _demo_banner(settings, "redis", dev_mode) if args.demo_tokens else []
        return start_group(settings, dev_mode=dev_mode, on_ready=lines)
    server = build_server(settings, dev_mode=dev_mode, link=link, node_id=node_id)
    lines = (
        _demo_banner(settings, server.gateway.backend.name, dev_mode) if args.demo_tokens else []
    )
    serve(server, on_ready=lines)
    return 0


def lan_address() -> str | None:
    """This machine's address on its network (the one its default route leaves from), for the
    links a ``--host 0.0.0.0`` server prints; None when there is no route. Nothing is sent: a UDP
    socket's connect only picks the route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1 (RFC 5737): never a real host
            address = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith(("0.", "127.")) else address


def _demo_banner(settings: config.Settings, backend: str, dev_mode: bool) -> list[str]:
    """What ``--demo-tokens`` prints: a ready demo-page URL per character, and how to connect."""
    from party_sync.transport import demo

    assert settings.jwt_secret is not None
    wildcard = settings.host in ("0.0.0.0", "::", "")  # noqa: S104
    host = (lan_address() or "127.0.0.1") if wildcard else settings.host
    if ":" in host:
        host = f"[{host}]"
    base = f"http://{host}:{settings.port}"
    lines = [
        "",
        f"party_sync is up on {base} (backend: {backend}). "
        f"Party {demo.DEMO_PARTY}: open one URL per player in a browser and play:",
    ]
    if wildcard and host != "127.0.0.1":
        lines[-1] += (
            f" (listening on every address: this machine can use 127.0.0.1 instead of {host})"
        )
    tokens: list[str] = []
    for character_id, name in demo.DEMO_CHARACTERS:
        token = issue_token(
            settings.jwt_secret,
            party_id=demo.DEMO_PARTY,
            campaign_run_id=demo.DEMO_RUN,
            character_id=character_id,
            display_name=name,
            now=time.time(),
            ttl=12 * 3600,
            # minted before this node has read Redis's clock: no iat, which a node ahead of
            # Redis would make "not yet valid" for its first minutes (clock probe); 12 hours
            # of exp leave room for any skew
            issued_at=False,
        )
        tokens.append(token)
        lines.append(f"  {name:6} {base}/demo?token={token}")
    client_dir = demo.find_client_dir()
    if client_dir is None or not (client_dir / "dist" / "demo" / "app.js").is_file():
        lines.append("  (the demo page is not built: run `make setup`, then reload)")
    if dev_mode:
        lines.append(f"  or pick any character at {base}/demo (development mode)")
    lines += [
        f"WebSocket clients: ws://{host}:{settings.port}/ws?token=<one of the tokens above>,",
        "e.g. websocat, then send:",
        '  {"type":"action.request","payload":{"action_id":"a1","character_id":"aria",'
        f'"campaign_run_id":"{demo.DEMO_RUN}","action_type":"skill_check","payload":{{}}}}}}',
        f"Server API key{' (development)' if dev_mode else ''}: {settings.api_key}",
        "Health: /healthz  Readiness: /readyz  Metrics: /metrics  (Ctrl-C stops)",
        "",
    ]
    return lines


def _token_algorithm() -> str | None:
    """The algorithm ``party-sync token`` signs with: the first of ``PARTY_SYNC_JWT_ALGORITHMS``
    (what a server configured so accepts), HS256 when unset; None (after one line on stderr) for
    a list a server would refuse."""
    raw = os.environ.get("PARTY_SYNC_JWT_ALGORITHMS", "")
    algorithms = tuple(part.strip() for part in raw.split(",") if part.strip()) or ("HS256",)
    wrong = [name for name in algorithms if name not in HMAC_ALGORITHMS]
    if wrong:
        print(
            f"party-sync token: PARTY_SYNC_JWT_ALGORITHMS names {', '.join(map(repr, wrong))}: "
            "connection tokens are signed with an HMAC algorithm "
            f"({', '.join(sorted(HMAC_ALGORITHMS))})",
            file=sys.stderr,
        )
        return None
    return algorithms[0]


def _token(args: argparse.Namespace) -> int:
    now = time.time()
    if not _finite_positive(args.ttl):
        print("party-sync token: --ttl must be a finite number > 0 seconds", file=sys.stderr)
        return 2
    if now + args.ttl > MAX_TIMESTAMP:
        print(
            f"party-sync token: --ttl is too long: the token must expire by the end of year 9999 "
            f"(exp {MAX_TIMESTAMP}, the latest a server accepts), at most "
            f"{int(MAX_TIMESTAMP - now)} seconds from now",
            file=sys.stderr,
        )
        return 2
    if args.secret is not None and not args.secret:
        print(
            "party-sync token: --secret is empty (leave it out to use $PARTY_SYNC_JWT_SECRET)",
            file=sys.stderr,
        )
        return 2
    algorithm = _token_algorithm()
    if algorithm is None:
        return 2
    secret = args.secret or os.environ.get("PARTY_SYNC_JWT_SECRET")
    kept = None
    if not secret:
        kept = devmode.read_existing(Path.cwd() / DEV_SECRET_FILE)
        if kept is None:
            print(
                "party-sync token: set PARTY_SYNC_JWT_SECRET or pass --secret (or run it where "
                "a development `party-sync serve` keeps its secret)",
                file=sys.stderr,
            )
            return 2
        secret = kept.jwt_secret
    least = min_secret_bytes([algorithm])  # as serve warns (PyJWT's own is noise)
    if len(secret.encode()) < least:
        print(
            f"party-sync token: warning: the secret is shorter than {least} bytes, {algorithm}'s "
            "hash size (a short one can be guessed offline from any token)",
            file=sys.stderr,
        )
    try:
        token = issue_token(
            secret,
            party_id=args.party,
            campaign_run_id=args.run,
            character_id=args.character,
            display_name=args.character if args.name is None else args.name,
            now=now,
            ttl=args.ttl,
            sub=args.sub,
            algorithm=algorithm,
        )
    except ValueError as exc:  # an id or display name that breaks its rule
        print(f"party-sync token: {one_line(exc)}", file=sys.stderr)
        return 2
    if kept is not None:  # said once the token is made (not before a refusal)
        print(
            f"party-sync token: signed with the development secret in {kept.path}", file=sys.stderr
        )
    try:
        print(token, flush=True)
    except BrokenPipeError:  # stdout's reader went away (`party-sync token | head -c 10`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    return 0


def _route_problem(path: str, notice_path: str) -> str | None:
    """Why ``--path`` / ``--notice-path`` cannot be the engine host's two routes, or None."""
    from aiohttp import web

    for flag, value in (("--path", path), ("--notice-path", notice_path)):
        if not value.startswith("/"):
            return f"{flag} must start with '/' (got {value!r})"
    if path == notice_path:
        return f"--path and --notice-path must differ (both are {path!r})"

    async def nothing(request: web.Request) -> web.Response:  # pragma: no cover (never called)
        raise web.HTTPNotFound()

    router = web.Application().router
    for flag, value in (("--path", path), ("--notice-path", notice_path)):
        try:
            router.add_post(value, nothing)
        except (ValueError, RuntimeError) as exc:  # a bad pattern; a route the other hides
            return f"{flag} {value!r} cannot be a route: {exc}"
    return None


def _engine_http(args: argparse.Namespace) -> int:
    from party_sync.engine.health import public_url
    from party_sync.engine.http_host import (
        ApiPublisher,
        base_urls,
        build_host_app,
        credentials_problem,
        run_host,
    )
    from party_sync.engine.loader import load_engine
    from party_sync.problems import check_port_free
    from party_sync.server import arm_exit_watchdog

    level = args.log_level or os.environ.get("PARTY_SYNC_LOG_LEVEL", "INFO")
    if level.upper() not in config.LOG_LEVELS:
        raise ConfigError(f"PARTY_SYNC_LOG_LEVEL must be one of {', '.join(config.LOG_LEVELS)}")
    log_format = args.log_format or os.environ.get("PARTY_SYNC_LOG_FORMAT", "json")
    if log_format not in ("json", "text"):
        raise ConfigError("PARTY_SYNC_LOG_FORMAT must be json or text")
    if not args.host.strip():
        raise ConfigError(f"--host {config.EMPTY_HOST}")
    problem = _route_problem(args.path, args.notice_path)
    if problem is not None:
        raise ConfigError(problem)
    urls = base_urls(args.party_sync_url)
    if not urls:
        raise ConfigError("--party-sync-url names no URL")
    for url in urls:
        problem = config.http_url_problem("--party-sync-url", url) or credentials_problem(
            "--party-sync-url (PARTY_SYNC_URL)", url
        )
        if problem is not None:
            raise ConfigError(problem)
    budget = _shutdown_timeout()
    logs.configure(level, log_format)
    _tracing("party-sync-engine-http")
    api_key = args.api_key or os.environ.get("PARTY_SYNC_API_KEY")
    configured = bool(os.environ.get("PARTY_SYNC_JWT_SECRET"))  # no development server
    if not api_key and not configured:
        # beside a development server: the key it keeps (as `token` takes its secret there)
        kept = devmode.read_existing(Path.cwd() / DEV_SECRET_FILE)
        if kept is not None:
            api_key = kept.api_key
            log.warning(
                "no API key given: using the DEVELOPMENT key kept in %s, the key of a development "
                "server started there without PARTY_SYNC_API_KEY (set PARTY_SYNC_API_KEY in "
                "production)",
                kept.path,
            )
    logs.protect(api_key)
    if not api_key:
        development = (
            "PARTY_SYNC_JWT_SECRET is set, so no development key is taken"
            if configured
            else f"a development server keeps its own in {DEV_SECRET_FILE}: start engine-http "
            "in the server's directory to use it (serve --demo-tokens prints it)"
        )
        raise ConfigError(
            "engine-http needs party_sync's API key (--api-key or PARTY_SYNC_API_KEY): the one "
            f"party-sync serve was given; {development}"
        )
    # a port in use is refused before the engine is made (the reference engine's factory
    # creates its database in the working directory), as serve refuses it (new user probe)
    check_port_free(args.host, args.port)
    engine = load_engine(args.engine)
    app = build_host_app(
        engine,
        ApiPublisher(urls, api_key),
        args.path,
        notice_path=args.notice_path,
    )
    base = f"http://[{args.host}]:{args.port}" if ":" in args.host else None
    base = base or f"http://{args.host}:{args.port}"
    ready = (
        f"engine {args.engine} on {base}{args.path} (notices: {base}{args.notice_path}), "
        f"publishing to {', '.join(public_url(url) for url in urls)}"  # never a password
    )
    # Bound first, then the ready line: a script waiting for it can connect at once.
    asyncio.run(
        run_host(
            app,
            args.host,
            args.port,
            shutdown_timeout=budget,  # then the engine calls still running are cancelled
            on_ready=lambda: print(ready, flush=True),
            on_stop=arm_exit_watchdog,  # the stop began (SIGTERM, SIGINT, SIGHUP)
        )
    )
    return 0


def _shutdown_timeout() -> float:
    """``PARTY_SYNC_SHUTDOWN_TIMEOUT`` for the commands that take no other setting."""
    raw = os.environ.get("PARTY_SYNC_SHUTDOWN_TIMEOUT", "10")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= config.MAX_SECONDS:
        raise ConfigError(
            "PARTY_SYNC_SHUTDOWN_TIMEOUT must be a number of seconds >= 0, at most "
            f"{config.MAX_SECONDS:.0e}"
        )
    return value


def _engine_worker(args: argparse.Namespace) -> int:
    from party_sync.backends import shared_settings
    from party_sync.backends.keys import KeySpace
    from party_sync.backends.redis_connect import RedisTarget, make_any_client, stale_socket_retry
    from party_sync.engine.interface import RestateNotice, restate_engine
    from party_sync.engine.loader import load_engine
    from party_sync.engine.restating import EpochWatch
    from party_sync.engine.stream_worker import PartitionedWorker, WorkerOptions, default_consumer
    from party_sync.protocol.schemas import Contracts
    from party_sync.publishing import BackendPublisher
    from party_sync.server import arm_exit_watchdog, make_backend
    from party_sync.tasks import STOP_SIGNALS

    # The same settings as the gateway nodes (history size, TTLs, key prefix) from the environment.
    given = {
        "PARTY_SYNC_REDIS_URL": args.redis_url,
        "PARTY_SYNC_REDIS_SENTINELS": args.redis_sentinels,
        "PARTY_SYNC_REDIS_SENTINEL_MASTER": args.redis_sentinel_master,
        "PARTY_SYNC_REDIS_CLUSTER": "true" if args.redis_cluster else None,
        "PARTY_SYNC_REDIS_CLUSTER_NODES": args.redis_cluster_nodes,
        "PARTY_SYNC_REDIS_PREFIX": args.redis_prefix,
        "PARTY_SYNC_ACTIONS_STREAM_PARTITIONS": (
            None if args.actions_stream_partitions is None else str(args.actions_stream_partitions)
        ),
        "PARTY_SYNC_LOG_LEVEL": args.log_level,
        "PARTY_SYNC_LOG_FORMAT": args.log_format,
    }
    env = {**os.environ, **{name: value for name, value in given.items() if value}}
    # (a flag whose default is its variable's value was not given as a flag)
    as_flags = {
        name.removeprefix(config.ENV_PREFIX).lower()
        for name, value in given.items()
        if value and value != os.environ.get(name)
    }
    settings = config.load(None, env=env, flags=as_flags)
    if not settings.redis_url:
        raise ConfigError(
            "engine-worker needs --redis-url (or PARTY_SYNC_REDIS_URL), or --redis-sentinels "
            "and --redis-sentinel-master"
        )
    logs.configure(settings.log_level, settings.log_format, secrets=logs.secrets_of(settings))
    _tracing("party-sync-engine-worker")
    _refuse_redis_misconfiguration(settings, stream=True)  # before the engine opens its store
    settings = _take_nodes_settings(settings)
    engine = load_engine(args.engine)
    options = WorkerOptions(
        stream=args.stream,
        group=args.group,
        consumer=args.consumer or default_consumer(),
        claim_idle=args.claim_idle,
        batch=args.batch,
        prefix=settings.redis_prefix,
        burst=args.burst,
        keep_handled=args.keep_handled,
    )

    async def work() -> None:

        from party_sync.backends.redis_backend import RedisBackend

        backend = make_backend(settings)
        await backend.start()
        # A short connect timeout: while Redis is down the worker retries (it never exits).
        redis = make_any_client(
            RedisTarget.of(settings),
            socket_timeout=options.block + 5,
            socket_connect_timeout=2.0,
            retry=stale_socket_retry(),  # a stale pooled socket (not a timeout)
            # each partition's read holds a connection for its whole XREADGROUP BLOCK: room for
            # them all, and for the acks and claims beside them
            max_connections=max(
                settings.redis_max_connections,
                settings.actions_stream_partitions * args.concurrency + 16,
            ),
        )

        # the engine's events that open an epoch: the worker asks its own engine to re-state
        async def restate(notice: RestateNotice) -> None:
            await restate_engine(engine, notice)

        watch = EpochWatch(backend, restate, backend.clock)  # Redis's clock, as the nodes
        # (the backend's own publications, an answer lost in a failover written again, may
        # open an epoch too: the worker's rounds send the re-statement, ``restate_opened``)
        watch.follow(backend)
        publisher = BackendPublisher(
            backend, Contracts(), backend.clock, watch, record_ttl=settings.action_record_ttl
        )
        worker = PartitionedWorker(
            engine,
            publisher,
            redis,
            options,
            partitions=settings.actions_stream_partitions,
            concurrency=args.concurrency,
            watch=watch,
            clock=backend.clock,
            stop_grace=settings.shutdown_timeout,
            shared=(
                KeySpace(settings.redis_prefix).settings(),
                shared_settings.values_of(settings),
            ),
            adopt=(
                functools.partial(_adopt_nodes_settings, backend, settings)
                if isinstance(backend, RedisBackend)
                else None
            ),
        )

        def stop() -> None:
            if not worker.stopping:
                arm_exit_watchdog(settings.shutdown_timeout)
            worker.stop()

        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop)
        banner = f"engine worker {options.consumer} on {', '.join(worker.streams)}"
        if args.concurrency > 1:
            banner += f" ({args.concurrency} read loops each)"
        try:
            await worker.run(on_started=lambda: print(banner, flush=True))
        finally:
            await redis.aclose()
            await backend.close()

    asyncio.run(work())
    return 0


def _adopt_nodes_settings(
    backend: RedisBackend, settings: config.Settings, theirs: Mapping[str, float]
) -> None:
    """A running worker's backend writes with the nodes' shared settings ``theirs`` from now on
    (its other settings stay)."""
    from party_sync.server import backend_settings

    backend.adopt(backend_settings(dataclasses.replace(settings, **theirs)))  # type: ignore[arg-type]


def _take_nodes_settings(settings: config.Settings) -> config.Settings:
    """An engine worker writes into the parties' keys with the nodes' history bounds and TTLs
    (``backends/shared_settings.py``): those in ``<prefix>:settings``, said in one line when
    they differ from its own; its own when no node has written them yet (or Redis does not
    answer yet), said too."""
    from party_sync.backends import shared_settings
    from party_sync.backends.keys import KeySpace
    from party_sync.backends.redis_connect import RedisTarget, make_any_client
    from party_sync.tasks import described

    key = KeySpace(settings.redis_prefix).settings()

    async def read() -> Any:
        redis = make_any_client(
            RedisTarget.of(settings), socket_timeout=2.0, socket_connect_timeout=2.0
        )
        try:
            return await redis.get(key)
        finally:
            await redis.aclose()

    try:
        theirs = shared_settings.decode(asyncio.run(read()))
    except Exception as exc:  # Redis not answering yet: the worker waits for it anyway
        log.warning(
            "cannot read the nodes' settings (%s) yet: %s; writing with this process's own "
            "(PARTY_SYNC_* history bounds and TTLs)",
            key,
            described(exc),
        )
        return settings
    if theirs is None:
        log.info(
            "no gateway node has written its settings (%s) yet: writing with this process's own "
            "history bounds and TTLs",
            key,
        )
        return settings
    differ = shared_settings.differences(shared_settings.values_of(settings), theirs)
    if differ:
        log.warning(
            "writing with the gateway nodes' settings, which differ from this process's own: %s",
            "; ".join(differ),
            extra={"key": key},
        )
    return dataclasses.replace(settings, **theirs)  # type: ignore[arg-type]


def _refuse_engine_per_worker(settings: config.Settings, environ: Mapping[str, str]) -> None:
    """``--workers`` N > 1 with the reference engine in process on ``memory://``: each worker's
    engine would keep a state of its own, and a party's actions, landing on several workers,
    would be played against different stories (README, "Using every core"). Refused (exit 2)."""
    if settings.workers == 1 or settings.resolved_engine_transport != "inprocess":
        return
    url = environ.get(devmode.ENGINE_DATABASE_ENV, "").strip()
    if devmode.is_reference_engine(settings.engine) and url.lower().startswith("memory:"):
        raise ConfigError(
            f"workers {settings.workers} with the engine in process on "
            f"{devmode.ENGINE_DATABASE_ENV}={url}: each worker's engine would keep a state of "
            "its own (a party's members land on several workers). Use the SQLite file (the "
            "default) or PostgreSQL, the stream transport with engine-worker, or --workers 1"
        )


def _refuse_redis_misconfiguration(settings: config.Settings, *, stream: bool = False) -> None:
    """Redis settings that can never work (credentials, database, ACL, cluster mode) stop the
    command before it writes anything (a development secret, an engine's database): the backend
    asks again when it starts, which is what a program embedding the gateway gets. ``stream``:
    the actions stream is used too (stream mode, ``engine-worker``): may the user read it?"""
    if settings.redis_url:
        from party_sync.backends.redis_connect import RedisTarget, refuse_misconfiguration
        from party_sync.engine.partitions import stream_names

        streams = (
            stream_names(settings.actions_stream, settings.actions_stream_partitions)[:1]
            if stream
            else ()
        )
        asyncio.run(refuse_misconfiguration(RedisTarget.of(settings), streams=streams))


def _tracing(service_name: str) -> None:
    """OpenTelemetry tracing, off unless the ``OTEL_*`` variables ask for an exporter."""
    from party_sync import tracing

    tracing.configure_from_env(service_name)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_command(argv)
    commands = {
        "serve": _serve,
        "token": _token,
        "engine-http": _engine_http,
        "engine-worker": _engine_worker,
    }
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"party-sync: configuration error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (ListenError, EngineStartError) as exc:
        print(f"party-sync: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
