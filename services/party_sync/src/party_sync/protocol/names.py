"""The display-name rule: what a character's name may contain, in one place.

A ``display_name`` is broadcast to every member of a party (``party.join``, ``system.hello``'s
members) and shown by clients, terminals and log viewers. It must therefore be plain text on one
line whose visual order is its logical order. Refused characters:

- control characters: C0 (U+0000–U+001F, incl. NUL, TAB, LF, CR, ESC) and C1 (U+007F–U+009F);
- line and paragraph separators (U+2028, U+2029);
- bidirectional formatting: marks U+061C, U+200E, U+200F; embeddings and overrides
  U+202A–U+202E; isolates U+2066–U+2069 (they can reverse the text around a name);
- invisible characters that make a name look empty or like another: U+200B (zero-width space),
  U+2060–U+2064, U+206A–U+206F, U+FEFF, U+FFF9–U+FFFB;
- lone surrogates (U+D800–U+DFFF): not text, and not encodable as UTF-8.

Zero-width (non-)joiners U+200C/U+200D stay allowed: emoji sequences and several scripts need
them. HTML is *not* refused: ``<b>`` is a legal name, and every client renders names as text.

Two sides (docs/security.md):

- **issuing** (membership API, the development token endpoint, ``issue_token``): a name that
  breaks the rule is *refused* (``name_problem``; the API answers 422 ``invalid_display_name``),
  so an operator learns about it at once;
- **accepting** (a verified token): a token is signed by the operator, so it is not refused for
  its name; ``clean_name`` *normalises* it (separators become spaces, other refused characters are
  dropped) and falls back to the character id if nothing printable is left.
"""

from __future__ import annotations

import re
from typing import Any, Final

#: Longest name, in characters (``common.json#/$defs/display_name``).
MAX_NAME_CHARS: Final = 64

_SEPARATORS: Final = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\u2028\u2029"
#: The refused characters (see the module), as code point ranges.
_REFUSED_RANGES: Final = (
    (0x00, 0x1F),
    (0x7F, 0x9F),
    (0x2028, 0x2029),
    (0x061C, 0x061C),
    (0x200E, 0x200F),
    (0x202A, 0x202E),
    (0x2066, 0x2069),
    (0x200B, 0x200B),
    (0x2060, 0x2064),
    (0x206A, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
)
#: Lone surrogates (not text, and not encodable as UTF-8).
_SURROGATES: Final = "\\uD800-\\uDFFF"
#: The ranges as the body of a regular expression's class, in ``\uXXXX`` escapes (which
#: Python's ``re`` and ECMA-262, JSON Schema's dialect, read alike).
_CLASS: Final = "".join(
    f"\\u{lo:04X}" if lo == hi else f"\\u{lo:04X}-\\u{hi:04X}" for lo, hi in _REFUSED_RANGES
)
_REFUSED: Final = re.compile(f"[{_CLASS}{_SURROGATES}]")
#: The rule's characters as a JSON Schema ``pattern`` (the API's description of the issuing side;
#: a blank name is refused too). Without the surrogates: an ECMA-262 pattern without the ``u``
#: flag reads an emoji as two of them (and refused every emoji name); a lone one never gets
#: here (the JSON decoder refuses it).
NAME_PATTERN: Final = f"^[^{_CLASS}]*$"


def name_problem(value: Any) -> str | None:
    """Why ``value`` is not an acceptable display name, or None if it is (the issuing side)."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
        return f"display_name must be a string of 1-{MAX_NAME_CHARS} characters"
    if _REFUSED.search(value) is not None:
        return "display_name must not contain control, line-break, bidi or invisible characters"
    if value.isspace():
        return "display_name must not be blank"
    return None


def _replace(match: re.Match[str]) -> str:
    return " " if match.group() in _SEPARATORS else ""


def clean_name(value: Any, fallback: str) -> str:
    """The name to show for ``value`` (the accepting side): ``value`` itself when it follows the
    rule; otherwise with separators turned into spaces and other refused characters removed;
    ``fallback`` when that leaves no 1-64-character, non-blank name."""
    if not isinstance(value, str) or not value:
        return fallback
    name: str = value
    if _REFUSED.search(name) is not None:
        name = _REFUSED.sub(_replace, name).strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS or name.isspace():
        return fallback
    return name
