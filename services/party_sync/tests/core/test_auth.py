"""TokenVerifier / issue_token: RFC 8725-style checks of connection tokens.

``TokenVerifier.verify`` takes no ``now``: it reads ``party_sync.auth.wall_clock`` (the time claims
are checked by party_sync, not PyJWT). The autouse fixture freezes that clock at ``NOW`` (in 2020,
so a token that verifies at all proves the freeze took effect).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync import auth
from party_sync.auth import (
    AUDIENCE,
    MAX_LEEWAY,
    MAX_TIMESTAMP,
    Claims,
    TokenVerifier,
    issue_token,
)
from party_sync.protocol.errors import AuthError, ConfigError
from party_sync.protocol.types import PARTY_ACTOR

NOW = 1_600_000_000.0
SECRET = "s" * 64  # 64 bytes: long enough for HS512 without PyJWT's key-length warning
PREVIOUS = "p" * 64
OTHER = "o" * 64


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "wall_clock", lambda: NOW)


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "character:aria",
        "party_id": "party-1",
        "campaign_run_id": "run-42",
        "character_id": "aria",
        "display_name": "Aria",
        "aud": AUDIENCE,
        "iat": int(NOW),
        "exp": int(NOW) + 600,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def token(secret: str = SECRET, algorithm: str = "HS256", **changes: Any) -> str:
    return jwt.encode(claims(**changes), secret, algorithm=algorithm)


def refused(verifier: TokenVerifier, tok: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(tok)
    assert info.value.status == 401
    return info.value


def b64(obj: dict[str, Any]) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_an_issued_token_verifies_to_its_claims() -> None:
    tok = issue_token(
        SECRET,
        party_id="party-1",
        campaign_run_id="run-42",
        character_id="aria",
        display_name="Aria",
        now=NOW,
        ttl=120.0,
    )
    assert TokenVerifier([SECRET]).verify(tok) == Claims(
        party_id="party-1",
        campaign_run_id="run-42",
        character_id="aria",
        display_name="Aria",
        exp=NOW + 120.0,
        sub="character:party-1/aria",
    )
    decoded = jwt.decode(
        tok, SECRET, algorithms=["HS256"], audience=AUDIENCE, options={"verify_exp": False}
    )
    assert decoded["iat"] == int(NOW)
    assert decoded["aud"] == AUDIENCE


def test_issue_token_with_a_sub_and_another_algorithm() -> None:
    tok = issue_token(
        SECRET,
        party_id="p",
        campaign_run_id="r",
        character_id="c",
        display_name="C",
        now=NOW,
        sub="user:7",
        algorithm="HS384",
    )
    assert jwt.get_unverified_header(tok)["alg"] == "HS384"
    verified = TokenVerifier([SECRET], algorithms=["HS384"]).verify(tok)
    assert verified.sub == "user:7"


def test_a_missing_token() -> None:
    assert refused(TokenVerifier([SECRET]), "").reason == "missing token"


@pytest.mark.parametrize("tok", ["abc", "a.b.c", "x" * 300])
def test_garbage_is_a_malformed_token(tok: str) -> None:
    assert refused(TokenVerifier([SECRET]), tok).reason == "malformed token"


@pytest.mark.parametrize("age", [MAX_LEEWAY, MAX_LEEWAY + 1, 3600.0])
def test_a_token_expired_beyond_the_leeway_is_refused(age: float) -> None:
    tok = token(exp=int(NOW - age), iat=int(NOW - age - 600))
    assert refused(TokenVerifier([SECRET]), tok).reason == "token expired"


@pytest.mark.parametrize("age", [1.0, MAX_LEEWAY - 1])
def test_a_token_expired_within_the_leeway_is_accepted(age: float) -> None:
    tok = token(exp=int(NOW - age), iat=int(NOW - 600))
    claims = TokenVerifier([SECRET]).verify(tok)
    assert claims.exp == NOW - age
    # the connection it opens lives as long as a handshake would take the token: not closed
    # with 4001 the moment it opens (the client, whose clock says "valid", would loop)
    assert claims.ends_at == NOW - age + MAX_LEEWAY > NOW


def test_a_connection_with_a_token_valid_when_verified_ends_at_its_exp() -> None:
    tok = token(exp=int(NOW + 5), iat=int(NOW - 600))
    assert TokenVerifier([SECRET], clock=lambda: NOW).verify(tok).ends_at == NOW + 5


def test_the_leeway_is_capped_at_30_seconds() -> None:
    tok = token(exp=int(NOW - MAX_LEEWAY - 1), iat=int(NOW - 600))
    assert refused(TokenVerifier([SECRET], leeway=3600.0), tok).reason == "token expired"
    in_leeway = token(exp=int(NOW - 5), iat=int(NOW - 600))
    assert refused(TokenVerifier([SECRET], leeway=0.0), in_leeway).reason == "token expired"


def test_a_bad_signature_is_refused() -> None:
    assert refused(TokenVerifier([SECRET]), token(OTHER)).reason == "bad token signature"
    header, _, signature = token(SECRET).split(".")
    forged = f"{header}.{b64(claims(character_id='borin'))}.{signature}"
    assert refused(TokenVerifier([SECRET]), forged).reason == "bad token signature"


@pytest.mark.parametrize("aud", ["other-service", ["other-service"]])
def test_a_token_for_another_audience_is_refused(aud: str | list[str]) -> None:
    error = refused(TokenVerifier([SECRET]), token(aud=aud))
    assert error.reason == "token not addressed to party_sync"


def test_an_audience_list_including_party_sync_is_accepted() -> None:
    assert TokenVerifier([SECRET]).verify(token(aud=["billing", AUDIENCE])).character_id == "aria"


@pytest.mark.parametrize("claim", ["exp", "aud", "party_id", "campaign_run_id", "character_id"])
def test_a_token_missing_a_required_claim_is_refused(claim: str) -> None:
    without: dict[str, Any] = {claim: None}
    error = refused(TokenVerifier([SECRET]), token(**without))
    assert error.reason == f"token lacks the {claim!r} claim"


def test_an_alg_none_token_is_refused() -> None:
    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    assert refused(TokenVerifier([SECRET]), unsigned).reason == "token algorithm not allowed"
    # ... whichever HMAC algorithms are configured
    every_hmac = TokenVerifier([SECRET], algorithms=["HS256", "HS384", "HS512"])
    assert refused(every_hmac, unsigned).reason == "token algorithm not allowed"


def test_a_token_signed_with_an_algorithm_not_configured_is_refused() -> None:
    hs512 = token(algorithm="HS512")
    hs256_only = TokenVerifier([SECRET], algorithms=["HS256"])
    assert refused(hs256_only, hs512).reason == "token algorithm not allowed"
    # the same token is fine where HS512 is configured: only the algorithm made the difference
    assert TokenVerifier([SECRET], algorithms=["HS512"]).verify(hs512).party_id == "party-1"


def test_the_previous_secret_is_accepted_during_a_rotation() -> None:
    rotated = TokenVerifier([SECRET, PREVIOUS])
    assert rotated.verify(token(PREVIOUS)).character_id == "aria"
    assert rotated.verify(token(SECRET)).character_id == "aria"
    assert refused(rotated, token(OTHER)).reason == "bad token signature"
    assert refused(TokenVerifier([SECRET]), token(PREVIOUS)).reason == "bad token signature"
    # an unset previous secret (empty) is ignored
    assert TokenVerifier([SECRET, ""]).verify(token(SECRET)).character_id == "aria"


def test_an_expired_token_of_the_previous_secret_is_reported_as_expired() -> None:
    old = token(PREVIOUS, exp=int(NOW - 3600), iat=int(NOW - 7200))
    assert refused(TokenVerifier([SECRET, PREVIOUS]), old).reason == "token expired"


@pytest.mark.parametrize("claim", ["party_id", "campaign_run_id", "character_id"])
@pytest.mark.parametrize(
    "value", ["has space", "a/b", "x" * 65, "", "ária", "aria\n", 42, ["aria"]]
)
def test_ids_with_bad_characters_are_refused(claim: str, value: Any) -> None:
    error = refused(TokenVerifier([SECRET]), token(**{claim: value}))
    assert error.reason == f"token claim {claim!r} is not a valid id"


def test_the_party_actor_id_is_reserved() -> None:
    error = refused(TokenVerifier([SECRET]), token(character_id=PARTY_ACTOR))
    assert error.reason == "character_id 'party' is reserved for party-level actions"
    # it is only reserved as a character
    assert TokenVerifier([SECRET]).verify(token(party_id=PARTY_ACTOR)).party_id == PARTY_ACTOR


def test_ids_may_use_the_whole_id_alphabet() -> None:
    odd = "Az09._:-" + "x" * 56  # 64 characters
    verified = TokenVerifier([SECRET]).verify(token(party_id=odd, character_id="c"))
    assert (verified.party_id, verified.character_id) == (odd, "c")


@pytest.mark.parametrize("name", [None, "", "x" * 65, 7])
def test_a_missing_or_bad_display_name_falls_back_to_the_character_id(name: Any) -> None:
    changes: dict[str, Any] = {"display_name": name}
    assert TokenVerifier([SECRET]).verify(token(**changes)).display_name == "aria"


def test_a_token_without_sub_has_none() -> None:
    assert TokenVerifier([SECRET]).verify(token(sub=None)).sub is None


def test_a_token_from_the_future_is_refused() -> None:
    tok = token(iat=int(NOW + 3600), exp=int(NOW + 7200))
    assert refused(TokenVerifier([SECRET]), tok).reason == "token not yet valid"
    not_before = token(nbf=int(NOW + MAX_LEEWAY + 1))
    assert refused(TokenVerifier([SECRET]), not_before).reason == "token not yet valid"
    assert TokenVerifier([SECRET]).verify(token(nbf=int(NOW + MAX_LEEWAY))).character_id == "aria"


def test_an_injected_clock_is_used() -> None:
    tok = token(exp=int(NOW + 60))
    assert TokenVerifier([SECRET], clock=lambda: NOW).verify(tok).exp == NOW + 60
    late = TokenVerifier([SECRET], clock=lambda: NOW + 60 + MAX_LEEWAY)
    assert refused(late, tok).reason == "token expired"


# -- time claims of any type and size: a 401, never a 500 ---------------------------------------


def signed(payload: dict[str, Any]) -> str:
    """A token signed with SECRET whose payload is ``json.dumps(payload)``: NaN, Infinity and
    400-digit integers included, as a hostile issuer holding the key could write them."""
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(payload)}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


HOSTILE_TIMES: list[Any] = [
    1e300,
    -1e300,
    10**400,
    -(10**400),
    2**64,
    MAX_TIMESTAMP + 1,
    "9999999999",
    "1600000600",
    "",
    True,
    False,
    math.nan,
    math.inf,
    -math.inf,
    -5,
    -0.5,
    None,
    [NOW + 600],
    {"at": NOW + 600},
]


@pytest.mark.parametrize("value", HOSTILE_TIMES, ids=repr)
def test_a_hostile_exp_is_refused_with_401(value: Any) -> None:
    error = refused(TokenVerifier([SECRET]), signed(claims() | {"exp": value}))
    assert error.reason in {
        "token claim 'exp' is not a number",
        "token claim 'exp' is out of range",
        "token expired",
        "token lacks the 'exp' claim",
        "malformed token",
    }


@pytest.mark.parametrize("claim", ["iat", "nbf"])
@pytest.mark.parametrize("value", HOSTILE_TIMES, ids=repr)
def test_a_hostile_iat_or_nbf_is_refused_with_401(claim: str, value: Any) -> None:
    refused(TokenVerifier([SECRET]), signed(claims() | {claim: value}))


def test_a_huge_exp_is_out_of_range_not_an_overflow() -> None:
    for value in (1e300, 10**400, MAX_TIMESTAMP + 1):
        reason = refused(TokenVerifier([SECRET]), signed(claims() | {"exp": value})).reason
        assert reason == "token claim 'exp' is out of range"
    assert refused(TokenVerifier([SECRET]), signed(claims() | {"exp": "9999999999"})).reason == (
        "token claim 'exp' is not a number"
    )
    assert refused(TokenVerifier([SECRET]), signed(claims() | {"exp": True})).reason == (
        "token claim 'exp' is not a number"
    )
    # the largest accepted exp is usable as a timer delay
    assert TokenVerifier([SECRET]).verify(signed(claims(exp=MAX_TIMESTAMP))).exp == MAX_TIMESTAMP


def _acceptable(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and 0 <= value <= MAX_TIMESTAMP
    )


time_values = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**420), max_value=10**420),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.integers(min_value=0, max_value=MAX_TIMESTAMP).map(str),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


near_now = st.one_of(
    st.integers(min_value=int(NOW) - 3600, max_value=int(NOW) + 3600),
    st.floats(min_value=NOW - 3600, max_value=NOW + 3600),
)
claim_values = st.one_of(near_now, time_values)  # half the draws near NOW: many valid tokens


@settings(max_examples=400, deadline=None)
@given(exp=claim_values, iat=claim_values, nbf=claim_values)
def test_any_time_claims_verify_or_get_401_as_the_rules_say(exp: Any, iat: Any, nbf: Any) -> None:
    payload = claims() | {"exp": exp, "iat": iat, "nbf": nbf}
    try:
        verified: Claims | AuthError = TokenVerifier([SECRET]).verify(signed(payload))
    except AuthError as exc:
        verified = exc
    # the oracle: RFC 7519 NumericDates (a present null is not one), in range, with the leeway
    valid = (
        all(_acceptable(v) for v in (exp, iat, nbf))
        and exp > NOW - MAX_LEEWAY
        and iat <= NOW + MAX_LEEWAY
        and nbf <= NOW + MAX_LEEWAY
    )
    if valid:
        assert isinstance(verified, Claims), verified
        assert verified.exp == float(exp)
    else:
        assert isinstance(verified, AuthError)
        assert verified.status == 401


@pytest.mark.parametrize(
    ("secrets", "algorithms"),
    [
        ([], ["HS256"]),
        ([""], ["HS256"]),
        ([SECRET], []),
        ([SECRET], ["none"]),
        ([SECRET], ["RS256"]),
        ([SECRET], ["HS256", "ES256"]),
    ],
)
def test_an_unusable_configuration_is_a_config_error(
    secrets: list[str], algorithms: list[str]
) -> None:
    with pytest.raises(ConfigError):
        TokenVerifier(secrets, algorithms=algorithms)
