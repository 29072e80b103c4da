"""The admin page in a real headless chromium: unlock, list, follow a party live, disconnect.

The server runs in-process with a scripted engine; the players are plain WebSocket clients. The
page is driven like an operator would (typing the key, clicking), on a desktop-sized viewport.
Screenshots go to artifacts/browser/.
"""

from __future__ import annotations

import pytest
from party_sync.transport.admin import CLOSE_DISCONNECTED
from playwright.async_api import Browser, expect
from ps_testkit.browser import Player, chromium, open_player, screenshot
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import make_settings, serve_in_process, token

pytestmark = pytest.mark.browser

KEY = "api-key-admin-browser-0123456789abcdef"
PARTY, RUN = "p-admin", "r-admin"
TIMEOUT = 10_000  # ms, for every wait on the page

expect.set_options(timeout=TIMEOUT)


async def open_admin(browser: Browser, name: str, url: str) -> Player:
    return await open_player(browser, name, url, desktop=True)


async def test_an_operator_follows_a_party_and_disconnects_a_player() -> None:
    name = "admin"
    engine = ScriptedEngine()
    async with (
        serve_in_process(make_settings(api_key=KEY), engine=engine) as srv,
        chromium() as browser,
    ):
        aria, _ = await srv.join("aria", party=PARTY, run=RUN)
        borin, _ = await srv.join("borin", party=PARTY, run=RUN)
        admin = await open_admin(browser, "operator", srv.base + "/admin")
        page = admin.page
        await expect(page.locator("#unlock")).to_be_visible()
        await expect(page.locator("#panels")).to_be_hidden()

        # A wrong key is refused and forgotten.
        await page.locator("#key").fill("not-the-key")
        await page.locator("#key-form button[type=submit]").click()
        await expect(page.locator("#key-error")).to_be_visible()
        await expect(page.locator("#unlock")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0
        await screenshot(admin, name, "1-wrong-key")

        await page.locator("#key").fill(KEY)
        await page.locator("#key-form button[type=submit]").click()
        await expect(page.locator("body")).to_have_attribute("data-status", "open")
        assert await page.evaluate("localStorage.length") == 0  # kept for the session only
        row = page.locator(f"#parties tr[data-party={PARTY}]")
        await expect(row.locator("td[data-online]")).to_have_text("2/2")
        await expect(page.locator("#nodes tr")).to_have_count(1)
        # (a node's count is its heartbeat's, every presence_ttl / 3 = 10 s: README)
        await expect(page.locator("#nodes td[data-connections]")).to_have_text("2", timeout=25_000)
        await screenshot(admin, name, "2-overview")

        # Follow the party: its events so far, then new ones live.
        await row.locator("button").click()
        await expect(page.locator("#party")).to_be_visible()
        for who in ("aria", "borin"):
            member = page.locator(f"#presence li[data-character={who}]")
            await expect(member).to_have_attribute("data-online", "true")
            await expect(member).to_have_attribute("data-connections", "1")
        await expect(page.locator("#events li[data-type='party.join']")).to_have_count(2)
        await aria.act("a-1", "aria", RUN)
        await expect(page.locator("#events li[data-type='action.result']")).to_contain_text("a-1")
        await expect(page.locator("#events li[data-type='scene.update']")).to_have_count(1)
        seqs = await page.locator("#events li[data-seq]").evaluate_all(
            "items => items.map(i => Number(i.dataset.seq))"
        )
        assert seqs == list(range(1, len(seqs) + 1))  # every event once, in order
        await screenshot(admin, name, "3-following")

        # Disconnect Aria and refuse her for 5 minutes.
        await page.locator("#block-minutes").fill("5")
        button = page.locator("#presence li[data-character=aria] button")
        await expect(button).to_have_accessible_name("Disconnect Aria")  # (each names its player)
        await button.click()
        assert await aria.closed() == CLOSE_DISCONNECTED
        await expect(page.locator("#status")).to_contain_text("Disconnected aria")
        await expect(page.locator("#presence li[data-character=aria]")).to_have_attribute(
            "data-connections", "0"
        )
        await expect(page.locator("#events li[data-type='party.leave']")).to_contain_text("aria")
        status = await srv.handshake_status({"token": token("aria", party=PARTY, run=RUN)})
        assert status == 403
        assert not borin.ws.closed
        await screenshot(admin, name, "4-disconnected")

        # 0 minutes: she may reconnect at once, the block lifted (admin probe: it stayed)
        await page.locator("#block-minutes").fill("0")
        await expect(page.locator("#status")).to_contain_text("refused for 5 min")
        await button.click()
        await expect(page.locator("#status")).not_to_contain_text("refused for")
        assert await srv.handshake_status({"token": token("aria", party=PARTY, run=RUN)}) == 101

        # A reload keeps the key (same tab session); forgetting it locks the page.
        await page.reload()
        await expect(page.locator("body")).to_have_attribute("data-status", "open")
        await page.locator("#forget").click()
        await expect(page.locator("#unlock")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0
        admin.assert_clean()
        await borin.close()
