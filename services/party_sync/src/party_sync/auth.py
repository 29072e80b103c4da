"""Connection tokens: JWT (RFC 7519) checked the way RFC 8725 asks.

The accepted algorithms come from configuration, never from the token; ``exp``, ``aud`` and the
binding claims are required; leeway is at most 30 s; a previous secret may be configured so that
tokens issued before a rotation stay valid until they expire. Tokens are never logged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt

from party_sync.protocol.errors import AuthError, ConfigError
from party_sync.protocol.types import PARTY_ACTOR

AUDIENCE: Final = "party_sync"
MAX_LEEWAY: Final = 30.0
REQUIRED_CLAIMS: Final = ("exp", "aud", "party_id", "campaign_run_id", "character_id")
_HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified token's claims: who the connection is and what it is bound to."""

    party_id: str
    campaign_run_id: str
    character_id: str
    display_name: str
    exp: float
    sub: str | None = None


class TokenVerifier:
    """Verifies connection tokens against the current and (optionally) the previous secret."""

    def __init__(
        self,
        secrets: Sequence[str],
        algorithms: Sequence[str] = ("HS256",),
        leeway: float = MAX_LEEWAY,
    ) -> None:
        keys = [s for s in secrets if s]
        if not keys:
            raise ConfigError("no JWT secret configured")
        if not algorithms or not set(algorithms) <= _HMAC_ALGORITHMS:
            # One key type per key: shared secrets only take HMAC algorithms (RFC 8725 §3.1).
            raise ConfigError(f"JWT algorithms must be among {sorted(_HMAC_ALGORITHMS)}")
        self._keys = keys
        self._algorithms = list(algorithms)
        self._leeway = min(leeway, MAX_LEEWAY)

    def verify(self, token: str) -> Claims:
        """Return the claims of a valid token; raise ``AuthError(401, reason)`` otherwise."""
        if not token:
            raise AuthError(401, "missing token")
        last_error: jwt.PyJWTError | None = None
        for key in self._keys:
            try:
                payload = jwt.decode(
                    token,
                    key,
                    algorithms=self._algorithms,
                    audience=AUDIENCE,
                    leeway=self._leeway,
                    options={"require": list(REQUIRED_CLAIMS)},
                )
            except jwt.InvalidSignatureError as exc:
                last_error = exc  # maybe signed with the other secret
                continue
            except jwt.ExpiredSignatureError:
                raise AuthError(401, "token expired") from None
            except jwt.InvalidAudienceError:
                raise AuthError(401, "token not addressed to party_sync") from None
            except jwt.MissingRequiredClaimError as exc:
                raise AuthError(401, f"token lacks the {exc.claim!r} claim") from None
            except jwt.PyJWTError:
                raise AuthError(401, "malformed token") from None
            return _claims(payload)
        raise AuthError(401, "bad token signature") from last_error


def _claims(payload: dict[str, Any]) -> Claims:
    ids = {}
    for name in ("party_id", "campaign_run_id", "character_id"):
        value = payload.get(name)
        if not isinstance(value, str) or not _ID.fullmatch(value):
            raise AuthError(401, f"token claim {name!r} is not a valid id")
        ids[name] = value
    if ids["character_id"] == PARTY_ACTOR:
        raise AuthError(401, f"character_id {PARTY_ACTOR!r} is reserved for party-level actions")
    raw_name = payload.get("display_name")
    name = (
        raw_name if isinstance(raw_name, str) and 1 <= len(raw_name) <= 64 else ids["character_id"]
    )
    sub = payload.get("sub")
    return Claims(
        party_id=ids["party_id"],
        campaign_run_id=ids["campaign_run_id"],
        character_id=ids["character_id"],
        display_name=name,
        exp=float(payload["exp"]),
        sub=str(sub) if sub is not None else None,
    )


def issue_token(
    secret: str,
    *,
    party_id: str,
    campaign_run_id: str,
    character_id: str,
    display_name: str,
    now: float,
    ttl: float = 3600.0,
    sub: str | None = None,
    algorithm: str = "HS256",
) -> str:
    """Mint a connection token (for ``party-sync token``, the demo, and tests)."""
    claims: dict[str, Any] = {
        "sub": sub or f"character:{character_id}",
        "party_id": party_id,
        "campaign_run_id": campaign_run_id,
        "character_id": character_id,
        "display_name": display_name,
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": int(now + ttl),
    }
    return jwt.encode(claims, secret, algorithm=algorithm)
