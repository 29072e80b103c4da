"""The log redaction and the malformed-request limiter of ``party_sync.logs`` (docs/security.md,
"Logs never hold a credential"), as pure pieces: no server, no sockets, time passed in."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import orjson
import pytest
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, InvalidHeader
from hypothesis import given
from hypothesis import strategies as st
from party_sync import config, logs
from party_sync.core.limits import RateGate
from party_sync.logs import (
    REDACTED,
    ClientProtocolsFilter,
    JsonFormatter,
    MalformedRequestFilter,
    Redactor,
    redact_record,
)
from ps_testkit.servers import token

TOKEN = token("aria")
SIGNATURE = TOKEN.rsplit(".", 1)[1]
API_KEY = "psk_live_Yx2Qb7v9TzLm0123456789abcd"
BOT = "7000000001:AAF-bot-secret-part-0123456789"
REDACTOR = Redactor([API_KEY, BOT])


def leaks(text: str) -> list[str]:
    return [s for s in (SIGNATURE, API_KEY, BOT, BOT.split(":")[1]) if s in text]


@pytest.mark.parametrize(
    "text",
    [
        # What aiohttp's parser errors quote (seen on aiohttp 3.14): repr of the raw bytes.
        f"b'GET /ws?token={TOKEN}\\x01 HTTP/1.1'",
        f"b'GET /ws?token={TOKEN} HTTP/9.9'",
        f"b'GET /ws?token={TOKEN} HTTP/1.1\\nHost: x\\nAuthorization: Bearer {API_KEY}\\n\\n'",
        f"b'GET /ws?token={TOKEN}\\x00 HTTP/1.1'",
        f"b'GET /ws?token={TOKEN} x HTTP/1.1'",
        f"b'Authorization: Bearer {API_KEY}\\x01'",
        f"b'Authorization: Bearer \\x7f{TOKEN}'",
        f"b'G\\x01T /ws?t={TOKEN} HTTP/1.1'",
        f"b'X-Note: {BOT}\\x01'",
        # Other shapes: a dict of headers, JSON, a bare token, a percent-encoded key.
        f"{{'Authorization': 'Bearer {API_KEY}', 'Host': 'x'}}",
        f'{{"token": "{TOKEN}"}}',
        f"token {TOKEN} refused",
        f"/api?api_key={API_KEY.replace('_', '%5F')}",
        f"Authorization: tma query_id=1&hash=abc&signature={SIGNATURE}",
    ],
    ids=lambda text: "",  # (the token and signature are new each run: ids by position)
)
def test_credentials_are_scrubbed_from_every_shape(text: str) -> None:
    scrubbed = REDACTOR.scrub(text)
    assert leaks(scrubbed) == [], scrubbed
    assert REDACTED in scrubbed


_text = st.text(st.characters(codec="utf-8"), max_size=40)


@given(prefix=_text, suffix=_text)
def test_a_token_or_a_key_anywhere_in_any_text_is_scrubbed(prefix: str, suffix: str) -> None:
    assert leaks(REDACTOR.scrub(prefix + TOKEN + suffix)) == []
    assert leaks(REDACTOR.scrub(prefix + API_KEY + suffix)) == []
    assert leaks(REDACTOR.scrub(prefix + BOT + suffix)) == []


@pytest.mark.parametrize(
    "keep",
    [200, 120, 60, len(TOKEN.split(".")[0]) + 9]
    + [len(TOKEN.split(".")[0]) + n for n in range(7)]  # its header, a dot, a little more
    + [12, 20],  # inside its header
)
def test_a_token_cut_short_is_scrubbed_too(keep: int) -> None:
    """A log field bounded in length (the refused ``Origin``, 200 characters) can cut a token
    before its signature: its header and claims are still not logged (security probe)."""
    cut = TOKEN[:keep]
    scrubbed = REDACTOR.scrub(f"origin refused: https://x.example/{cut}")
    assert TOKEN.split(".")[1][:8] not in scrubbed, scrubbed
    assert scrubbed == f"origin refused: https://x.example/{REDACTED}"


def test_a_tokens_header_or_payload_alone_is_scrubbed() -> None:
    header, payload, _ = TOKEN.split(".")
    for part in (header, payload):
        scrubbed = REDACTOR.scrub(f"origin https://x.example/p/{part} refused")
        assert scrubbed == f"origin https://x.example/p/{REDACTED} refused", scrubbed
        assert REDACTOR.scrub(part) == REDACTED


@pytest.mark.parametrize("dot", ["%2E", "%2e", "%252E", "%25252E", "%2525252e"])
@pytest.mark.parametrize("keep", [None, 200, 120])
def test_a_token_whose_dots_are_percent_encoded_is_scrubbed_whole(
    dot: str, keep: int | None
) -> None:
    """Re-check probe: a token written with ``%2E`` for its dots (in an ``Origin``, a query
    string) had its header scrubbed and its payload logged."""
    header, payload, _ = TOKEN.split(".")
    encoded = dot.join(TOKEN.split("."))[:keep]
    for before in ("https://b.example/", "https://b.example/?t%3D", "x%22"):
        scrubbed = REDACTOR.scrub(f"origin refused: {before}{encoded}")
        assert scrubbed == f"origin refused: {before}{REDACTED}", scrubbed
        assert payload[:8] not in scrubbed and header[:8] not in scrubbed


@given(
    depth=st.integers(0, 5),
    lower=st.booleans(),
    glue=st.from_regex(r"[A-Za-z0-9_-]{0,4}", fullmatch=True),
    before=st.sampled_from(["GET /", "origin https://", "origin https://o4-", " ", ""]),
    # the whole token, its header and payload, its payload and signature, either claim alone
    parts=st.sampled_from([slice(0, 3), slice(0, 2), slice(1, 3), slice(0, 1), slice(1, 2)]),
)
def test_a_token_glued_to_what_precedes_it_is_scrubbed_however_its_dots_are_encoded(
    depth: int, lower: bool, glue: str, before: str, parts: slice
) -> None:
    """Re-check probe: a path ``/x-<token>`` with its dots encoded three times (``%25252E``:
    logged as ``%252E``, aiohttp decodes a path once), or an ``Origin`` so, was logged whole:
    the header was not at a boundary, and an encoded dot was no separator. Nothing of the
    header, payload or signature is left, however many times the dots were encoded; nor of a
    token without its header (``/x-<payload>.<signature>``: the next probe), or any part alone."""
    dot = "." if depth == 0 else "%" + "25" * (depth - 1) + ("2e" if lower else "2E")
    shown = TOKEN.split(".")[parts]
    scrubbed = REDACTOR.scrub(f"{before}{glue}{dot.join(shown)} 404")
    for part in shown:
        assert part[8:24] not in scrubbed, scrubbed


@given(
    cut=st.integers(0, 60),
    glue=st.from_regex(r"[A-Za-z0-9_~ /-]{0,4}", fullmatch=True),
    depth=st.integers(0, 2),
)
def test_a_payload_cut_anywhere_with_its_signature_is_scrubbed(
    cut: int, glue: str, depth: int
) -> None:
    """Fix-check probe: ``/x-<payload[5:]>.<signature>`` was logged whole; the five characters
    cut off (``eyJzd``, from ``{"sub``) are the same in every token, so that was the token. A
    payload cut anywhere (with at least 16 characters left) beside its signature is scrubbed."""
    _, payload, signature = TOKEN.split(".")
    dot = "." if depth == 0 else "%" + "25" * (depth - 1) + "2E"
    scrubbed = REDACTOR.scrub(f"GET /q{glue}{payload[cut:]}{dot}{signature} 404")
    assert signature[:16] not in scrubbed and signature[-16:] not in scrubbed, scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "party_sync serving on http://127.0.0.1:8080: backend redis, engine stream",
        "connected to redis-primary.production.internal:6379 (aiohttp 3.14.5)",
        "action a1 of aria refused: action_in_flight",
        "eyes.everywhere.com",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert REDACTOR.scrub(text) == text


def test_a_password_in_a_url_is_scrubbed() -> None:
    assert (
        REDACTOR.scrub("redis://:hunter2hunter@redis:6379/0") == "redis://:[redacted]@redis:6379/0"
    )


@pytest.mark.parametrize(
    "text",
    [
        "ey" * 50_000,
        "a." * 50_000,
        "eyJ" + "ey" * 40_000 + ".eyJ" + "a" * 40_000,
        "authorization:" * 8_000,
        "'" + "a" * 100_000 + "token",
        "http://" * 15_000,
        "bearer " * 15_000,
        "token=" * 15_000,
        "<redis.Redis(<redis.ConnectionPool(<redis.Connection(" + "(a<" * 30_000,
        "<redis.Redis(<redis.ConnectionPool(<redis.Connection(" * 5_000,
    ],
    ids=[
        "ey",
        "dots",
        "long-jwt",
        "authorization",
        "quoted",
        "urls",
        "bearer",
        "token=",
        "repr",
        "reprs",
    ],
)
def test_scrubbing_stays_linear_on_hostile_text(text: str) -> None:
    started = time.perf_counter()
    REDACTOR.scrub(text)
    assert time.perf_counter() - started < 1.0  # ~0.02 s here; quadratic would take minutes


def test_a_redis_clients_repr_is_shortened_to_its_address() -> None:
    """redis-py's "No master found" names each sentinel by its client's repr, a kilobyte of
    settings (new user's probe: the one line about it was cut off before the address)."""
    settings = (
        "db=0,username=<REDACTED>,password=<REDACTED>,socket_timeout=5,retry=<redis.asyncio."
        "retry.Retry object at 0x7f3765ddf110>,driver_info=DriverInfo(name='redis-py', "
        "lib_version='8.1.0', _upstream=[]),host=127.0.0.1,port=30293,socket_keepalive=True"
    )
    client = (
        "<redis.asyncio.client.Redis(<redis.asyncio.connection.ConnectionPool(<redis.asyncio."
        f"connection.Connection({settings})>)>)>"
    )
    said = f"No master found for 'mymaster' : {client} - network:ConnectionError, {client} - x"
    assert REDACTOR.scrub(said) == (
        "No master found for 'mymaster' : <Redis 127.0.0.1:30293> - network:ConnectionError, "
        "<Redis 127.0.0.1:30293> - x"
    )
    unknown = client.replace("host=127.0.0.1,", "")
    assert REDACTOR.scrub(unknown) == "<Redis>"


def test_short_secrets_are_not_scrubbed_by_value_and_none_is_ignored() -> None:
    redactor = Redactor(["abc", None, ""])
    assert redactor.scrub("abc") == "abc"


def test_our_own_warning_about_a_weak_secret_is_not_garbled_by_scrubbing_that_secret() -> None:
    """A secret that is also a word ("short") would turn "… is too short …" into "… is too
    [redacted] …": a message marked ``VERBATIM`` (our words and numbers only) is kept whole, its
    extras are still scrubbed, and an unmarked record with the same text is scrubbed as always."""
    from party_sync.config import Settings
    from party_sync.server import weak_secrets

    redactor = Redactor(["short"])
    (warning,) = weak_secrets(Settings(api_key="short"))
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, warning, (), None)
    record.__dict__.update(logs.VERBATIM, detail="key short")
    redact_record(record, redactor)
    assert record.getMessage() == warning and "too short (5 characters)" in warning
    assert record.__dict__["detail"] == f"key {REDACTED}"
    assert "party_sync_verbatim" not in record.__dict__  # not written out as a field
    plain = logging.LogRecord("t", logging.WARNING, __file__, 1, warning, (), None)
    redact_record(plain, redactor)
    assert "short" not in plain.getMessage()
    with_args = logging.LogRecord("t", logging.WARNING, __file__, 1, "%s", ("short",), None)
    with_args.__dict__.update(logs.VERBATIM)  # an argument comes from outside: scrubbed anyway
    redact_record(with_args, redactor)
    assert with_args.getMessage() == REDACTED


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, exc_info)
    record.__dict__["detail"] = {"header": f"Bearer {API_KEY}", "ids": [TOKEN]}
    record.stack_info = f"stack with {TOKEN}"
    return record


def test_a_record_is_scrubbed_in_its_message_arguments_exception_extras_and_stack() -> None:
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError as exc:
        record = _record("refused %s with key %s", TOKEN, API_KEY, exc=exc)
    redact_record(record, REDACTOR)
    assert record.exc_info is None and record.exc_text and "ValueError" in record.exc_text
    for formatter in (JsonFormatter(), logging.Formatter("%(message)s %(detail)s")):
        text = formatter.format(record)
        assert leaks(text) == [], text
        assert leaks(str(record.__dict__)) == []
    assert "ValueError: bad token [redacted]" in orjson.loads(JsonFormatter().format(record))["exc"]


def test_a_record_whose_arguments_do_not_fit_is_still_scrubbed() -> None:
    record = _record("two %s %s", TOKEN)
    redact_record(record, REDACTOR)
    assert leaks(record.getMessage()) == [] and "two" in record.getMessage()


def test_the_rate_gate_admits_one_per_interval_and_counts_the_rest() -> None:
    gate = RateGate(60.0)
    assert gate.admit(1000.0) == 0
    assert [gate.admit(1000.0 + t) for t in (1.0, 30.0, 59.9)] == [None, None, None]
    assert gate.admit(1060.0) == 3
    assert gate.admit(1061.0) is None
    assert gate.admit(5000.0) == 1


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _aiohttp_record(exc: BaseException, level: int = logging.ERROR) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__)
    return logging.LogRecord(
        "aiohttp.server",
        level,
        __file__,
        1,
        "Error handling request from %s",
        ("10.0.0.7",),
        exc_info,
    )


def test_malformed_requests_log_one_warning_per_interval_without_the_request() -> None:
    clock = _Clock()
    limiter = MalformedRequestFilter(interval=60.0, clock=clock)
    bad = BadStatusLine(f"GET /ws?token={TOKEN} HTTP/9.9")
    passed = [r for r in (_aiohttp_record(bad) for _ in range(100)) if limiter.filter(r)]
    assert len(passed) == 1
    first = passed[0]
    assert (first.levelno, first.levelname, first.exc_info, first.exc_text) == (
        logging.WARNING,
        "WARNING",
        None,
        None,
    )
    assert TOKEN not in first.getMessage() and "BadStatusLine" in first.getMessage()
    assert (first.__dict__["error"], first.__dict__["suppressed"]) == ("BadStatusLine", 0)
    assert first.__dict__["remote"] == "10.0.0.7"
    clock.now += 60.0
    later = _aiohttp_record(InvalidHeader(f"Authorization: Bearer {API_KEY}\x01"))
    assert limiter.filter(later) and later.__dict__["suppressed"] == 99
    # aiohttp logs a first-request BadHttpMethod at DEBUG: it stays DEBUG (and is limited too).
    clock.now += 60.0
    quiet = _aiohttp_record(BadHttpMethod("G\x01T"), logging.DEBUG)
    assert limiter.filter(quiet) and quiet.levelno == logging.DEBUG


def test_the_client_protocols_warning_says_how_many_not_which_once_per_interval() -> None:
    """aiohttp quotes every subprotocol a client offers; a token split at its dots (three
    protocols) matched no redaction pattern and was logged whole."""
    clock = _Clock()
    limiter = ClientProtocolsFilter(interval=60.0, clock=clock)
    pieces = TOKEN.split(".")

    def record() -> logging.LogRecord:
        return logging.LogRecord(
            "aiohttp.websocket",
            logging.WARNING,
            __file__,
            1,
            "%s: Client protocols %r don’t overlap server-known ones %r",
            ("10.0.0.7", pieces, ()),
            None,
        )

    passed = [r for r in (record() for _ in range(50)) if limiter.filter(r)]
    assert len(passed) == 1
    said = passed[0].getMessage()
    assert all(piece not in said for piece in pieces), said
    assert said.startswith("10.0.0.7: none of the 3 WebSocket subprotocols")
    clock.now += 60.0
    later = record()
    assert limiter.filter(later) and "49 more since the last" in later.getMessage()
    # aiohttp before 3.11.14 logged (client's protocols, server's), without the address first
    old_form = logging.LogRecord(
        "aiohttp.websocket",
        logging.WARNING,
        __file__,
        1,
        "Client protocols %r don’t overlap server-known ones %r",
        (pieces, ("party_sync",)),
        None,
    )
    clock.now += 60.0
    assert limiter.filter(old_form)
    said = old_form.getMessage()
    assert all(piece not in said for piece in pieces), said
    assert said.startswith("a client: none of the 3 WebSocket subprotocols"), said
    other = logging.LogRecord(
        "aiohttp.websocket", logging.WARNING, __file__, 1, "x %s", ("y",), None
    )
    assert limiter.filter(other) and other.getMessage() == "x y"


def test_other_errors_of_aiohttp_pass_untouched() -> None:
    limiter = MalformedRequestFilter(interval=60.0, clock=_Clock())
    for _ in range(3):
        record = _aiohttp_record(RuntimeError("handler bug"))
        assert limiter.filter(record)
        assert record.levelno == logging.ERROR and record.exc_info is not None


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Every test here leaves the process's logging as it found it (``logs.configure`` sets the
    root logger's level and handler: left at INFO, it let other tests' caplog see every INFO
    line of every library)."""
    root = logging.getLogger()
    server = logging.getLogger("aiohttp.server")
    ws = logging.getLogger("aiohttp.websocket")
    saved = (root.handlers[:], root.level, server.filters[:], ws.filters[:])
    yield
    root.handlers[:], server.filters[:], ws.filters[:] = saved[0], saved[2], saved[3]
    root.setLevel(saved[1])


@pytest.mark.usefixtures("restore_logging")
def test_configure_scrubs_every_logger_and_protects_the_secrets_given() -> None:
    stream = io.StringIO()
    secret = "jwt-secret-configured-at-startup-0123"
    logs.configure("DEBUG", "text", stream=stream, secrets=[secret])
    logs.protect("late-api-key-made-in-dev-mode-0123")
    logging.getLogger("some.library").warning("leaked %s and %s", TOKEN, secret)
    logging.getLogger("another").error("late-api-key-made-in-dev-mode-0123 in a message")
    out = stream.getvalue()
    assert out.count(REDACTED) == 3, out
    assert SIGNATURE not in out and secret not in out and "late-api-key" not in out
    assert [
        f
        for f in logging.getLogger("aiohttp.server").filters
        if isinstance(f, MalformedRequestFilter)
    ]
    logs.configure("INFO", "json", stream=stream)  # configuring twice keeps one limiter
    limiters = [
        f
        for f in logging.getLogger("aiohttp.server").filters
        if isinstance(f, MalformedRequestFilter)
    ]
    assert len(limiters) == 1


def test_text_lines_carry_the_records_fields_scrubbed_like_the_json_ones() -> None:
    """log_format text printed only the message: a refusal's code, its trace id and party were
    lost (security probe), where the JSON line has them."""
    stream = io.StringIO()
    logs.configure("INFO", "text", stream=stream)
    logging.getLogger("party_sync.core.session").info(
        "message refused",
        extra={"trace_id": "t-1", "party_id": "p1", "code": "bad_json", "detail": f"a {TOKEN}"},
    )
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed", extra={"trace_id": "t-2"})
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(
        f'message refused trace_id=t-1 party_id=p1 code=bad_json detail="a {REDACTED}"'
    ), lines[0]
    assert SIGNATURE not in stream.getvalue()
    assert (
        lines[1].endswith("failed trace_id=t-2")
        and lines[2] == "Traceback (most recent call last):"
    )
    # text a peer sent cannot forge a line, nor reach a terminal raw (code review)
    stream.truncate(0)
    stream.seek(0)
    logging.getLogger("x").warning(
        "engine said %s", "ok\n2026-01-01 ERROR forged", extra={"origin": "\x1b[31mred"}
    )
    out = stream.getvalue()
    assert out.count("\n") == 1 and "\x1b" not in out, out
    assert out.rstrip("\n").endswith(
        'engine said ok\\n2026-01-01 ERROR forged origin="\\u001b[31mred"'
    ), out
    # a message that could pass for fields is quoted; C1 controls and Unicode line breaks too
    stream.truncate(0)
    stream.seek(0)
    logging.getLogger("aiohttp.access").info(
        "GET /x status=200 remote=10.0.0.1\x9b31m\u2028next", extra={"status": 404}
    )
    out = stream.getvalue()
    assert out.rstrip("\n").endswith(
        'aiohttp.access: "GET /x status=200 remote=10.0.0.1\\x9b31m\\u2028next" status=404'
    ), out
    logs.configure("INFO", "json", stream=io.StringIO())


@pytest.mark.parametrize(
    "value",
    ["https://e1.example\udce9", "\ud800", 2**70, {"nested": "x\udcff"}],
)
def test_a_record_orjson_cannot_write_is_still_one_json_line(value: object) -> None:
    """A request header that is not UTF-8 (Python decodes it with surrogateescape: a refused
    ``Origin`` is logged) made the formatter raise: logging printed ``--- Logging error ---`` and
    a traceback on stderr, and the warning itself was lost."""
    record = logging.LogRecord("party_sync", logging.WARNING, __file__, 1, "refused", (), None)
    record.origin = value
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = orjson.loads(line)  # valid UTF-8 JSON: the bytes written out, not dropped
    assert entry["msg"] == "refused" and "origin" in entry


@pytest.mark.parametrize(
    ("url", "found"),
    [
        (
            "redis://:RedisPassw0rd%21XYZ@127.0.0.1:6390/0",
            ("RedisPassw0rd%21XYZ", "RedisPassw0rd!XYZ"),
        ),
        ("rediss://user:PlainPassword123@h:6390", ("PlainPassword123", "PlainPassword123")),
        ("redis://127.0.0.1:6390/0", ()),
        (None, ()),
    ],
)
def test_the_redis_password_is_a_secret_by_value_too(
    url: str | None, found: tuple[str, ...]
) -> None:
    """Only the URL form (``redis://:pw@``) was scrubbed: a bare password (a client that sent it
    as a WebSocket subprotocol, logged by aiohttp) went to the log verbatim."""
    settings = config.load(None, env={"PARTY_SYNC_REDIS_URL": url} if url else {})
    secrets = [s for s in logs.secrets_of(settings) if s]
    assert tuple(secrets) == found
    if found:
        redactor = Redactor(secrets)
        assert found[1] not in redactor.scrub(f"Client protocols ['chat', '{found[1]}']")
