"""Real-browser tests: Debian's ``chromium`` driven by Playwright, headless, offline.

Playwright's own browser download (``playwright install``) is never used: the tests launch the
system's ``/usr/bin/chromium`` (``make setup`` installs it with apt when missing). Without it the
tests fail, loudly: they never skip. The demo page is served from ``clients/js``: its build must
exist (``make setup``); a build older than its sources is rebuilt here with ``npm run build``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright

ROOT = Path(__file__).resolve().parents[4]
CLIENT_DIR = ROOT / "clients" / "js"
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM = os.environ.get("PARTY_SYNC_TEST_CHROMIUM", "/usr/bin/chromium")
#: Headless, no sandbox (containers, root), and nothing that talks to the network by itself.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: A phone: the page is a Telegram Mini App.
PHONE: ViewportSize = {"width": 390, "height": 844}


def require_chromium() -> str:
    path = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if path is None:
        pytest.fail(
            f"chromium not found at {CHROMIUM}: the browser tests need Debian's chromium "
            "(`make setup` installs it: apt-get install -y chromium). They never skip.",
            pytrace=False,
        )
    return path


def _newest(paths: list[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def require_demo_build() -> None:
    """The demo page's build exists and is not older than its sources (rebuilt if it is)."""
    sources = [
        *CLIENT_DIR.glob("src/*.ts"),
        *CLIENT_DIR.glob("demo/*"),
        *CLIENT_DIR.glob("admin/*"),
        *CLIENT_DIR.glob("tsconfig*.json"),
        CLIENT_DIR / "package.json",
    ]
    outputs = [
        CLIENT_DIR / "dist" / "index.js",
        CLIENT_DIR / "dist" / "demo" / "app.js",
        CLIENT_DIR / "dist" / "admin" / "app.js",
    ]
    built = all(p.is_file() for p in outputs)
    if built and min(p.stat().st_mtime for p in outputs) >= _newest(sources):
        return
    if not (CLIENT_DIR / "node_modules" / ".bin" / "tsc").exists():
        pytest.fail(
            "the demo page is not built and clients/js has no node_modules: run `make setup` "
            "(npm ci && npm run build in clients/js)",
            pytrace=False,
        )
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm not found: the demo page cannot be built", pytrace=False)
    subprocess.run([npm, "run", "build"], cwd=CLIENT_DIR, check=True, capture_output=True)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A fresh headless chromium (Playwright gives every launch a new temporary profile)."""
    executable = require_chromium()
    require_demo_build()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Player:
    """One player's page, with what went wrong in it."""

    name: str
    page: Page
    page_errors: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    #: the ``type`` of every WebSocket message the page received, in order
    received: list[str] = field(default_factory=list)

    def received_frame(self, payload: str | bytes) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            self.received.append(str(json.loads(payload).get("type")))

    def assert_clean(self) -> None:
        assert not self.page_errors, f"{self.name}: uncaught errors {self.page_errors}"
        assert not self.csp_violations, f"{self.name}: CSP violations {self.csp_violations}"

    async def log_seqs(self) -> list[int]:
        """The seq of every party event in the page's log, in the order shown."""
        values = await self.page.locator("#log li[data-seq]").evaluate_all(
            "items => items.map(i => Number(i.dataset.seq))"
        )
        return [int(v) for v in values]


async def open_player(browser: Browser, name: str, url: str, *, desktop: bool = False) -> Player:
    """A page with the error and CSP watchers: a phone (the Mini App), or a desktop window."""
    if desktop:
        context = await browser.new_context(viewport={"width": 1200, "height": 900})
    else:
        context = await browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True)
    page = await context.new_page()
    player = Player(name, page)
    page.on("pageerror", lambda error: player.page_errors.append(str(error)))
    page.on(
        "console",
        lambda message: (
            player.csp_violations.append(message.text)
            if "Content Security Policy" in message.text
            else None
        ),
    )
    page.on("websocket", lambda ws: ws.on("framereceived", player.received_frame))
    await page.goto(url)
    return player


async def screenshot(player: Player, test: str, step: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{test}-{step}-{player.name}")
    path = ARTIFACTS / f"{safe}.png"
    await player.page.evaluate("window.scrollTo(0, 0)")  # the sticky header stays on top
    await player.page.screenshot(path=str(path), full_page=True)
    return path


def assert_contiguous(seqs: list[int], who: str) -> None:
    """No gap and no duplicate: each seq is the previous one + 1."""
    assert seqs, f"{who}: no events in the log"
    expected = list(range(seqs[0], seqs[0] + len(seqs)))
    assert seqs == expected, f"{who}: log seqs {seqs} are not contiguous"
