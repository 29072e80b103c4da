"""Development mode that survives its own restart (``make run``; README, "The two commands").

With no ``PARTY_SYNC_JWT_SECRET``, ``party-sync serve`` signs tokens with a development secret.
A fresh random secret per process would break every printed demo link at the next start, so the
secret (and the development API key) is kept in :data:`DEV_SECRET_FILE` in the working directory:
created with mode 0600 (only this user may read it), ignored by git, reused by the next start and
by ``party-sync token``. ``party-sync serve --new-game`` (``make run NEW_GAME=1``) discards it and
the reference engine's SQLite database, so the next start is a new game with new links.

It is never a production secret: production sets ``PARTY_SYNC_JWT_SECRET``, and then this file is
neither read nor written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("party_sync")

#: The development secret's file, in the working directory (``.gitignore`` lists it).
DEV_SECRET_FILE = ".party_sync_dev_secret"  # noqa: S105 (a file name, not a secret)
#: Where the reference engine keeps its runs: the same variable and default as ``campaign_engine``
#: (``campaign_engine.engine.ENV_DATABASE_URL``, ``campaign_engine.store.DEFAULT_DATABASE_URL``;
#: party_sync does not import the reference engine, a test keeps the two in step).
ENGINE_DATABASE_ENV = "CAMPAIGN_ENGINE_DATABASE_URL"
ENGINE_DEFAULT_DATABASE_URL = "sqlite:///campaign_engine.sqlite3"
REFERENCE_ENGINE_MODULE = "campaign_engine"
#: Development mode with the reference engine in this process: it narrates its scene text live
#: (a simulated model writing) at this speed, in characters per second, unless the variable is
#: set (``0`` turns it off). ``campaign_engine.engine.ENV_NARRATION_SPEED``; off elsewhere.
ENGINE_NARRATION_ENV = "CAMPAIGN_ENGINE_NARRATION_SPEED"
DEV_NARRATION_SPEED = "80"


@dataclass(frozen=True, slots=True)
class DevSecret:
    jwt_secret: str
    api_key: str
    path: Path
    created: bool  # False: read from an earlier run


def _new() -> dict[str, str]:
    return {"jwt_secret": secrets.token_urlsafe(32), "api_key": secrets.token_urlsafe(24)}


def _parse(raw: bytes) -> dict[str, str] | None:
    try:
        data: Any = orjson.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    secret, key = data.get("jwt_secret"), data.get("api_key")
    if not (isinstance(secret, str) and len(secret) >= 32 and isinstance(key, str) and key):
        return None
    return {"jwt_secret": secret, "api_key": key}


def _write_new(path: Path) -> dict[str, str] | None:
    """Create ``path`` with mode 0600 and new values; None if another process created it first."""
    values = _new()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    with os.fdopen(fd, "wb") as file:
        file.write(orjson.dumps(values))
    return values


def load_or_create(path: Path) -> DevSecret:
    """The development secret kept in ``path``, made (0600) if there is none or it is unreadable.

    A file others may read is made private (chmod 0600) with a warning; a damaged one is replaced.
    """
    for _ in range(3):  # a concurrent start may create or replace it between two steps
        created = _write_new(path)
        if created is not None:
            return DevSecret(created["jwt_secret"], created["api_key"], path, created=True)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        if mode & 0o077:
            log.warning(
                "the development secret file was readable by others: made private (0600)",
                extra={"path": str(path), "mode": oct(mode)},
            )
            path.chmod(0o600)
        values = _parse(raw)
        if values is not None:
            return DevSecret(values["jwt_secret"], values["api_key"], path, created=False)
        log.warning(
            "the development secret file is damaged: replacing it", extra={"path": str(path)}
        )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    raise OSError(f"cannot create the development secret file {path}")


def read_existing(path: Path) -> DevSecret | None:
    """The development secret in ``path`` if there is a valid one (``party-sync token``)."""
    try:
        values = _parse(path.read_bytes())
    except OSError:
        return None
    if values is None:
        return None
    return DevSecret(values["jwt_secret"], values["api_key"], path, created=False)


def sqlite_path(url: str) -> Path | None:
    """The file a ``sqlite:///PATH`` URL names (relative to the working directory), else None."""
    url = url.strip() or ENGINE_DEFAULT_DATABASE_URL
    if not url.lower().startswith("sqlite:///") or len(url) == len("sqlite:///"):
        return None
    return Path(url[len("sqlite:///") :])


def is_reference_engine(spec: str) -> bool:
    """``spec`` (MODULE:ATTR) names the reference engine (whose database ``--new-game`` resets)."""
    module = spec.split(":", 1)[0].strip()
    return module == REFERENCE_ENGINE_MODULE or module.startswith(REFERENCE_ENGINE_MODULE + ".")


def narrate_by_default(
    environ: MutableMapping[str, str], *, engine_in_process: bool, engine_spec: str
) -> bool:
    """Development mode: the in-process reference engine narrates live at
    :data:`DEV_NARRATION_SPEED` unless :data:`ENGINE_NARRATION_ENV` is set. True if set here."""
    if not (engine_in_process and is_reference_engine(engine_spec)):
        return False
    if environ.get(ENGINE_NARRATION_ENV, "").strip():
        return False
    environ[ENGINE_NARRATION_ENV] = DEV_NARRATION_SPEED
    return True


def new_game(
    workdir: Path, *, engine_in_process: bool, engine_spec: str, environ: dict[str, str]
) -> list[Path]:
    """Discard the development secret and (reference engine in this process, SQLite) the engine's
    database with its journal files; the paths removed."""
    targets = [workdir / DEV_SECRET_FILE]
    if engine_in_process and is_reference_engine(engine_spec):
        database = sqlite_path(environ.get(ENGINE_DATABASE_ENV, ""))
        if database is None:
            log.warning(
                "--new-game: the reference engine's database is not a SQLite file; not removed",
                extra={"variable": ENGINE_DATABASE_ENV},
            )
        else:
            database = database if database.is_absolute() else workdir / database
            targets += [
                database.with_name(database.name + suffix)
                for suffix in ("", "-wal", "-shm", "-journal")
            ]
    elif not engine_in_process:
        log.info("--new-game: the engine runs in its own process; its state is its own")
    removed = []
    for target in targets:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
            removed.append(target)
    return removed
