"""``PartyClient``: an asyncio party_sync client for bots, load generators and tests.

It connects with a token (or a ``token_provider`` called again when the token expires), keeps
the party state, reconnects with exponential backoff and full jitter, resumes from its last
``epoch``/``seq``, resyncs on a gap, and resends pending actions with their same ``action_id``
after a reconnect, so each action happens once. The protocol decisions live in ``stream``
(``ClientStream``, no I/O) and ``policy``; this module only moves messages and arms waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson

from party_sync.client.events import (
    ActionFailed,
    ActionResult,
    ClientClosed,
    ClientEvent,
    Connected,
    ConnectRefused,
    Disconnected,
    VoteRefused,
    VoteUpdated,
)
from party_sync.client.policy import Backoff, Next, after_close, after_handshake, blocked_for
from party_sync.client.state import PartyState
from party_sync.client.stream import (
    ActionDone,
    ActionError,
    ClientStream,
    Emit,
    Output,
    Resync,
    Send,
    VoteDone,
    VoteError,
)
from party_sync.client.subscription import Subscription
from party_sync.client.transport import (
    ABNORMAL_CLOSURE,
    AiohttpTransport,
    Connection,
    HandshakeRejected,
    Transport,
    TransportError,
)
from party_sync.protocol import ids
from party_sync.protocol import types as t

log = logging.getLogger(__name__)

#: Consecutive failed connects after which the client says so as a WARNING (then every 20th).
WARN_AFTER_FAILURES: Final = 3

TokenProvider = Callable[[], Awaitable[str] | str]
Callback = Callable[[Any], Awaitable[None] | None]


async def _token_from(provider: TokenProvider) -> str:
    """A fresh token from ``provider``, which may be async or plain (as the JS client's may).

    What it raises is taken as passing (its sign-in service may be down); a provider that gives
    no token at all is a programming error that no retry mends: ``ClientClosed`` says so."""
    token = provider()
    if inspect.isawaitable(token):
        token = await token
    if not isinstance(token, str) or not token:
        raise ClientClosed(
            f"token_provider returned {type(token).__name__}, not a token (a non-empty str)"
        )
    return token


class PartyClient:
    """One character's connection to its party (the token says which party and character).

    ``url`` is the WebSocket endpoint, e.g. ``ws://127.0.0.1:8080/ws``. Give ``token``, or a
    ``token_provider`` (a callable returning a fresh token, plain or async: called at start if
    there is no token, and again after close code 4001 or a handshake answered 401), or both.
    ``transport``, ``backoff`` and ``sleep`` are injectable for tests; ``max_attempts`` bounds
    consecutive failed connection attempts (None: try forever).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        transport: Transport | None = None,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_attempts: int | None = None,
    ) -> None:
        if token is None and token_provider is None:
            raise ValueError("give a token or a token_provider")
        self.url = url
        self._token = token
        self._provider = token_provider
        self._transport: Transport = transport or AiohttpTransport()
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._max_attempts = max_attempts
        self.stream = ClientStream()
        self.error: BaseException | None = None  # why the client stopped, unless asked to
        self.close_code: int | None = None  # the last close code the server sent
        #: the server closed with 1000 after ``leave()``: the character was removed
        self.left = False
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._hello: asyncio.Future[None] | None = None
        self._closing = False
        self._stopped = False
        self._actions: dict[str, asyncio.Future[ActionResult]] = {}
        #: the last ``Disconnected`` the app was given said ``reconnecting``
        self._told_reconnecting = False
        self._action_callers: dict[str, int] = {}  # the calls waiting for each pending action
        self._votes: dict[str, asyncio.Future[VoteUpdated]] = {}
        self._subscriptions: list[Subscription] = []
        self._callbacks: list[tuple[type[Any], Callback]] = []

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def state(self) -> PartyState:
        return self.stream.state

    @property
    def connected(self) -> bool:
        """True while a connection is open and caught up (requests go out at once)."""
        return self._conn is not None and self.stream.live

    def start(self) -> None:
        """Start connecting in the background (``connect`` also waits for the first hello)."""
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._hello = loop.create_future()
            self._task = loop.create_task(self._run(), name="party_sync.client")

    async def connect(self) -> PartyState:
        """Start, and return the state once the first ``system.hello`` arrived.

        Raises ``ConnectRefused`` when the server refuses for good (e.g. 401 with no provider),
        ``ClientClosed`` when the client stopped first (before its first hello, or since: a
        stopped client does not connect again; ``error`` says why it stopped).
        """
        self.start()
        assert self._hello is not None
        await asyncio.shield(self._hello)
        if self._stopped:
            raise ClientClosed(f"the client has stopped: {self.error or 'closed'}")
        return self.state

    async def close(self) -> None:
        """Stop without leaving the party (presence ends after the server's grace period)."""
        self._closing = True
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(1000)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        await self.wait_closed()
        await self._transport.close()

    async def wait_closed(self) -> None:
        """Wait until the client has stopped (``error`` then says why, if not by choice)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def __aenter__(self) -> PartyClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- events ---------------------------------------------------------------------------------
    def events(self) -> Subscription:
        """Every event from now on: ``async for event in client.events(): ...``.

        The queue is unbounded: consume it, or ``close()`` the subscription when done.
        """
        sub = Subscription(self._unsubscribe)
        if self._stopped:
            sub.put(None)
        self._subscriptions.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(sub)

    def on(self, kind: type[Any], callback: Callback) -> Callable[[], None]:
        """Call ``callback(event)`` (sync or async) for every event of class ``kind``; returns
        a function that removes it.

        Callbacks run in the client's read loop, one after another, and an async one is
        awaited there: keep them short (a callback that waits holds up reading, and the server
        closes a connection that falls behind, 4002); start a task for longer work."""
        entry = (kind, callback)
        self._callbacks.append(entry)

        def off() -> None:
            if entry in self._callbacks:
                self._callbacks.remove(entry)

        return off

    async def _dispatch(self, event: ClientEvent) -> None:
        for sub in self._subscriptions:
            sub.put(event)
        for kind, callback in list(self._callbacks):  # (one may remove itself)
            if isinstance(event, kind):
                try:
                    result = callback(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("party_sync client callback failed")

    # -- requests -------------------------------------------------------------------------------
    async def send_action(
        self,
        action_type: str,
        payload: dict[str, Any] | None = None,
        *,
        action_id: str | None = None,
        trace_id: str | None = None,
    ) -> ActionResult:
        """Act, and return the ``action.result``; raises ``ActionFailed`` if refused or failed.

        The ``action_id`` (a new UUID unless given) is kept across reconnects: the action is
        resent with it until answered, and the server forwards it to the engine once. Actions
        go out one at a time, in order (the server allows one in flight per character): one
        made while another is unanswered is sent once that one is answered. The same
        ``action_id`` again while it is pending joins that call.

        Cancelled (``asyncio.wait_for``, a task cancelled), the call stops resending the action
        and the next pending one goes out, once no other call that joined it still waits (a
        joined call goes on waiting for the answer when another is cancelled); an action
        already sent may still be applied: its character stays busy until its answer or
        ``action_timeout`` (an action meanwhile gets ``character_busy``), and its events reach
        the party as any action's.
        """
        # (None only: an empty id is refused below, as the JS client does, not replaced by a
        # new one, which made every resend of it a new action: clients probe)
        action_id = uuid.uuid4().hex if action_id is None else action_id
        trace_id = uuid.uuid4().hex if trace_id is None else trace_id
        # Refused here: the server's schema_violation could not say which action it is about, and
        # the action, and every one behind it, waited for ever (clients probe).
        if not ids.is_id(action_id):
            raise ValueError(f"action_id: {ids.ID_RULE}, got {action_id!r}")
        if not ids.is_trace_id(trace_id):
            raise ValueError(f"{ids.TRACE_ID_RULE}, got {trace_id!r}")
        await self._ready()
        if action_id in self._actions:
            self._action_callers[action_id] += 1
            return await self._await_action(action_id, self._actions[action_id])
        message = {
            "type": t.ACTION_REQUEST,
            "trace_id": trace_id,
            "payload": {
                "action_id": action_id,
                "character_id": self.state.you,
                "campaign_run_id": self.state.campaign_run_id,
                "action_type": action_type,
                "payload": payload or {},
            },
        }
        # One the server could never take (it closes the connection over 4x its limit, and
        # the resend after each reconnect would be closed again, for ever) is refused here.
        data = orjson.dumps(message)  # (encoded once: the size check's bytes are what is sent)
        size, limit = len(data), self.state.limits.get("max_message_bytes")
        if isinstance(limit, int) and size > limit:
            raise ValueError(
                f"the action is {size} bytes encoded; this server takes messages of at most "
                f"{limit} bytes (system.hello limits.max_message_bytes)"
            )
        future: asyncio.Future[ActionResult] = asyncio.get_running_loop().create_future()
        self._actions[action_id] = future
        self._action_callers[action_id] = 1
        try:
            if self.stream.add_action(message):
                await self._send(message, data)
        except BaseException:
            await self._release_action(action_id, future)
            raise
        return await self._await_action(action_id, future)

    async def _await_action(
        self, action_id: str, future: asyncio.Future[ActionResult]
    ) -> ActionResult:
        # Each call waits through a shield: one call cancelled does not cancel the action for
        # the others that joined it (clients probe); the last one gone stops resending it.
        try:
            return await asyncio.shield(future)
        finally:
            await self._release_action(action_id, future)

    async def _release_action(self, action_id: str, future: asyncio.Future[ActionResult]) -> None:
        self._action_callers[action_id] -= 1
        if self._action_callers[action_id] == 0:
            del self._action_callers[action_id]
            self._actions.pop(action_id, None)
            future.cancel()  # (nobody waits for it any more; a no-op once settled)
            # every caller cancelled: stop resending it, and the next pending action goes out
            for out in self.stream.drop_action(action_id):
                await self._carry_out(out)

    async def cast_vote(self, vote_id: str, option: str) -> VoteUpdated:
        """Vote (or change the ballot); returns the ``vote.update`` it caused.

        Raises ``VoteRefused`` (``vote_unknown``, ``vote_closed``, ``vote_bad_option``), and
        ``ValueError`` before sending for a ``vote_id`` or ``option`` that breaks the id rule.
        """
        for name, value in (("vote_id", vote_id), ("option", option)):
            if not ids.is_id(value):  # (a huge one was resent after every 1009, for ever)
                raise ValueError(f"{name}: {ids.ID_RULE}, got {value[:80]!r}")
        await self._ready()
        trace_id = uuid.uuid4().hex
        message = {
            "type": t.VOTE_CAST,
            "trace_id": trace_id,
            "payload": {"vote_id": vote_id, "option": option},
        }
        future: asyncio.Future[VoteUpdated] = asyncio.get_running_loop().create_future()
        self._votes[trace_id] = future
        try:
            if self.stream.add_vote(message):
                await self._send(message)
            return await future
        finally:
            self._votes.pop(trace_id, None)
            self.stream.votes.pop(trace_id, None)

    async def leave(self) -> bool:
        """Leave the party for good (the server then closes with 1000) and stop.

        Offline, it is sent once the client has reconnected (again on every new connection until
        the server's 1000). True once the server closed with 1000 after it: the character was
        removed from the roster. False when the client stopped for another reason first
        (``close()``, a refused handshake, ``max_attempts``): the character was not removed, and
        ``error`` says why unless it was ``close()`` (the same as the JS client's
        ``closedReason``)."""
        if self._stopped or self._closing:
            return self.left  # (False: it stopped first, and did not leave)
        await self._ready()
        message = {"type": t.PARTY_LEAVE, "payload": {"character_id": self.state.you}}
        if self.stream.set_leave(message):
            await self._send(message)
        await self.wait_closed()
        await self._transport.close()
        return self.left

    async def _ready(self) -> None:
        if self._stopped or self._closing:
            raise ClientClosed("the client has stopped")
        await self.connect()

    async def _send(self, message: dict[str, Any], data: bytes | None = None) -> None:
        conn = self._conn
        if conn is None:
            return  # still pending: sent again once reconnected
        with contextlib.suppress(TransportError):
            await conn.send((orjson.dumps(message) if data is None else data).decode())

    # -- the connection loop --------------------------------------------------------------------
    async def _run(self) -> None:
        error: BaseException | None = None
        try:
            await self._connect_loop()
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            error = exc
        finally:
            await self._stop(error)  # settles every waiter before its first await
            # stopped for good (refused, gave up, closed): its own HTTP session goes too, so a
            # client whose connect() raised leaves nothing open behind it
            with contextlib.suppress(Exception):
                await self._transport.close()

    async def _connect_loop(self) -> None:
        failures = 0  # consecutive attempts that did not reach a hello
        refresh = self._token is None
        rejected = False  # the token in use was fetched because the one before was refused
        later = False  # an operator's disconnect: wait long before the next attempt
        blocked: float | None = None  # an operator's block: seconds until it ends
        first = True
        while not self._closing:
            if not first:
                if self._max_attempts is not None and failures >= self._max_attempts:
                    raise ClientClosed(f"gave up after {failures} failed attempts")
                if blocked is not None:  # (its end, and a moment: not all at once)
                    delay: float | None = blocked + self._backoff.random()
                else:
                    delay = self._backoff.long_delay() if later else None
                await self._sleep(delay or self._backoff.delay(max(0, failures - 1)))
            first = later = False
            blocked = None
            if refresh:
                if self._provider is None:
                    raise ClientClosed("the token expired and there is no token_provider")
                try:
                    self._token = await _token_from(self._provider)
                except ClientClosed:
                    raise
                except Exception:
                    log.warning("party_sync client: token_provider failed", exc_info=True)
                    failures += 1
                    continue
                refresh = False
            assert self._token is not None
            point = self.stream.resume_point()
            params = {"epoch": point[0], "last_seq": str(point[1])} if point else {}
            try:
                conn = await self._transport.connect(self.url, token=self._token, params=params)
            except HandshakeRejected as exc:
                blocked = blocked_for(exc.status, exc.retry_after)
                if blocked is not None:  # not a failure: the server says when to come back
                    log.warning(
                        "party_sync client: %s: trying again in %.0f s", exc.reason, blocked
                    )
                    continue
                failures += 1
                step = after_handshake(exc.status)
                if step is Next.STOP or (
                    step is Next.REFRESH and (self._provider is None or rejected)
                ):  # a fresh token refused too: the provider's tokens are not the server's
                    raise ConnectRefused(exc.status, exc.reason) from None
                refresh = rejected = step is Next.REFRESH
                continue
            except TransportError as exc:
                failures += 1
                # Said as a WARNING on the 3rd failure in a row, then every 20th: a wrong URL or a
                # server that is down would otherwise retry in silence (new user's probe).
                last = self._max_attempts is not None and failures >= self._max_attempts
                loud = failures == WARN_AFTER_FAILURES or failures % 20 == 0 or last
                log.log(
                    logging.WARNING if loud else logging.INFO,
                    "party_sync client: cannot connect to %s (%s): %d attempts in a row, %s",
                    self.url.partition("?")[0],  # (a query might carry a token)
                    exc,
                    failures,
                    "giving up (max_attempts)" if last else "retrying",
                    extra={"error": str(exc)},
                )
                continue
            hello_seen, step = await self._serve(conn)
            failures = 0 if hello_seen else failures + 1
            rejected = rejected and not hello_seen
            if step is Next.STOP:
                return
            if step is Next.RESYNC:
                self.stream.resync()
            refresh = step is Next.REFRESH
            later = step is Next.LATER

    async def _serve(self, conn: Connection) -> tuple[bool, Next]:
        """Read one connection until it ends; returns (a hello came, what to do next)."""
        self._conn = conn
        self.stream.connection_lost()  # a new connection: nothing is valid until its hello
        hello_seen = False
        resync: str | None = None
        try:
            while resync is None and not self._closing:
                raw = await conn.receive()
                if raw is None:
                    break
                try:
                    message = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    log.warning("party_sync client: a frame that is not JSON")
                    continue
                if not isinstance(message, dict):
                    continue
                for out in self.stream.receive(message):
                    if isinstance(out, Emit) and isinstance(out.event, Connected):
                        hello_seen = True
                        if self._hello is not None and not self._hello.done():
                            self._hello.set_result(None)
                    if isinstance(out, Resync):
                        resync = out.reason
                        break
                    await self._carry_out(out)
        finally:
            self._conn = None
            self.stream.connection_lost()
        if resync is not None:
            log.info("party_sync client: resync", extra={"reason": resync})
            with contextlib.suppress(Exception):
                await conn.close(1000)
            self._told_reconnecting = True
            await self._dispatch(Disconnected(None, resync, True))
            return hello_seen, Next.RESYNC
        code = conn.close_code
        if self._closing and code in (None, ABNORMAL_CLOSURE):
            code = 1000  # our own close(): the socket may end before the server's echo is read
        self.close_code = code
        if not self._closing and self.stream.leave is not None and conn.close_code == 1000:
            self.left = True  # the server's answer to the leave: removed
        step = Next.STOP if self._closing else after_close(code)
        if step is Next.REFRESH and self._provider is None:
            step = Next.STOP  # nothing to refresh the token with
            self.error = ClientClosed("the token expired and there is no token_provider")
        if step is Next.STOP and not self._closing and self.stream.leave is None:
            self.error = self.error or ClientClosed(
                f"closed by the server with {conn.close_code}: {conn.close_reason}"
            )
        reconnecting = step is not Next.STOP
        self._told_reconnecting = reconnecting
        await self._dispatch(Disconnected(code, conn.close_reason, reconnecting))
        return hello_seen, step

    async def _carry_out(self, out: Output) -> None:
        if isinstance(out, Emit):
            await self._dispatch(out.event)
        elif isinstance(out, Send):
            await self._send(out.message)
        elif isinstance(out, ActionDone):
            _settle(self._actions.get(out.action_id), result=out.result)
        elif isinstance(out, ActionError):
            error = ActionFailed(out.action_id, out.error)
            _settle(self._actions.get(out.action_id), error=error)
        elif isinstance(out, VoteDone):
            _settle(self._votes.get(out.trace_id), result=out.update)
        elif isinstance(out, VoteError):
            _settle(self._votes.get(out.trace_id), error=VoteRefused(out.vote_id, out.error))

    async def _stop(self, error: BaseException | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        if error is not None and self.error is None:
            self.error = error
        reason = self.error or ClientClosed("the client stopped")
        for futures in (self._actions, self._votes):
            for future in futures.values():
                _settle(future, error=ClientClosed(f"stopped before an answer: {reason}"))
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(reason)
            self._hello.exception()  # retrieved: no "never retrieved" warning if nobody waits
        if self._told_reconnecting:
            # The app was last told "reconnecting" and the client stopped while it tried (a
            # handshake refused, max_attempts, close()): it is told the end too (clients probe:
            # it showed "reconnecting" for ever).
            self._told_reconnecting = False
            # No close code: what ended it was no WebSocket close (the last one, 4004 say, was
            # told already with "reconnecting"; clients probe: a 403 read as code 4004)
            with contextlib.suppress(Exception):
                await self._dispatch(Disconnected(None, str(reason), False))
        for sub in self._subscriptions:
            sub.put(None)


def _settle(
    future: asyncio.Future[Any] | None,
    *,
    result: Any = None,
    error: BaseException | None = None,
) -> None:
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
