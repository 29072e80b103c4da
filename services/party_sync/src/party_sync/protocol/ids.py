"""The id rule: one pattern for every identifier party_sync accepts, in one place.

``common.json#/$defs/id`` (docs/protocol.md, "The envelope"): ``^[A-Za-z0-9._:-]{1,64}$``. Ids
become Redis key and channel names (``backends/keys.py``), log fields and URL path segments, so
the alphabet has no space, no wildcard (``*``, ``?``, ``[``), no separator a key could be split on
other than ``:``, no control or non-ASCII character, and a bounded length. Schemas check ids in
message bodies; ``is_id`` checks them everywhere else (tokens, HTTP API paths and bodies, the
membership directory), so no entry point can skip the rule.

``re.fullmatch`` matters: with ``re.match``, ``$`` also matches before a final newline, and
``"aria\\n"`` would pass.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeGuard

#: The documented pattern (a test keeps it equal to ``common.json#/$defs/id``).
ID_PATTERN: Final = "^[A-Za-z0-9._:-]{1,64}$"
#: ``common.json#/$defs/trace_id``: the id alphabet, up to 128 characters.
TRACE_ID_PATTERN: Final = "^[A-Za-z0-9._:-]{1,128}$"

_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TRACE_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")

#: What a refusal says about the rule (no echo of the refused value).
ID_RULE: Final = "ids must match [A-Za-z0-9._:-]{1,64}"
#: The refusal of a ``trace_id`` that breaks ``TRACE_ID_PATTERN`` (every body that takes one).
TRACE_ID_RULE: Final = "trace_id must match [A-Za-z0-9._:-]{1,128}"


def is_id(value: Any) -> TypeGuard[str]:
    """True if ``value`` is a string that follows the id rule."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def is_trace_id(value: Any) -> TypeGuard[str]:
    """True if ``value`` is a string that follows the trace id rule."""
    return isinstance(value, str) and _TRACE_ID.fullmatch(value) is not None
