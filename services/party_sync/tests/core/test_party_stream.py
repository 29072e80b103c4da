"""``PartyStream``'s catch-up (backends/redis_stream.py) against a history that cannot lead to the
live message waiting first in line: it must end, not read history again and again at full speed.

Memory probe (Redis at ``maxmemory`` with ``allkeys-lru``): eviction left a node's stream with a
live message that history could not lead to, and its catch-up read history about 2,500 times a
second for minutes after memory was back; the party's new connections on that node never got
their hello."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from party_sync.backends.redis_stream import PartyStream, RangeReply, Sequenced
from party_sync.core.events import Event
from party_sync.core.limits import RateGate
from ps_testkit.listeners import Recorder


class History:
    """A party's history that has ``epoch`` up to ``top`` and nothing after it (a fake source)."""

    def __init__(self, epoch: str, top: int) -> None:
        self.epoch, self.top = epoch, top
        self.reads = 0

    async def range(self, party_id: str, epoch: str, after: int) -> RangeReply:
        self.reads += 1
        await asyncio.sleep(0)
        if epoch != self.epoch or after > self.top:
            return self.epoch, self.top, None
        return self.epoch, self.top, [event(n).data for n in range(after + 1, self.top + 1)]

    async def head(self, party_id: str) -> tuple[str, int]:
        return self.epoch, self.top


def event(seq: int) -> Event:
    data = b'{"type":"scene.update","seq":%d,"payload":{},"trace_id":"t%d"}' % (seq, seq)
    return Event("p1", seq, "scene.update", {}, f"t{seq}", data)


def stream_at(
    history: History,
    epoch: str,
    last: int,
    *,
    party_id: str = "p1",
    foreign_log: RateGate | None = None,
    monotonic: Callable[[], float] | None = None,
) -> tuple[PartyStream, Recorder]:
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    stream = PartyStream(
        party_id,
        history,
        count_gap=lambda outcome: None,
        max_pending=1000,
        spawn=spawn,
        foreign_log=RateGate(60.0) if foreign_log is None else foreign_log,
        **({} if monotonic is None else {"monotonic": monotonic}),
    )
    stream.epoch, stream.last, stream.ready = epoch, last, True
    listener = Recorder()
    stream.listeners.append(listener)
    return stream, listener


async def caught_up(stream: PartyStream) -> None:
    """The catch-up ends (within a bound far above its pauses) and the stream is live."""
    task = stream._task
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), 10)
    assert stream.ready


async def test_a_live_message_of_an_epoch_history_no_longer_has_is_dropped() -> None:
    history = History("ep-now", 5)
    stream, listener = stream_at(history, "ep-now", 5)
    stream.pending.append(Sequenced("ep-lost", event(9)))  # of an epoch Redis lost
    stream.catch_up_soon()
    await caught_up(stream)
    assert history.reads <= 4  # a few looks, then given up: not thousands
    assert listener.seqs == [] and listener.resyncs == 0
    stream._live(Sequenced("ep-now", event(6)))  # the next event is delivered as usual
    assert listener.seqs == [6]
    stream.close()


async def test_a_gap_history_cannot_fill_resyncs_the_clients_and_goes_on() -> None:
    history = History("ep-now", 5)  # history lost 6..8 (eviction), the live stream has 9
    stream, listener = stream_at(history, "ep-now", 5)
    stream.pending.append(Sequenced("ep-now", event(9)))
    stream.catch_up_soon()
    await caught_up(stream)
    assert history.reads <= 4
    assert listener.resyncs == 1 and listener.seqs == [9]
    stream.close()


async def test_live_events_behind_a_lost_epochs_are_delivered_or_dropped_not_a_resync() -> None:
    """Cluster probe: a master resumed after its replica took over ran the script calls queued
    for it and published their events, of its lost epoch; a node, at 100 in the new epoch,
    repaired from history to 102 meanwhile, and the live 101 and 102 that had come behind the
    lost epoch's event were taken for a gap history could not fill: the party's clients were
    told to resync (4003), with nothing lost. The lost epoch's event is dropped, those already
    delivered are dropped, and the next one is delivered."""
    history = History("ep-now", 102)
    stream, listener = stream_at(history, "ep-now", 100)
    stream._live(Sequenced("ep-lost", event(93)))  # the resumed master's, queued during its stall
    stream._live(Sequenced("ep-now", event(101)))  # live, behind it
    stream._live(Sequenced("ep-now", event(102)))
    stream._live(Sequenced("ep-now", event(103)))  # (published after history was read)
    history.top = 103
    await caught_up(stream)
    assert listener.resyncs == 0
    assert listener.seqs == [101, 102, 103]
    stream.close()


async def test_a_gap_history_fills_is_repaired_at_once_without_a_pause() -> None:
    history = History("ep-now", 9)
    stream, listener = stream_at(history, "ep-now", 5)
    stream.pending.append(Sequenced("ep-now", event(9)))
    stream.catch_up_soon()
    await caught_up(stream)
    assert history.reads == 1 and listener.seqs == [6, 7, 8, 9] and listener.resyncs == 0
    stream.close()


async def test_another_deployments_events_on_the_channel_are_dropped_after_one_look(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two deployments on one Redis server (databases 0 and 2, the same party id): each one's
    events reach the other's nodes on ``party:p1``. Each such event held this party's own events
    back while history was read for it (new user probe). The first one's epoch is found not to be
    this Redis's; its later events are dropped at once, and the operator is told, once."""
    history = History("ep-ours", 5)
    stream, listener = stream_at(history, "ep-ours", 5)
    with caplog.at_level(logging.WARNING, logger="party_sync.backends.redis_stream"):
        stream._live(Sequenced("ep-theirs", event(1)))
        await caught_up(stream)
        reads = history.reads
        for seq in (2, 3, 4):
            stream._live(Sequenced("ep-theirs", event(seq)))
        assert stream.ready and history.reads == reads  # no look at history for them
        stream._live(Sequenced("ep-ours", event(6)))  # its own events go on at once
    assert listener.seqs == [6] and listener.resyncs == 0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "whatever their database numbers" in said[0]
    stream.close()


async def test_the_foreign_epoch_warning_is_the_nodes_once_a_minute_for_all_its_parties(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The WARNING about another deployment's events is rate-limited per node (the gate the node
    gives each of its streams), on the clock it is given: a second party's foreign epoch within
    the minute is counted, not logged; after the minute the next one is logged with the count."""
    now = [1000.0]
    gate = RateGate(60.0)
    first, _ = stream_at(
        History("ep-ours", 5), "ep-ours", 5, foreign_log=gate, monotonic=lambda: now[0]
    )
    second, _ = stream_at(
        History("ep-ours", 5),
        "ep-ours",
        5,
        party_id="p2",
        foreign_log=gate,
        monotonic=lambda: now[0],
    )
    with caplog.at_level(logging.WARNING, logger="party_sync.backends.redis_stream"):
        first._live(Sequenced("ep-a", event(1)))
        await caught_up(first)
        now[0] += 30.0
        second._live(Sequenced("ep-b", event(1)))
        await caught_up(second)
        assert len(caplog.records) == 1
        now[0] += 31.0
        second._live(Sequenced("ep-c", event(1)))
        await caught_up(second)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "party:p1" in said[0] and "party:p2" in said[1]
    assert "2 such epoch(s)" in said[1]
    first.close()
    second.close()
