"""Strict readers for the fields of a campaign document (``campaign.parse_campaign`` uses them).

Each reader takes the JSON object, the key and the object's path in the document, and either
returns a checked value or raises :class:`CampaignError` naming the path, so a campaign author is
told exactly which value is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from campaign_engine.rules import Dice

#: The protocol's id pattern (protocol-v1, common.json ``id``): scene, option and enemy ids.
ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class CampaignError(ValueError):
    """A campaign document is invalid; the message names the offending path."""


def obj_keys(obj: Any, path: str, required: set[str], optional: set[str]) -> Mapping[str, Any]:
    """``obj`` as an object with all ``required`` keys and no key outside ``optional``."""
    if not isinstance(obj, Mapping):
        raise CampaignError(f"{path}: expected an object")
    if missing := required - obj.keys():
        raise CampaignError(f"{path}: missing {', '.join(sorted(missing))}")
    if unknown := obj.keys() - required - optional:
        raise CampaignError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    return obj


def text(obj: Mapping[str, Any], key: str, path: str, limit: int = 200) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise CampaignError(f"{path}.{key}: expected a non-empty string of at most {limit} chars")
    return value


def ident(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise CampaignError(f"{path}.{key}: {value!r} is not an id ({ID_PATTERN.pattern})")
    return value


def integer(obj: Mapping[str, Any], key: str, path: str, low: int, high: int, default: int) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CampaignError(f"{path}.{key}: expected an integer in {low}..{high}")
    return value


def dice(obj: Mapping[str, Any], key: str, path: str) -> Dice:
    value = obj[key]
    try:
        return Dice.parse(value if isinstance(value, str) else "")
    except ValueError as exc:
        raise CampaignError(f"{path}.{key}: {exc}") from None


def items(obj: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise CampaignError(f"{path}.{key}: expected a list")
    return value
