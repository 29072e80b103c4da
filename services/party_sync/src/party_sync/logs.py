"""Structured logs: one JSON object per line, carrying the ``trace_id`` of the message concerned.

Fields passed with ``extra=`` (trace_id, party_id, character_id, action_id, code, ...) become keys,
so "why did this player not see that result" can be answered by filtering on one trace_id. Message
bodies and tokens are never logged.

"Never logged" has to hold for code that is not ours too: when aiohttp's HTTP parser refuses a
malformed request (a bad character after the token, ``HTTP/9.9``, LF-only line ends, a NUL in
the URL, a control character in ``Authorization``), ``aiohttp.server`` logs the raw request line
or header, token and API key included, at ERROR with a traceback. So the process's one log
handler (``configure``) passes every record, whichever logger made it, through ``Redactor``:
JWT-shaped strings, ``token=``-like query values, ``Authorization`` / ``Bearer`` values, URL
passwords and the configured secrets themselves (``protect``) are replaced by ``[redacted]`` in
the message, its arguments, ``extra`` fields and the exception text. And because one anonymous
client could otherwise write one ERROR traceback per malformed request, those records
(``aiohttp.http_exceptions.BadHttpMessage`` and subclasses, and ``RequestPayloadError``: a body
whose Content-Encoding does not decode, met again when aiohttp drains what a handler left
unread) become one WARNING line without traceback at most every ``BAD_REQUEST_LOG_INTERVAL``
seconds, carrying how many were left out.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, Final
from urllib.parse import quote

import orjson
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestPayloadError

from party_sync.core.limits import RateGate as RateGate  # (its home before: kept importable)
from party_sync.tasks import short_clients

if TYPE_CHECKING:
    from party_sync.config import Settings

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

REDACTED: Final = "[redacted]"
#: Seconds between two log lines about malformed HTTP requests (aiohttp's parser refusals).
BAD_REQUEST_LOG_INTERVAL: Final = 60.0
#: Shorter configured secrets are not scrubbed by value: replacing every occurrence of a
#: two-letter string would make the logs unreadable (and such a secret protects nothing).
MIN_SECRET_LENGTH: Final = 4


def _keep_prefix(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


def _keep_prefix_and_at(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED + "@"


_Replacement = Callable[[re.Match[str]], str]
# Every pattern below is linear in the length of the text (no nested or overlapping repeats;
# a run is scanned from its first character only): log text can be chosen by an attacker.
_PATTERNS: Final[tuple[tuple[re.Pattern[str], _Replacement], ...]] = (
    # Authorization header, raw ("Authorization: Bearer x"), as a dict or JSON entry
    # ("'Authorization': 'Bearer x'") or in a repr of raw bytes, where the line ends are the
    # escapes \r \n; everything up to the end of the value goes, whatever the scheme.
    (
        re.compile(r"""(?i)(authorization['"]?\s*[:=]\s*['"]?)(?:(?!\\r|\\n)[^'"\r\n])+"""),
        _keep_prefix,
    ),
    (re.compile(r"""(?i)(\bbearer\s+)[^\s'"\\,]+"""), _keep_prefix),
    # Credentials passed as query parameters (the WebSocket's ?token=, initData's fields).
    (
        re.compile(
            r"""(?i)((?<![A-Za-z0-9])(?:token|api_?key|init_?data|tgwebappdata|signature|hash"""
            r"""|secret|password)=)[^&\s'"\\]+"""
        ),
        _keep_prefix,
    ),
    # The same names as keys of a dict or JSON object.
    (
        re.compile(
            r"""(?i)(['"](?:[a-z_]*token|api_?key|init_?data|[a-z_]*secret|password)['"]"""
            r"""\s*:\s*['"])[^'"]*"""
        ),
        _keep_prefix,
    ),
    # A password in a URL (redis://:password@host).
    (
        re.compile(r"""(?i)((?<![a-z0-9+.-])[a-z][a-z0-9+.-]*+://[^/\s:@'"]*:)[^/\s@'"]+@"""),
        _keep_prefix_and_at,
    ),
)
#: Every pattern needs one of these: text without any (most ids and short fields) is skipped. (A
#: dot percent-encoded is one: a token cut before its "eyJ", its dots %2E, had none; fix-check.)
_MAYBE = re.compile(r"(?i)[:=.]|%(?:25)*+2e|bearer|eyJ")
#: A base64url run that starts as JSON does ('{"' is "eyJ"): a JWS's header or payload on its
#: own, or cut short before its dot (recheck probe: a bounded log field cut a token's header
#: in two; a payload alone names the party and the character).
#: A percent-encoded character before it or a percent-encoded dot inside it (``%2E``, or twice
#: encoded, ``%252E``) counts as a separator (re-check probe: a token whose dots were written
#: %2E, in an ``Origin``, left its payload in the log after the header was scrubbed).
#: A dot, or one percent-encoded any number of times (``%2E``, ``%252E``, ``%25252E``...: a path
#: is decoded once before it is logged; re-check probe: a token in a path, its dots encoded
#: three times and a character glued before it, was logged whole).
_SEP: Final = r"(?:\.|%(?:25)*+2[Ee])"
_SPLIT: Final = re.compile(_SEP)
#: Wherever it starts, whatever is glued before it (re-check probe: ``/x-<payload>.<signature>``,
#: a token without its header, was logged whole: the header of a JWS signed with HS256 is a
#: constant, so that is the token); "eyJ" inside a run of another kind is one chance in 262,144
#: per character, and scrubbing such an id now and then costs nothing.
_JSON_B64 = re.compile(rf"eyJ[A-Za-z0-9_-]{{8,}}+(?:{_SEP}[A-Za-z0-9_-]*+)*+")
# Runs of base64url characters and dots, each matched from its first character only (a
# percent-encoded character before one is no part of it: ``%3DeyJ...`` starts at "eyJ").
_DOTTED = re.compile(
    r"(?:(?<![A-Za-z0-9_.%-])(?<!%[0-9A-Fa-f])|(?<=%[0-9A-Fa-f]{2}))"
    rf"\.*+[A-Za-z0-9_-]++(?:{_SEP}[A-Za-z0-9_-]*+)+"
)


def _looks_like_jws_head(a: str, b: str) -> bool:
    """Two dot-separated segments that start a JWS (RFC 7515 compact form): the header and
    payload are base64url JSON objects, so they start with "ey" ('{"') or "ew" ('{' and
    whitespace); ``a`` may carry a prefix glued on (``\\x7feyJ...`` in a repr). A token cut
    short (a log field bounded to 200 characters, security probe: an ``Origin`` that was a
    token) has no signature left but is still a token's claims: scrubbed too."""
    if len(b) < 8 or b[:2] not in ("ey", "ew"):
        return False
    starts = [at for at in (a.find("ey"), a.find("ew")) if at >= 0]
    return bool(starts) and len(a) - min(starts) >= 10


#: The lengths of an HMAC signature in base64url (HS256, HS384, HS512), the last part of a JWS.
_SIGNATURE_LENGTHS: Final = frozenset({43, 64, 86})


def _looks_like_jws_tail(a: str, b: str) -> bool:
    """A long segment then a signature: a token's payload, cut anywhere before its end or with
    something glued before it, and its signature (fix-check probe: ``/x-<payload[5:]>.<sig>``
    was logged whole, and the five characters cut off are the same in every token)."""
    return len(b) in _SIGNATURE_LENGTHS and len(a) >= 16


def _scrub_jwt(match: re.Match[str]) -> str:
    """A dotted run that holds a JWS's start or its end, or any three long segments, is
    scrubbed whole."""
    run = match.group()
    parts = _SPLIT.split(run)
    if any(
        _looks_like_jws_head(parts[i], parts[i + 1]) or _looks_like_jws_tail(parts[i], parts[i + 1])
        for i in range(len(parts) - 1)
    ):
        return REDACTED
    if any(min(map(len, parts[i : i + 3])) >= 16 for i in range(len(parts) - 2)):
        return REDACTED
    return run


class Redactor:
    """Scrubs credentials out of text: known shapes (``_PATTERNS``) and configured secrets."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._exact: re.Pattern[str] | None = None
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        """Scrub these values from now on (and their URL-encoded and ``repr`` forms)."""
        forms: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            # A bot token "<bot id>:<secret>": its secret part alone is a credential too.
            parts = [secret, secret.partition(":")[2]] if ":" in secret else [secret]
            for part in parts:
                if len(part) >= MIN_SECRET_LENGTH:
                    forms |= {part, quote(part, safe=""), repr(part.encode())[2:-1]}
        with self._lock:
            if forms <= self._secrets:
                return
            self._secrets |= forms
            longest_first = sorted(self._secrets, key=len, reverse=True)
            self._exact = re.compile("|".join(map(re.escape, longest_first)))

    def scrub(self, text: str) -> str:
        exact = self._exact
        if exact is not None:
            text = exact.sub(REDACTED, text)
        text = short_clients(text)  # (not a credential: a kilobyte of a client's settings)
        if not _MAYBE.search(text):
            return text
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        text = _DOTTED.sub(_scrub_jwt, text)
        return _JSON_B64.sub(REDACTED, text) if "eyJ" in text else text

    def scrub_value(self, value: Any) -> Any:
        """Strings scrubbed; lists, tuples and dicts scrubbed inside; anything else as is."""
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, list):
            return [self.scrub_value(item) for item in value]
        if isinstance(value, tuple):
            return tuple(self.scrub_value(item) for item in value)
        if isinstance(value, dict):
            return {key: self.scrub_value(item) for key, item in value.items()}
        return value


_EXCEPTION_FORMATTER = logging.Formatter()


#: ``extra=VERBATIM`` on a record whose message is made only of party_sync's own words and
#: numbers (no argument, nothing from outside): its message is not scrubbed by value, so a weak
#: secret that is also a word ("short") does not garble the very warning that it is too short.
#: Its ``extra`` fields and exception text are scrubbed as always.
VERBATIM: Final = {"party_sync_verbatim": True}


def redact_record(record: logging.LogRecord, redactor: Redactor) -> None:
    """Scrub ``record`` in place: its message (arguments merged in), exception and stack text,
    and its ``extra`` fields. The exception is kept as text only (``exc_text``), which every
    ``logging.Formatter`` prints instead of formatting ``exc_info`` again."""
    try:
        message = record.getMessage()
    except Exception:  # arguments that do not fit the format: keep both, scrubbed
        message = f"{record.msg!r} {record.args!r}"
    own = record.__dict__.pop("party_sync_verbatim", False) is True and not record.args
    record.msg = message if own and isinstance(record.msg, str) else redactor.scrub(message)
    record.args = ()
    if record.exc_info:
        text = record.exc_text or _EXCEPTION_FORMATTER.formatException(record.exc_info)
        record.exc_info = None
        record.exc_text = redactor.scrub(text)
    elif record.exc_text:
        record.exc_text = redactor.scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = redactor.scrub(record.stack_info)
    for key, value in list(record.__dict__.items()):
        if key not in _STANDARD:
            record.__dict__[key] = redactor.scrub_value(value)


class RedactingFilter(logging.Filter):
    """A handler filter: every record the handler writes is scrubbed first (never dropped)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record, self.redactor)
        return True


class _GatedFilter(logging.Filter):
    """A filter that lets the records it rewrites through at most once per ``interval``."""

    def __init__(
        self,
        interval: float = BAD_REQUEST_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._gate = RateGate(interval)
        self._clock = clock
        self._lock = threading.Lock()

    def _admit(self) -> int | None:
        """None: this one is left out (counted); else the number left out since the last."""
        with self._lock:
            return self._gate.admit(self._clock())


class ClientProtocolsFilter(_GatedFilter):
    """For the ``aiohttp.websocket`` logger: aiohttp's WARNING "Client protocols [...] don't
    overlap server-known ones" quotes every subprotocol the client offered, text a client writes
    (a token put there, up to the header's size, in pieces no pattern recognises): it says how
    many, not which, at most once per ``interval``; every other record passes untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if "Client protocols" not in str(record.msg) or not isinstance(args, tuple):
            return True
        suppressed = self._admit()
        if suppressed is None:
            return False
        # None of aiohttp's arguments is kept: their positions changed between versions (the
        # client's address came first from 3.11.14 on), and the client's protocols are the
        # one list among them (aiohttp makes the server's a tuple).
        offered = next((len(arg) for arg in args if isinstance(arg, list)), 0)
        remote = args[0] if len(args) == 3 and isinstance(args[0], str) else "a client"
        record.msg = (
            "%s: none of the %d WebSocket subprotocols the client offered is one this server "
            "speaks (not quoted: a client writes them); %d more since the last such line (at "
            "most one per %gs)"
        )
        record.args = (remote, offered, suppressed, self._gate.interval)
        return True


class MalformedRequestFilter(_GatedFilter):
    """For the ``aiohttp.server`` logger: a request refused by the HTTP parser (400) becomes a
    WARNING (or stays DEBUG) without traceback and without the request's bytes, at most once
    per ``interval``; every other record passes untouched.

    aiohttp (``web_protocol.RequestHandler.handle_error``) logs "Error handling request from
    <remote>" with the parser's exception, whose text quotes the raw request line or header:
    an anonymous client could write one ERROR traceback per request it sends.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, BadHttpMessage | RequestPayloadError):
            return True
        suppressed = self._admit()
        if suppressed is None:
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        record.msg = (
            "malformed HTTP request refused (%s); %d more since the last such line "
            "(at most one per %gs)"
        )
        record.args = (type(error).__name__, suppressed, self._gate.interval)
        record.exc_info = None
        record.exc_text = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.__dict__.update(
            error=type(error).__name__, remote=str(remote), suppressed=suppressed
        )
        return True


#: The process's redactor: ``configure`` puts it on the root handler, ``protect`` feeds it.
REDACTOR: Final = Redactor()


def protect(*secrets: str | None) -> None:
    """Never log these values (API key, JWT secrets, bot token, ...); ``None`` and ``""`` are
    ignored. Call it as soon as the values are known (a development secret is made late)."""
    REDACTOR.add(*secrets)


def secrets_of(settings: Settings) -> tuple[str | None, ...]:
    """The credentials among the settings: the API key, both JWT secrets, the bot token, the
    Sentinel password, and the password in ``redis_url`` by value too (the URL form is scrubbed
    anyway; the bare value may come back quoted by a library, a peer's header, an error)."""
    return (
        settings.api_key,
        settings.jwt_secret,
        settings.jwt_previous_secret,
        settings.telegram_bot_token,
        settings.redis_sentinel_password,
        *_url_password(settings.redis_url),
    )


def _url_password(url: str | None) -> tuple[str, ...]:
    """A URL's password as written and percent-decoded (both, when they differ)."""
    if not url:
        return ()
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:  # not a URL config accepts; nothing to take from it
        return ()
    if not password:
        return ()
    return (password, urllib.parse.unquote(password))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and value is not None:
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:
            # What orjson cannot write: a lone surrogate (a request header that is not UTF-8,
            # which Python decodes with surrogateescape; a peer can send one), an integer past
            # 64 bits. The line must still be one JSON object, the record not lost.
            return json.dumps(
                _writable(entry), default=lambda o: _writable(str(o)), separators=(",", ":")
            )


class TextFormatter(logging.Formatter):
    """``log_format`` text: one line for a person to read, with the record's fields (the
    ``extra``: ``trace_id``, ``party_id``, ``code`` ...) after the message as ``key=value``, as
    the JSON lines carry them (a value with a space or a quote is written as a JSON string)."""

    def __init__(self, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
        super().__init__(fmt)
        # (a field the line's format shows already, a worker's number, is not repeated)
        self._shown = frozenset(re.findall(r"%\((\w+)\)", fmt))

    def format(self, record: logging.LogRecord) -> str:
        """One line per record (a newline or another control character in the message or a
        field is written escaped, so no text a peer sent can forge a line or drive a
        terminal), then the traceback, if any, below it."""
        fields = [
            f"{key}={_text_value(value)}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD and value is not None and key not in self._shown
        ]
        message = record.getMessage()
        if fields and ("=" in message or '"' in message):
            # quoted, so no text in it (a request path, say) passes for one of the fields
            message = json.dumps(message, ensure_ascii=False)
        record.message = _one_line(message)
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if fields:
            line = f"{line} {' '.join(fields)}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


#: Characters a text line writes escaped: C0 and C1 controls, and the Unicode line breaks
#: some viewers split on (NEL, LINE and PARAGRAPH SEPARATOR).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """``text`` with its control characters (newlines included) written as escapes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c.isspace() or c in '"=' or _CONTROL.match(c) for c in text):
        return text
    # JSON escapes the C0 controls; the others as _one_line does
    return _one_line(json.dumps(text, ensure_ascii=False))


def _writable(value: Any) -> Any:
    """``value`` with every lone surrogate of its text written out as ``\\udcXX`` (so a log
    reader gets valid UTF-8 JSON, and sees which bytes were sent)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {
            _writable(k) if isinstance(k, str) else str(k): _writable(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_writable(v) for v in value]
    return value


def configure(
    level: str = "INFO",
    fmt: str = "json",
    *,
    stream: IO[str] | None = None,
    secrets: Iterable[str | None] = (),
) -> None:
    """The process's logging: one handler on the root logger (``stream``, default stderr) that
    scrubs every record, and the malformed-request limiter on ``aiohttp.server``."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextFormatter()
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter(REDACTOR))
    protect(*secrets)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # A library's ``warnings.warn`` would print raw text lines into the JSON log (hostile-input
    # probe: PyJWT's key-length warning): through the ``py.warnings`` logger instead
    logging.captureWarnings(True)
    server_logger = logging.getLogger("aiohttp.server")
    for old in [f for f in server_logger.filters if isinstance(f, MalformedRequestFilter)]:
        server_logger.removeFilter(old)
    server_logger.addFilter(MalformedRequestFilter())
    ws_logger = logging.getLogger("aiohttp.websocket")
    for old_filter in [f for f in ws_logger.filters if isinstance(f, ClientProtocolsFilter)]:
        ws_logger.removeFilter(old_filter)
    ws_logger.addFilter(ClientProtocolsFilter())
