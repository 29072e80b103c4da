"""Connection tokens: JWT (RFC 7519) checked the way RFC 8725 asks.

The accepted algorithms come from configuration, never from the token; ``exp``, ``aud`` and the
binding claims are required; leeway is at most 30 s; a previous secret may be configured so that
tokens issued before a rotation stay valid until they expire. Tokens are never logged.

PyJWT checks the signature, the algorithm, ``aud`` and the presence of the required claims. The
time claims (``exp``, ``iat``, ``nbf``) are checked here, not by PyJWT, whose tolerance is not
ours (it takes ``"9999999999"`` and ``true``, and ``1e300`` or a 400-digit ``exp`` used to reach
a float conversion or a timer): each must be a JSON number (an integer, or a finite float; never
a string or a boolean) in ``0..MAX_TIMESTAMP`` (the end of year 9999), else the token is refused
with 401 like any other bad token. Ids follow the id rule (``protocol.ids``); the display name is
normalised by the name rule (``protocol.names``: a token is signed by the operator, so its name is
cleaned, not refused).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from party_sync.protocol.errors import AuthError, ConfigError
from party_sync.protocol.ids import is_id
from party_sync.protocol.names import clean_name, name_problem
from party_sync.protocol.types import PARTY_ACTOR

AUDIENCE: Final = "party_sync"
MAX_LEEWAY: Final = 30.0
REQUIRED_CLAIMS: Final = ("exp", "aud", "party_id", "campaign_run_id", "character_id")
#: Largest NumericDate accepted: 9999-12-31T23:59:59Z (exact as a float, fine for any timer).
MAX_TIMESTAMP: Final = 253_402_300_799
_TIME_CLAIMS: Final = ("exp", "iat", "nbf")
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
#: PyJWT's own time checks are off: ``check_times`` does them (see the module docstring).
_DECODE_OPTIONS: Final = {
    "require": list(REQUIRED_CLAIMS),
    "verify_exp": False,
    "verify_iat": False,
    "verify_nbf": False,
}

#: The shortest HMAC secret not warned about (RFC 7518 §3.2: at least the hash size, 32 bytes
#: for HS256); a shorter one can be guessed offline from any token.
MIN_JWT_SECRET_BYTES = 32
#: The hash size of each HMAC algorithm, the shortest secret RFC 7518 §3.2 allows it.
_HASH_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}


def min_secret_bytes(algorithms: Iterable[str]) -> int:
    """The shortest secret not warned about for tokens of ``algorithms`` (one secret signs and
    checks every one of them: the longest hash counts)."""
    return max((_HASH_BYTES.get(name, 0) for name in algorithms), default=0) or (
        MIN_JWT_SECRET_BYTES
    )


#: Why a token's times cannot be judged yet (``TokenVerifier``: answered 503, Retry-After).
CLOCK_UNKNOWN: Final = (
    "the token's times cannot be judged yet: this node has not read Redis's clock (Redis has "
    "not answered since it started); try again"
)


def wall_clock() -> float:
    """Unix time now (the default clock of ``TokenVerifier``; tests replace it)."""
    return time.time()


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified token's claims: who the connection is and what it is bound to."""

    party_id: str
    campaign_run_id: str
    character_id: str
    display_name: str
    exp: float
    sub: str | None = None
    #: Seconds past ``exp`` a connection opened with the token lives: 0 for a token valid when
    #: it was verified; the leeway for one taken within it (already past ``exp``).
    grace: float = 0.0

    @property
    def ends_at(self) -> float:
        """When a connection opened with the token ends (``token_expired``, 4001): at ``exp``,
        or, for a token taken within the leeway, at the end of the leeway, the last instant a
        handshake would still take it: never the moment it opens (a client whose clock says
        "valid" would reconnect with it, and be closed again, in a loop)."""
        return self.exp + self.grace


class TokenVerifier:
    """Verifies connection tokens against the current and (optionally) the previous secret."""

    def __init__(
        self,
        secrets: Sequence[str],
        algorithms: Sequence[str] = ("HS256",),
        leeway: float = MAX_LEEWAY,
        clock: Callable[[], float] | None = None,
        clock_known: Callable[[], bool] | None = None,
    ) -> None:
        keys = [s for s in secrets if s]
        if not keys:
            raise ConfigError("no JWT secret configured")
        if not algorithms or not set(algorithms) <= HMAC_ALGORITHMS:
            # One key type per key: shared secrets only take HMAC algorithms (RFC 8725 §3.1).
            raise ConfigError(f"JWT algorithms must be among {sorted(HMAC_ALGORITHMS)}")
        self._keys = keys
        self._algorithms = list(algorithms)
        self._leeway = min(leeway, MAX_LEEWAY)
        self._clock = clock
        #: False while ``clock`` is not the deployment's yet (``Backend.clock_known``): a token
        #: that fails its time checks then is judged later, never refused for good (401)
        self._clock_known = clock_known

    def verify(self, token: str) -> Claims:
        """Return the claims of a valid token; raise ``AuthError(401, reason)`` otherwise."""
        if not token:
            raise AuthError(401, "missing token")
        last_error: jwt.PyJWTError | None = None
        for key in self._keys:
            try:
                # PyJWT warns of a short key through ``warnings``, which would print a plain-text
                # line into the JSON log at the first token: party_sync warns at start instead
                # (server.weak_secrets, by the configured algorithms' hash sizes)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                    payload = jwt.decode(
                        token,
                        key,
                        algorithms=self._algorithms,
                        audience=AUDIENCE,
                        options=_DECODE_OPTIONS,  # type: ignore[arg-type]
                    )
            except jwt.InvalidSignatureError as exc:
                last_error = exc  # maybe signed with the other secret
                continue
            except jwt.InvalidAudienceError:
                raise AuthError(401, "token not addressed to party_sync") from None
            except jwt.MissingRequiredClaimError as exc:
                raise AuthError(401, f"token lacks the {exc.claim!r} claim") from None
            except jwt.InvalidAlgorithmError:
                # well formed, but its header names an algorithm not configured (or "none")
                raise AuthError(401, "token algorithm not allowed") from None
            except (jwt.PyJWTError, ValueError, TypeError, OverflowError, RecursionError):
                # Whatever a hostile token makes the decoder raise is a bad token, never a 500.
                raise AuthError(401, "malformed token") from None
            now = (self._clock or wall_clock)()
            try:
                exp = check_times(payload, now, self._leeway)
            except AuthError as exc:
                if self._clock_known is None or self._clock_known():
                    raise
                # Redis has not answered since this node started: its clock is only this
                # machine's, which may be off (clock probe: a node 2 min behind refused fresh
                # tokens for good): try again (503) once Redis's clock is read
                raise AuthError(503, CLOCK_UNKNOWN) from exc
            return _claims(payload, exp, self._leeway if exp <= now else 0.0)
        raise AuthError(401, "bad token signature") from last_error


def numeric_date(payload: dict[str, Any], name: str) -> float | None:
    """The claim ``name`` as Unix seconds (None if absent); ``AuthError(401)`` unless it is a
    JSON number (int, or finite float; not a bool or a string) in ``0..MAX_TIMESTAMP``."""
    if name not in payload:
        return None
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(401, f"token claim {name!r} is not a number")
    # Compared before any conversion: a 400-digit int never reaches float().
    if not 0 <= value <= MAX_TIMESTAMP:  # also false for NaN and infinities
        raise AuthError(401, f"token claim {name!r} is out of range")
    return float(value)


def check_times(payload: dict[str, Any], now: float, leeway: float) -> float:
    """Check ``exp``, ``iat`` and ``nbf`` at ``now`` (RFC 7519 §4.1.4-6, with ``leeway``);
    return ``exp``. Raises ``AuthError(401)``: ``token expired``, ``token not yet valid``, or a
    reason naming the malformed claim."""
    exp, iat, nbf = (numeric_date(payload, name) for name in _TIME_CLAIMS)
    if exp is None:
        raise AuthError(401, "token lacks the 'exp' claim")
    if exp <= now - leeway:
        raise AuthError(401, "token expired")
    if (iat is not None and iat > now + leeway) or (nbf is not None and nbf > now + leeway):
        raise AuthError(401, "token not yet valid")
    return exp


def _claims(payload: dict[str, Any], exp: float, grace: float) -> Claims:
    ids = {}
    for name in ("party_id", "campaign_run_id", "character_id"):
        value = payload.get(name)
        if not is_id(value):
            raise AuthError(401, f"token claim {name!r} is not a valid id")
        ids[name] = value
    if ids["character_id"] == PARTY_ACTOR:
        raise AuthError(401, f"character_id {PARTY_ACTOR!r} is reserved for party-level actions")
    sub = payload.get("sub")
    if sub is not None and not isinstance(sub, str):
        raise AuthError(401, "token claim 'sub' is not a string")
    return Claims(
        party_id=ids["party_id"],
        campaign_run_id=ids["campaign_run_id"],
        character_id=ids["character_id"],
        # Signed by the operator: normalised, not refused (protocol/names.py).
        display_name=clean_name(payload.get("display_name"), ids["character_id"]),
        exp=exp,
        sub=sub,
        grace=grace,
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
    issued_at: bool = True,
) -> str:
    """Mint a connection token (for ``party-sync token``, the demo, and tests); ``issued_at``
    False: no ``iat`` (a token minted on a clock that may be ahead of the deployment's).

    The issuing side of the id and name rules: raises ``ValueError`` for an id that breaks the id
    rule, the reserved character id, or a display name that breaks the name rule."""
    for label, value in (
        ("party_id", party_id),
        ("campaign_run_id", campaign_run_id),
        ("character_id", character_id),
    ):
        if not is_id(value):
            raise ValueError(f"{label} must match [A-Za-z0-9._:-]{{1,64}}")
    if character_id == PARTY_ACTOR:
        raise ValueError(f"character_id {PARTY_ACTOR!r} is reserved for party-level actions")
    problem = name_problem(display_name)
    if problem is not None:
        raise ValueError(problem)
    claims: dict[str, Any] = {
        # one player per character of a party: the same character id in another party is
        # another player (the per-user limits and the 1008 cooldown count by sub)
        "sub": sub or f"character:{party_id}/{character_id}",
        "party_id": party_id,
        "campaign_run_id": campaign_run_id,
        "character_id": character_id,
        "display_name": display_name,
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": int(now + ttl),
    }
    if not issued_at:
        del claims["iat"]
    with warnings.catch_warnings():  # a short key: warned about at start, not per token
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm=algorithm)
