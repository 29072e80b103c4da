"""An async iterator over a ``PartyClient``'s events (``PartyClient.events()``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from party_sync.client.events import ClientClosed, ClientEvent

E = TypeVar("E")


class Subscription:
    """An async iterator over the client's events from the moment it was made until it stops."""

    def __init__(self, on_close: Callable[[Subscription], None]) -> None:
        self._on_close = on_close
        self._queue: asyncio.Queue[ClientEvent | None] = asyncio.Queue()

    def put(self, event: ClientEvent | None) -> None:
        self._queue.put_nowait(event)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ClientEvent:
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # stay ended for later calls
            raise StopAsyncIteration
        return event

    async def next_of(self, kind: type[E]) -> E:
        """Skip events until one of class ``kind``; ``ClientClosed`` if the client stops first."""
        async for event in self:
            if isinstance(event, kind):
                return event
        raise ClientClosed("the client stopped")

    def close(self) -> None:
        """Stop receiving (events already queued are dropped with it)."""
        self._on_close(self)
