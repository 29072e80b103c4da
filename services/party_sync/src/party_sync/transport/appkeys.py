"""Typed keys of what the aiohttp application carries."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from party_sync.auth import TokenVerifier
from party_sync.backends.directory import Directory
from party_sync.gateway import Gateway
from party_sync.transport.sink import FrameBatcher

GATEWAY: Final = web.AppKey("gateway", Gateway)
VERIFIER: Final = web.AppKey("verifier", TokenVerifier)
API_KEY: Final = web.AppKey("api_key", str)
DIRECTORY: Final = web.AppKey[Directory]("directory")
BATCHER: Final = web.AppKey("batcher", FrameBatcher)
