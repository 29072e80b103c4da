"""The security tier's frame fuzzer: hypothesis strategies of client frames, and the driver that
plays one generated case against a running server and checks every answer with the oracle.

Frames are *valid-ish*: most are built from the client message schemas (``action.request``,
``party.leave``, ``vote.cast``), then some are broken on purpose — a field of the wrong type, an
unknown or server-only type, bytes flipped, cut or inserted in the encoded JSON, random bytes,
huge messages (above the size limit, and far above it), nested payloads, binary frames. The
driver sends a case's frames back to back on a fresh connection of a fresh party, pairs every
``system.error`` with the frame it answers (errors come back in the order frames were sent),
waits for the ``action.result`` of every accepted action, then checks that the connection still
answers a ping action (or, after a transport-level close, that a new connection does).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import string
import time
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson
from hypothesis import strategies as st
from party_sync.auth import issue_token
from party_sync.protocol import types as t

from ps_testkit.client import Client, Closed
from ps_testkit.security_oracle import (
    ACTION_RACES,
    TRANSPORT_CLOSES,
    Binding,
    Expected,
    check_error,
    expect,
    ping,
)
from ps_testkit.servers import SECRET, Running

#: The fuzzing servers' message limit (the smallest allowed: huge frames stay cheap).
MAX_BYTES: Final = 2048

#: ``make test-security-long`` sets PS_SECURITY_LONG=1: the ``security_long`` tests run too, and
#: each fuzzer gets ``EXAMPLES`` examples (PS_SECURITY_EXAMPLES, default 1000; CI: 40).
LONG: Final = os.environ.get("PS_SECURITY_LONG") == "1"
EXAMPLES: Final = int(os.environ.get("PS_SECURITY_EXAMPLES", "0")) or (1000 if LONG else 40)

RUN: Final = "run-fz"
CHARACTER: Final = "aria"

_counter = itertools.count(1)


@dataclass(frozen=True)
class Frame:
    data: bytes
    binary: bool = False

    def __repr__(self) -> str:  # hypothesis prints failing cases: keep them readable
        kind = "binary" if self.binary else "text"
        return f"Frame({kind}, {len(self.data)} bytes, {self.data[:160]!r})"


# -- strategies ----------------------------------------------------------------------------------

_ID_CHARS = string.ascii_lowercase + string.digits + "-"
ids = st.text(_ID_CHARS, min_size=1, max_size=12)
bad_ids = st.one_of(
    st.just(""),
    st.text(min_size=1, max_size=8).map(lambda s: s + " *"),
    st.just("x" * 65),
    st.sampled_from(["a\nb", "ü", "a\x00b", "../x", "a/b", "\u202eevil"]),
)
maybe_bad_id = st.one_of(ids, ids, ids, bad_ids)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)

_TIMESTAMPS = st.sampled_from(
    ["2026-11-25T21:00:40.870Z", "2026-11-25T21:00:40Z", "yesterday", "2026-13-01T00:00:00Z"]
)
_TRACES = st.one_of(st.text(_ID_CHARS, min_size=1, max_size=40), st.sampled_from(["", "a b"]))


def _envelope(type_: str, payload: Any) -> st.SearchStrategy[dict[str, Any]]:
    extras = st.fixed_dictionaries({}, optional={"trace_id": _TRACES, "timestamp": _TIMESTAMPS})
    return extras.map(lambda extra: {"type": type_, **extra, "payload": payload})


@st.composite
def action_requests(draw: st.DrawFn) -> dict[str, Any]:
    action_type = draw(st.sampled_from(["choice", "combat", "skill_check", "dance"]))
    inner = draw(json_objects)
    if action_type == "choice" and draw(st.booleans()):
        inner["option"] = draw(maybe_bad_id)
    payload = {
        "action_id": draw(maybe_bad_id),
        "character_id": draw(st.sampled_from([CHARACTER, CHARACTER, CHARACTER, "borin", "party"])),
        "campaign_run_id": draw(st.sampled_from([RUN, RUN, RUN, "run-other"])),
        "action_type": action_type,
        "payload": inner,
    }
    return draw(_envelope(t.ACTION_REQUEST, payload))


party_leaves = st.builds(
    lambda character, reason: {"character_id": character, **reason},
    st.sampled_from([CHARACTER, "borin", "x y"]),
    st.sampled_from([{}, {}, {"reason": "left"}]),
).flatmap(lambda payload: _envelope(t.PARTY_LEAVE, payload))
vote_casts = st.builds(
    lambda vote_id, option: {"vote_id": vote_id, "option": option}, maybe_bad_id, maybe_bad_id
).flatmap(lambda payload: _envelope(t.VOTE_CAST, payload))
server_only = st.sampled_from(sorted(t.ALL_TYPES - t.CLIENT_TYPES)).flatmap(
    lambda type_: json_objects.flatmap(lambda payload: _envelope(type_, payload))
)
unknown = st.one_of(st.text(max_size=20), st.sampled_from(["chat.say", "ACTION.REQUEST", "x" * 80]))
unknown_types = unknown.filter(lambda s: s not in t.ALL_TYPES).flatmap(
    lambda type_: json_objects.flatmap(lambda payload: _envelope(type_, payload))
)
messages = st.one_of(action_requests(), action_requests(), party_leaves, vote_casts)


@st.composite
def wrong_types(draw: st.DrawFn) -> Any:
    """A schema-built message with one value (at any depth) replaced by one of another type."""
    message = draw(messages)
    paths: list[list[str]] = [[]]
    stack: list[tuple[Any, list[str]]] = [(message, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                paths.append([*path, key])
                stack.append((value, [*path, key]))
    path = draw(st.sampled_from(paths))
    replacement: Any = draw(
        st.one_of(scalars, st.just([]), st.just({}), st.lists(scalars, min_size=1, max_size=2))
    )
    if not path:
        return replacement
    target = message
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = replacement
    return message


def _encode(value: Any) -> bytes:
    return orjson.dumps(value)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """An encoded message with bytes flipped, cut or inserted."""
    data = bytearray(_encode(draw(messages)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        else:
            del data[at:]
    return bytes(data)


@st.composite
def huge(draw: st.DrawFn) -> bytes:
    """A valid-looking message padded above the limit (mostly within 4× of it, sometimes past)."""
    message = draw(action_requests())
    size = draw(st.one_of(st.integers(MAX_BYTES + 1, 4 * MAX_BYTES), st.just(4 * MAX_BYTES + 100)))
    message["payload"]["payload"] = {"pad": "x" * size}
    return _encode(message)


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """An action whose free-form payload is nested (within what any sane limit allows)."""
    message = draw(action_requests())
    levels = draw(st.integers(1, 24))
    inner: Any = draw(scalars)
    for _ in range(levels):
        inner = [inner] if draw(st.booleans()) else {"k": inner}
    message["payload"]["payload"] = {"deep": inner}
    return _encode(message)


frame_bodies = st.one_of(
    messages.map(_encode),
    messages.map(_encode),
    wrong_types().map(_encode),
    server_only.map(_encode),
    unknown_types.map(_encode),
    mutated(),
    nested(),
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"null", b"[]", b"{}", b'"x"', b"1e999", b"-0", b"\xef\xbb\xbf{}"]),
    huge(),
)
frames = st.builds(Frame, frame_bodies, st.booleans())
cases = st.lists(frames, min_size=1, max_size=6)


# -- the driver ----------------------------------------------------------------------------------


def fresh_binding() -> Binding:
    return Binding(f"fz-{next(_counter)}", RUN, CHARACTER)


async def connect(srv: Running, binding: Binding) -> Client:
    """A fresh connection of ``binding`` (its own token subject: no per-user cap is shared)."""
    value = issue_token(
        SECRET,
        party_id=binding.party_id,
        campaign_run_id=binding.campaign_run_id,
        character_id=binding.character_id,
        display_name=binding.character_id.capitalize(),
        now=time.time(),
        sub=f"fuzz:{binding.party_id}",
    )
    client = Client(await srv.http.ws_connect(srv.ws_url, params={"token": value}))
    await client.expect(t.HELLO)
    return client


async def send(client: Client, frame: Frame) -> None:
    opcode = aiohttp.WSMsgType.BINARY if frame.binary else aiohttp.WSMsgType.TEXT
    await client.ws.send_frame(frame.data, opcode)


def _text_ok(frame: Frame) -> bool:
    try:
        frame.data.decode("utf-8")
    except UnicodeDecodeError:
        return frame.binary
    return True


async def play(srv: Running, case: list[Frame], timeout: float = 10.0) -> None:
    """Send ``case`` on a fresh connection and check every answer (see the module docstring)."""
    binding = fresh_binding()
    client = await connect(srv, binding)
    plan: list[tuple[Expected, Frame]] = []
    for frame in case:
        want = expect(frame.data, binding, MAX_BYTES)
        if want.kind != "close" and frame.binary:
            # Messages are JSON in text frames: a binary one is refused whatever it holds.
            want = Expected("error", "bad_json", codes=frozenset({"bad_json"}))
        elif want.kind != "close" and not _text_ok(frame):
            # A text frame that is not UTF-8: refused as bad JSON, or closed with 1007.
            want = Expected("error", "bad_json", codes=frozenset({"bad_json"}))
            want.kind = "error-or-close"
        plan.append((want, frame))
        await send(client, frame)
        if want.kind in ("close", "leave", "error-or-close"):
            break
    try:
        async with asyncio.timeout(timeout):
            final = await _collect(client, plan, binding)
        if final == "open":
            # an action of the case may still get its race answer (action_in_flight decided before
            # the result was recorded, delivered after it on Redis: the reply and the pub/sub
            # event travel separately); the ping passes over those, and only those
            of_the_case = frozenset(
                w.action_id for w, _ in plan if w.kind == "action" and w.action_id
            )
            await _ping(client, binding, "PING:after", late=of_the_case)
            return
    except TimeoutError:
        raise AssertionError(f"no complete answer to {plan} (got {client.received})") from None
    finally:
        await client.close()
    # The connection ended (a transport-level close, or its own leave): a new one is served.
    again = await connect(srv, binding)
    try:
        await _ping(again, binding, "PING:reconnected")
    finally:
        await again.close()


async def _collect(client: Client, plan: list[tuple[Expected, Frame]], binding: Binding) -> str:
    """Read until every frame of ``plan`` has its answer; ``open`` or ``ended``."""
    index = 0
    awaited: set[str] = set()  # action_ids that must get an action.result
    results: set[str] = set()
    left = False
    last = plan[-1][0]

    def done() -> bool:
        rest = plan[index:]
        if any(w.kind != "action" or w.action_id not in results for w, _ in rest):
            return False
        return awaited <= results and (last.kind != "leave" or left)

    while not done():
        try:
            message = await client.recv(timeout=30)
        except Closed as closed:
            return _closed(closed.code, plan, index, left)
        type_ = message["type"]
        if type_ == t.ACTION_RESULT:
            results.add(message["payload"]["action_id"])
        elif type_ == t.PARTY_LEAVE and message["payload"]["character_id"] == binding.character_id:
            assert last.kind == "leave", f"a leave nobody asked for: {message}"
            left = True
        elif type_ == t.ERROR:
            index = _match_error(message, plan, index, awaited)
    return "ended" if last.kind == "leave" else "open"


def _closed(code: int | None, plan: list[tuple[Expected, Frame]], index: int, left: bool) -> str:
    """The server closed the connection: fine only after transport-level garbage (a close that
    may overtake the answers to the frames before it) or the connection's own leave."""
    last = plan[-1][0]
    if last.kind == "close" or (last.kind == "error-or-close" and code == 1007):
        assert code in TRANSPORT_CLOSES, (code, plan[-1])
        return "ended"
    if last.kind == "leave" and left:
        return "ended"
    want, frame = plan[index] if index < len(plan) else plan[-1]
    raise AssertionError(f"closed with {code} while waiting for {want} {frame}")


def _match_error(
    error: dict[str, Any], plan: list[tuple[Expected, Frame]], index: int, awaited: set[str]
) -> int:
    """Pair ``error`` with the next frame that can get one; return the index after it."""
    while index < len(plan):
        want, frame = plan[index]
        if want.kind == "action":
            reply_to = error["payload"]["in_reply_to"]
            race = error["payload"]["code"] in ACTION_RACES
            if race and reply_to.get("action_id") == want.action_id:
                check_error(error, Expected("error", codes=ACTION_RACES, **_ids(want)), frame.data)
                return index + 1
            assert want.action_id is not None
            awaited.add(want.action_id)  # accepted: its answer is an action.result
            index += 1
            continue
        if want.kind in ("error", "error-or-close"):
            check_error(error, want, frame.data)
            return index + 1
        raise AssertionError(f"an error where {want} was due: {error} for {frame}")
    raise AssertionError(f"an error no frame asked for: {error}; plan {plan}")


def _ids(want: Expected) -> dict[str, Any]:
    return {"action_id": want.action_id, "type": want.type}


async def _ping(
    client: Client, binding: Binding, action_id: str, late: frozenset[str] = frozenset()
) -> None:
    """The connection still works: a valid action gets its ``action.result``. ``late``: action_ids
    of the case whose race answer (``ACTION_RACES``) may still arrive first."""
    await client.send(ping(action_id, binding))
    async with asyncio.timeout(10):
        while True:
            message = await client.recv(timeout=10)
            if message["type"] == t.ERROR:
                payload = message["payload"]
                if (
                    payload["code"] in ACTION_RACES
                    and payload["in_reply_to"].get("action_id") in late
                ):
                    continue
                raise AssertionError(f"the ping action was refused: {message}")
            if message["type"] == t.ACTION_RESULT and message["payload"]["action_id"] == action_id:
                return


__all__ = [
    "EXAMPLES",
    "LONG",
    "MAX_BYTES",
    "Frame",
    "cases",
    "connect",
    "frames",
    "fresh_binding",
    "play",
    "send",
]
