"""The membership directory: which Telegram user may play which character in which party.

A Telegram Mini App's ``initData`` proves who the user is, not what they may play. The engine or
gateway_api registers that binding through the server API
(``PUT /api/v1/parties/{party_id}/members/{character_id}``), and Telegram sign-in
(``transport/telegram.py``) issues a token only for a registered (party, character, user).

``Directory`` is the interface; ``MemoryDirectory`` (one process, the embedded default) and
``RedisDirectory`` (shared by every node; one hash per party, no TTL) implement it. The server
picks the Redis one when ``redis_url`` is set (``make_directory``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from redis.exceptions import RedisError

from party_sync.backends.keys import DEFAULT_PREFIX, KeySpace
from party_sync.backends.redis_connect import RedisTarget, as_target, make_any_client
from party_sync.protocol.errors import BackendUnavailable, PartySyncError
from party_sync.protocol.ids import is_id
from party_sync.protocol.types import PARTY_ACTOR

MAX_TELEGRAM_ID: Final = 2**63 - 1


class InvalidMembership(PartySyncError, ValueError):
    """A registration that breaks the rules (the API answers 422 with the message)."""


@dataclass(frozen=True, slots=True)
class Membership:
    """One registered binding: ``telegram_user_id`` may play ``character_id`` in ``party_id``."""

    party_id: str
    character_id: str
    telegram_user_id: int
    display_name: str
    campaign_run_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "party_id": self.party_id,
            "character_id": self.character_id,
            "telegram_user_id": self.telegram_user_id,
            "display_name": self.display_name,
            "campaign_run_id": self.campaign_run_id,
        }


def check_ids(party_id: str, character_id: str) -> None:
    for name, value in (("party_id", party_id), ("character_id", character_id)):
        if not is_id(value):
            raise InvalidMembership(f"{name} must match [A-Za-z0-9._:-]{{1,64}}")
    if character_id == PARTY_ACTOR:
        raise InvalidMembership(f"character_id {PARTY_ACTOR!r} is reserved")


def parse_membership(party_id: str, character_id: str, body: Any) -> Membership:
    """Validate a registration body ``{telegram_user_id, display_name, campaign_run_id}``."""
    check_ids(party_id, character_id)
    if not isinstance(body, dict):
        raise InvalidMembership("body must be an object")
    unknown = set(body) - {"telegram_user_id", "display_name", "campaign_run_id"}
    if unknown:
        raise InvalidMembership(f"unknown fields: {sorted(unknown)}")
    user = body.get("telegram_user_id")
    if isinstance(user, float) and user.is_integer():
        user = int(user)  # JSON Schema's integer, as /openapi.json says (8776.0 is 8776)
    if not isinstance(user, int) or isinstance(user, bool) or not 0 < user <= MAX_TELEGRAM_ID:
        raise InvalidMembership("telegram_user_id must be a positive integer")
    name = body.get("display_name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise InvalidMembership("display_name must be a string of 1-64 characters")
    run = body.get("campaign_run_id")
    if not is_id(run):
        raise InvalidMembership("campaign_run_id must match [A-Za-z0-9._:-]{1,64}")
    return Membership(party_id, character_id, user, name, run)


class Directory(Protocol):
    """Storage of memberships. Redis failures raise ``BackendUnavailable`` (retryable)."""

    async def put(self, membership: Membership) -> None:
        """Register or replace the membership of (party_id, character_id)."""
        ...

    async def get(self, party_id: str, character_id: str) -> Membership | None: ...

    async def delete(self, party_id: str, character_id: str) -> bool:
        """Remove it; False if there was none."""
        ...

    async def list(self, party_id: str) -> list[Membership]:
        """Every membership of the party, by character_id."""
        ...

    async def close(self) -> None: ...


class MemoryDirectory:
    """The embedded directory: a dict, for one process (and tests)."""

    def __init__(self) -> None:
        self._parties: dict[str, dict[str, Membership]] = {}

    async def put(self, membership: Membership) -> None:
        self._parties.setdefault(membership.party_id, {})[membership.character_id] = membership

    async def get(self, party_id: str, character_id: str) -> Membership | None:
        return self._parties.get(party_id, {}).get(character_id)

    async def delete(self, party_id: str, character_id: str) -> bool:
        party = self._parties.get(party_id, {})
        found = party.pop(character_id, None) is not None
        if not party:
            self._parties.pop(party_id, None)
        return found

    async def list(self, party_id: str) -> list[Membership]:
        party = self._parties.get(party_id, {})
        return [party[c] for c in sorted(party)]

    async def close(self) -> None:
        return None


class RedisDirectory:
    """Memberships in Redis: one hash per party, ``character_id`` → JSON, no TTL (``keys.py``)."""

    def __init__(
        self,
        url: str | RedisTarget,
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout: float = 2.0,
        max_connections: int | None = None,
        client_name: str | None = None,
    ) -> None:
        self._keys = KeySpace(prefix)
        self._client = make_any_client(
            as_target(url, prefix),
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            max_connections=max_connections,
            client_name=client_name,
        )

    async def put(self, membership: Membership) -> None:
        value = orjson.dumps(
            {
                "telegram_user_id": membership.telegram_user_id,
                "display_name": membership.display_name,
                "campaign_run_id": membership.campaign_run_id,
            }
        )
        key = self._keys.directory(membership.party_id)
        try:
            await self._client.hset(key, membership.character_id, value)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis unreachable") from exc

    async def get(self, party_id: str, character_id: str) -> Membership | None:
        try:
            raw = await self._client.hget(self._keys.directory(party_id), character_id)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis unreachable") from exc
        return None if raw is None else _decode(party_id, character_id, raw)

    async def delete(self, party_id: str, character_id: str) -> bool:
        try:
            removed = await self._client.hdel(self._keys.directory(party_id), character_id)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis unreachable") from exc
        return bool(removed)

    async def list(self, party_id: str) -> list[Membership]:
        try:
            raw = await self._client.hgetall(self._keys.directory(party_id))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis unreachable") from exc
        members = [_decode(party_id, _text(field), value) for field, value in raw.items()]
        return sorted(members, key=lambda m: m.character_id)

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(party_id: str, character_id: str, raw: bytes | str) -> Membership:
    data = orjson.loads(raw)
    return Membership(
        party_id,
        character_id,
        int(data["telegram_user_id"]),
        str(data["display_name"]),
        str(data["campaign_run_id"]),
    )


def make_directory(
    redis_url: str | RedisTarget | None,
    prefix: str = DEFAULT_PREFIX,
    *,
    max_connections: int | None = None,
    client_name: str | None = None,
) -> Directory:
    """``RedisDirectory`` when a Redis URL is configured, else ``MemoryDirectory``."""
    if redis_url:
        return RedisDirectory(
            redis_url, prefix, max_connections=max_connections, client_name=client_name
        )
    return MemoryDirectory()
