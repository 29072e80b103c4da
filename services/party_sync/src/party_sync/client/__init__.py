"""``party_sync.client``: an asyncio client of the party_sync protocol, for bots, load
generators and tests (the browser library in ``clients/js`` has the same behaviours).

    from party_sync.client import ActionResult, PartyClient, SceneChanged

    async with PartyClient("ws://127.0.0.1:8080/ws", token=token) as client:
        events = client.events()
        result = await client.send_action("choice", {"option": "search-walls"})
        print(result.outcome, client.state.scene_number, client.state.online)
        async for event in events:
            if isinstance(event, SceneChanged):
                print(event.title)

``client.state`` also has the party's actions in flight (``actions_in_flight``: "Aria attacks —
the game master is deciding…") and its live narration streams (``narration``: each stream's text
so far, last index, ``done``); ``ActionAccepted``, ``ActionFailedNotice`` and ``NarrationDelta``
report each change (``client.on(NarrationDelta, print_piece)`` or ``client.events()``). A
narration piece is reported once; every ``system.hello`` (after a reconnect too) restates both.

It reconnects by itself (exponential backoff with full jitter), resumes from its last
``epoch``/``seq``, resyncs after a gap, refreshes its token through ``token_provider`` on close
code 4001 or a 401 handshake (once: a fresh token refused too stops it), and resends pending
actions with their same ``action_id``. After an operator's disconnect (4004) it waits half to all
of the backoff's cap before resuming. It stops for good after close 1000 (left) or 1008 (policy).
Its WebSocket pings (``AiohttpTransport(heartbeat=20.0)``) find a link gone silent (no FIN, no
RST: a network change) within 1.5 × ``heartbeat``; it then reconnects and resumes.
"""

from party_sync.client.client import PartyClient, TokenProvider
from party_sync.client.events import (
    ActionAccepted,
    ActionFailed,
    ActionFailedNotice,
    ActionResult,
    ClientClosed,
    ClientError,
    ClientEvent,
    CombatChanged,
    Connected,
    ConnectRefused,
    Disconnected,
    MemberJoined,
    MemberLeft,
    NarrationDelta,
    PartyEvent,
    PartyStateChanged,
    SceneChanged,
    ServerError,
    VoteFinished,
    VoteRefused,
    VoteStarted,
    VoteUpdated,
)
from party_sync.client.policy import Backoff
from party_sync.client.state import ActionInFlight, Member, NarrationStream, PartyState
from party_sync.client.subscription import Subscription
from party_sync.client.transport import AiohttpTransport, Connection, Transport

__all__ = [
    "ActionAccepted",
    "ActionFailed",
    "ActionFailedNotice",
    "ActionInFlight",
    "ActionResult",
    "AiohttpTransport",
    "Backoff",
    "ClientClosed",
    "ClientError",
    "ClientEvent",
    "CombatChanged",
    "ConnectRefused",
    "Connected",
    "Connection",
    "Disconnected",
    "Member",
    "MemberJoined",
    "MemberLeft",
    "NarrationDelta",
    "NarrationStream",
    "PartyClient",
    "PartyEvent",
    "PartyState",
    "PartyStateChanged",
    "SceneChanged",
    "ServerError",
    "Subscription",
    "TokenProvider",
    "Transport",
    "VoteFinished",
    "VoteRefused",
    "VoteStarted",
    "VoteUpdated",
]
