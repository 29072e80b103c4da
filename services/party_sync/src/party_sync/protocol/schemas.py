"""The JSON Schemas in ``contracts/jsonschema/party_sync/`` — loaded and compiled once at start-up.

They are the single source of truth for the server, the browser client and engines. Validation uses
jsonschema-rs (a compiled validator costs ~1 µs a message; pure-Python jsonschema ~130 µs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from typing import Any, NoReturn

import jsonschema_rs

from party_sync.protocol.errors import ConfigError, PartySyncError

#: Files that hold shared definitions rather than a message type.
_SUPPORT_FILES = frozenset({"envelope", "common"})
#: The subdirectory of what engines receive (``Contracts.validate_engine``).
ENGINE_DIR = "engine"


def default_contracts_dir() -> Path:
    """Where the schemas are: ``$PARTY_SYNC_CONTRACTS_DIR``, the wheel's copy, or the repository."""
    configured = os.environ.get("PARTY_SYNC_CONTRACTS_DIR")
    if configured:
        return Path(configured)
    packaged = Path(__file__).resolve().parents[1] / "_contracts"
    if packaged.is_dir():
        return packaged
    # src/party_sync/protocol/schemas.py → parents[5] is the repository root.
    return Path(__file__).resolve().parents[5] / "contracts" / "jsonschema" / "party_sync"


class SchemaViolation(PartySyncError):
    """A message does not match its schema; ``str()`` is a short human explanation."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class Contracts:
    """Compiled validators, one per message type (``action.request`` → ``action.request.json``)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_contracts_dir()
        if not self.directory.is_dir():
            raise ConfigError(f"schema directory not found: {self.directory}")
        self.documents: dict[str, dict[str, Any]] = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                self.documents[path.stem] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read schema {path}: {exc}") from exc
        if "envelope" not in self.documents:
            raise ConfigError(f"no envelope.json in {self.directory}")
        #: What engines receive (``engine/``: the notices, the HTTP bodies, the stream entry),
        #: by file stem (``join.notice``); never a message type a client may send.
        self.engine_documents: dict[str, dict[str, Any]] = {}
        for path in sorted((self.directory / ENGINE_DIR).glob("*.json")):
            try:
                self.engine_documents[path.stem] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read schema {path}: {exc}") from exc
        every = [*self.documents.values(), *self.engine_documents.values()]
        registry = jsonschema_rs.Registry([(doc["$id"], doc) for doc in every if "$id" in doc])
        self._validators: dict[str, Any] = {}
        for name, doc in self.documents.items():
            validator = _compiled(name, doc, registry)
            if name not in _SUPPORT_FILES:
                self._validators[name] = validator
        self._engine_validators = {
            name: _compiled(f"{ENGINE_DIR}/{name}", doc, registry)
            for name, doc in self.engine_documents.items()
        }

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self._validators)

    def has(self, type_: str) -> bool:
        return type_ in self._validators

    def validate(self, type_: str, message: Mapping[str, Any]) -> None:
        """Raise ``SchemaViolation`` unless ``message`` is a valid whole message of ``type_``."""
        validator = self._validators.get(type_)
        if validator is None:
            raise SchemaViolation("type", f"no schema for message type {type_!r}")
        if not validator.is_valid(message):  # (the verdict inline: every client message)
            _explain(validator, message)

    def validate_engine(self, name: str, value: Mapping[str, Any]) -> None:
        """Raise ``SchemaViolation`` unless ``value`` matches ``engine/<name>.json`` (what an
        engine receives: ``join.notice``, ``restate.notice``, ``http.action``, …)."""
        validator = self._engine_validators.get(name)
        if validator is None:
            raise SchemaViolation("", f"no engine schema {name!r} in {self.directory / ENGINE_DIR}")
        if not validator.is_valid(value):
            _explain(validator, value)

    def is_valid(self, type_: str, message: Mapping[str, Any]) -> bool:
        validator = self._validators.get(type_)
        return validator is not None and bool(validator.is_valid(message))


def _compiled(name: str, doc: dict[str, Any], registry: Any) -> Any:
    try:
        return jsonschema_rs.validator_for(doc, registry=registry, validate_formats=True)
    except Exception as exc:  # jsonschema_rs raises ValueError / ReferencingError
        raise ConfigError(f"schema {name}.json does not compile: {exc}") from exc


def _explain(validator: Any, message: Mapping[str, Any]) -> NoReturn:
    """Raise the ``SchemaViolation`` that says why ``validator`` refuses ``message``."""
    # The explanation, from a bounded copy: jsonschema-rs's ValidationError carries the
    # failing instance converted back to Python, which for a 64-KiB array or object under
    # an unexpected key costs milliseconds (about 3.5 ms against 2 µs for the verdict): a
    # client must not buy that much CPU with each bad message.
    # Strings whole the second time: a string over ``_KEEP_CHARS`` that breaks its
    # ``maxLength`` (a 4,001-character narration) is cheap to convert, and was explained
    # as nothing at all.
    for chars in (_KEEP_CHARS, None):
        try:
            validator.validate(_bounded(message, chars))
        except jsonschema_rs.ValidationError as exc:
            path = ".".join(str(part) for part in exc.instance_path)
            raise SchemaViolation(path, _short(exc.message)) from None
    raise SchemaViolation(  # only in the items or keys left out of the explanation
        "",
        f"does not match its schema: an array or object of more than {_KEEP_ITEMS} items "
        f"or {_KEEP_KEYS} keys breaks its schema (more items or keys than it allows, or a "
        "bad one among them)",
    )


#: What ``_bounded`` keeps of each container and string.
_KEEP_KEYS, _KEEP_ITEMS, _KEEP_CHARS = 128, 64, 1024


def _bounded(value: Any, chars: int | None = _KEEP_CHARS) -> Any:
    """``value`` with at most ``_KEEP_KEYS`` keys per object, ``_KEEP_ITEMS`` items per array and
    ``chars`` characters per string (the first ones; None: whole), for explaining a violation
    cheaply. (Messages are nesting-bounded before they are validated: ``codec.decode_bounded``.)"""
    if isinstance(value, dict):
        return {key: _bounded(item, chars) for key, item in islice(value.items(), _KEEP_KEYS)}
    if isinstance(value, list):
        return [_bounded(item, chars) for item in value[:_KEEP_ITEMS]]
    if isinstance(value, str) and chars is not None and len(value) > chars:
        return value[:chars]
    return value


def _short(text: str, limit: int = 300) -> str:
    """``text`` in at most ``limit`` characters: its middle elided, since jsonschema-rs's
    messages begin with the failing value and end with the rule it broke ("is longer than
    4000 characters")."""
    if len(text) <= limit:
        return text
    tail = limit // 3
    return text[: limit - tail - 1] + "…" + text[-tail:]
