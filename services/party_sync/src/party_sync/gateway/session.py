"""One client connection with its transport's sink; carrying out the core's local commands."""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from typing import Protocol, cast

from party_sync.core.binding import Binding
from party_sync.core.commands import Close, Command, Refused, Send
from party_sync.core.connection import Connection
from party_sync.core.limits import ConnectionLimits
from party_sync.protocol.errors import CloseCode, ErrorCode

#: The refusals of the client message handled in this context (set while its tracing span is
#: open; None otherwise).
REFUSALS: ContextVar[list[ErrorCode] | None] = ContextVar("refusals", default=None)


class Sink(Protocol):
    """The transport's side of a connection."""

    def send(self, data: bytes) -> bool:
        """Queue one text frame without waiting; False if the send queue is full (or the
        client is gone: ``lost``)."""
        ...

    @property
    def lost(self) -> bool:
        """The client went away: its transport is closing or closed, and nothing reaches it."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Close the connection (soon, without waiting)."""
        ...


class Session(Connection):
    """A ``core.connection.Connection`` and the sink its frames go to.

    ``closed`` (the core's) says the connection was told to close; ``_gone`` says the sink was
    closed, so that a frame the core decided before its close (an error, then a 1008) still
    leaves first and nothing leaves after.
    """

    __slots__ = ("_gone", "_sink")

    def __init__(
        self,
        session_id: str,
        binding: Binding,
        sink: Sink,
        limits: ConnectionLimits,
        expires_at: float,
    ) -> None:
        super().__init__(session_id, binding, limits, expires_at)
        self._sink = sink
        self._gone = False

    @property
    def sink(self) -> Sink:
        """The transport's side of this connection."""
        return self._sink

    def send(self, data: bytes) -> bool:
        if self._gone:
            return False
        if not self._sink.send(data):
            if self._sink.lost:
                # the client went away (a reset, a close under way): no close to send, and no
                # slow consumer (every reset peer was counted a 4002 close: churn probe); the
                # handler's loop ends with the transport and tells the gateway
                self.closed = self._gone = True
                return False
            # a slow consumer: its queue is full; it resumes from where it got to
            self.close(CloseCode.SLOW_CONSUMER, "send queue full: reconnect and resume")
            return False
        return True

    def close(self, code: int, reason: str) -> None:
        """Close the socket (once)."""
        self.closed = True
        if not self._gone:
            self._gone = True
            self._sink.close(code, reason)


def carry_local(commands: Iterable[Command]) -> list[Command]:
    """Carry out the frames and closes among ``commands`` (on ``Session``s); return the rest,
    in order, for the executor."""
    rest: list[Command] = []
    for command in commands:
        if type(command) is Send:
            data = command.data
            for session in cast("list[Session]", command.to):
                session.send(data)
        elif type(command) is Close:
            cast(Session, command.conn).close(command.code, command.reason)
        elif type(command) is Refused:
            refusals = REFUSALS.get()
            if refusals is not None:
                refusals.append(command.code)
        else:
            rest.append(command)
    return rest
