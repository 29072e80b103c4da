"""The operators' view of the embedded backend (``AdminView``): one process, so one node.

It reads the parties of its ``MemoryBackend`` directly (the backend hands it its table of
``MemoryParty``; it changes nothing): the projection (as ``snapshot``), the
presence of each connection, and the locks of the action ledger (an accepted action holds its
character's lock until its final answer or its deadline, in both backends). A close request is
handed to the callbacks at once: every connection is on this node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from party_sync.backends.base import (
    ActionInFlight,
    CloseRequest,
    HeldEvents,
    LiveConnection,
    NodeInfo,
    PartyDetail,
    PartySummary,
    node_of,
)
from party_sync.backends.memory_party import MemoryParty


class _Watch:
    def __init__(self, detach: Callable[[], None]) -> None:
        self._detach: Callable[[], None] | None = detach

    async def close(self) -> None:
        if self._detach is not None:
            self._detach()
            self._detach = None


def _actions(party: MemoryParty, now: float) -> list[ActionInFlight]:
    locks = party.ledger._locks  # character_id → (action_id, until, action_type)
    return sorted(
        (
            ActionInFlight(character, action_id, until)
            for character, (action_id, until, _) in locks.items()
            if until > now
        ),
        key=lambda a: (a.deadline, a.character_id),
    )


class MemoryAdmin:
    """``AdminView`` over the parties of one ``MemoryBackend`` (``parties``: its live table)."""

    def __init__(self, parties: Mapping[str, MemoryParty]) -> None:
        self._parties = parties
        self._nodes: dict[str, tuple[NodeInfo, float]] = {}  # node_id → (info, expires at)
        self._blocks: dict[tuple[str, str], float] = {}
        self._watchers: list[CloseRequest] = []

    async def parties(self, after: str | None, limit: int, now: float) -> list[PartySummary]:
        parties = self._parties
        ids = sorted(p for p in parties if after is None or p > after)[:limit]
        out: list[PartySummary] = []
        for party_id in ids:
            party = parties[party_id]
            snapshot = party.snapshot(now)
            out.append(
                PartySummary(
                    party_id=party_id,
                    campaign_run_id=party.run_id,
                    epoch=snapshot.epoch,
                    seq=snapshot.seq,
                    members_total=len(snapshot.members),
                    members_online=sum(1 for m in snapshot.members if m["online"]),
                    vote=snapshot.vote,
                    actions_in_flight=len(_actions(party, now)),
                )
            )
        return out

    async def party(self, party_id: str, now: float) -> PartyDetail | None:
        party = self._parties.get(party_id)
        if party is None:
            return None
        snapshot = party.snapshot(now)
        connections = [
            LiveConnection(character, connection, node_of(connection), expires)
            for character, conns in sorted(party.presence._connections.items())
            for connection, expires in sorted(conns.items())
            if expires > now
        ]
        return PartyDetail(party.run_id, snapshot, connections, _actions(party, now))

    async def events(self, party_id: str, after_seq: int, limit: int) -> HeldEvents | None:
        party = self._parties.get(party_id)
        if party is None:
            return None
        log = party.log
        return HeldEvents(log.epoch, log.top_seq, log.oldest_seq, log.after(after_seq)[:limit])

    async def heartbeat(self, node: NodeInfo, parties: Sequence[str], ttl: float) -> None:
        self._nodes[node.node_id] = (node, node.seen_at + ttl)

    async def forget_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    async def nodes(self, now: float) -> list[NodeInfo]:
        return [info for _, (info, until) in sorted(self._nodes.items()) if until > now]

    async def block(self, party_id: str, character_id: str, until: float, now: float) -> None:
        self._blocks = {k: v for k, v in self._blocks.items() if v > now}  # forget old ones
        self._blocks.pop((party_id, character_id), None)  # a time already past lifts it
        if until > now:
            self._blocks[(party_id, character_id)] = until

    async def blocked_until(self, party_id: str, character_id: str, now: float) -> float | None:
        until = self._blocks.get((party_id, character_id))
        return until if until is not None and until > now else None

    async def request_close(self, party_id: str, character_id: str, code: int, reason: str) -> None:
        for callback in list(self._watchers):
            callback(party_id, character_id, code, reason)

    async def watch_closes(self, callback: CloseRequest) -> _Watch:
        self._watchers.append(callback)

        def detach() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return _Watch(detach)
