"""The demo page as a player lives it, in a real headless chromium: narration written live on
every screen (and after a reconnect in the middle of it), actions seen as they happen, an error
in words next to the action, and a link that does not work.

Two players: Aria on a phone (390×844) behind a TCP proxy the test can cut, Borin on a desktop
window. The narration is driven through the server's HTTP API (``POST .../narration`` with the
API key, as an engine does), so every piece is the test's and each step waits on the page, never
on a clock. One test lets the reference engine narrate its own scene text, paced by the test.
Screenshots go to artifacts/browser/.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from campaign_engine import ReferenceEngine
from party_sync.auth import issue_token
from playwright.async_api import Browser, expect
from ps_testkit.browser import Player, chromium, open_player, screenshot
from ps_testkit.engines import ScriptedEngine
from ps_testkit.proxy import TcpProxy
from ps_testkit.servers import SECRET, Running, make_settings, serve_in_process

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

KEY = "api-key-browser-0123456789abcdef"
PARTY, RUN = "p-live", "r-live"
TIMEOUT = 10_000  # ms, for every wait on the page

expect.set_options(timeout=TIMEOUT)


def token(character: str, name: str, *, secret: str = SECRET, ttl: float = 3600.0) -> str:
    return issue_token(
        secret,
        party_id=PARTY,
        campaign_run_id=RUN,
        character_id=character,
        display_name=name,
        now=time.time(),
        ttl=ttl,
    )


def page_url(base: str, token_value: str) -> str:
    # A short backoff cap keeps the reconnect after a cut quick.
    return f"{base}/demo?token={token_value}&backoff_base_ms=200&backoff_cap_ms=800"


async def api(srv: Running, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST to the engine API with the key; the answer's JSON (2xx expected)."""
    async with srv.http.post(
        f"{srv.base}/api/v1/parties/{PARTY}/{path}",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        data: dict[str, Any] = await response.json()
        assert response.status in (201, 202), (response.status, data)
        return data


async def publish_scene(srv: Running, number: int, title: str, options: list[str]) -> None:
    await api(
        srv,
        "events",
        {
            "type": "scene.update",
            "payload": {
                "scene_number": number,
                "scene_id": f"s-{number}",
                "title": title,
                "narration": f"The final words of {title}.",
                "options": [{"id": f"o{i}", "label": label} for i, label in enumerate(options)],
                "kind": "story",
            },
        },
    )


async def narrate(
    srv: Running, stream: str, index: int, text: str, *, done: bool = False, action: str
) -> None:
    body = {"stream_id": stream, "index": index, "text": text, "done": done, "action_id": action}
    assert await api(srv, "narration", body) == {"stream_id": stream, "index": index}


def live_text(player: Player, stream: str) -> Any:
    return player.page.locator(f"#live [data-stream-id='{stream}'] .text")


async def visible_log(player: Player) -> list[str]:
    """The log as the player sees it (protocol details hidden)."""
    return [t.strip() for t in await player.page.locator("#log li:visible").all_inner_texts()]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


async def test_narration_is_written_live_on_both_screens_and_resumes_mid_stream(
    browser: Browser,
) -> None:
    name = "live"
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()  # Aria's action stays in flight until the test lets it go
    engine.scene_number = 1  # its answer is scene 2
    settings = make_settings(api_key=KEY, presence_grace=0.3)
    async with (
        serve_in_process(settings, engine=engine) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
    ):
        aria = await open_player(browser, "aria-phone", page_url(proxy.base, token("aria", "Aria")))
        borin = await open_player(
            browser, "borin-desktop", page_url(srv.base, token("borin", "Borin")), desktop=True
        )
        for player in (aria, borin):
            await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
        await publish_scene(srv, 1, "The Gate", ["Force the gate", "Climb the wall"])
        for player in (aria, borin):
            await expect(player.page.locator("#scene-title")).to_have_text("The Gate")

        # Aria acts: every screen shows it being resolved, in words.
        await aria.page.get_by_role("button", name="Force the gate").click()
        mine = aria.page.locator("#in-flight li[data-phase='deciding']")
        await expect(mine).to_have_text("You: “Force the gate” — the game master is deciding…")
        theirs = borin.page.locator("#in-flight li")
        await expect(theirs).to_have_text("Aria chooses — the game master is deciding…")
        await expect(aria.page.get_by_role("button", name="Climb the wall")).to_be_disabled()
        action = await mine.get_attribute("data-action-id")
        assert action is not None
        await expect(theirs).to_have_attribute("data-action-id", action)

        # The engine writes its narration piece by piece: both screens show it as it comes.
        stream = f"n-{action[:8]}"
        text = ""
        for index, piece in enumerate(["The gate ", "groans "]):
            await narrate(srv, stream, index, piece, action=action)
            text += piece
            for player in (aria, borin):
                await expect(live_text(player, stream)).to_have_text(text)
                await expect(
                    player.page.locator(f"#live [data-stream-id='{stream}']")
                ).to_have_attribute("data-done", "false")
        await screenshot(aria, name, "1-streaming")
        await screenshot(borin, name, "1-streaming")

        # Aria's network goes down in the middle of the stream; it goes on without her.
        proxy.refusing = True
        assert proxy.cut() >= 1
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "reconnecting")
        # Her party list is visibly stale: nobody is shown as (surely) online.
        await expect(aria.page.locator("#party")).to_have_attribute("data-stale", "true")
        await expect(aria.page.locator("#party-stale")).to_be_visible()
        await expect(aria.page.locator("#members li .hint")).to_have_text(
            ["was online", "was online"]
        )
        for index, piece in enumerate(["and bends ", "under Borin's shoulder, "], start=2):
            await narrate(srv, stream, index, piece, action=action)
            text += piece
            await expect(live_text(borin, stream)).to_have_text(text)
        await expect(live_text(aria, stream)).to_have_text("The gate groans ")
        await screenshot(aria, name, "2-cut-off-mid-stream")

        # Back online: the hello's text so far, shown once, then the live pieces.
        proxy.refusing = False
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        await expect(live_text(aria, stream)).to_have_text(text)
        await expect(aria.page.locator("#party")).to_have_attribute("data-stale", "false")
        # Her action is still in flight (the hello's actions_in_flight).
        await expect(aria.page.locator(f"#in-flight li[data-action-id='{action}']")).to_be_visible()
        await narrate(srv, stream, 4, "and gives way.", done=True, action=action)
        text += "and gives way."
        for player in (aria, borin):
            await expect(live_text(player, stream)).to_have_text(text)
            await expect(
                player.page.locator(f"#live [data-stream-id='{stream}']")
            ).to_have_attribute("data-done", "true")
            # Each piece exactly once in the whole page.
            body = await player.page.locator("body").inner_text()
            assert body.count("groans") == 1, f"{player.name}: {body!r}"
        await screenshot(aria, name, "3-resumed-stream-done")

        # The engine's answer: the final scene replaces the live text on every screen.
        engine.gate.set()
        for player in (aria, borin):
            await expect(player.page.locator("#scene-title")).to_have_text("Scene 2")
            await expect(player.page.locator("#live [data-stream-id]")).to_have_count(0)
            await expect(player.page.locator("#in-flight li")).to_have_count(0)
            await expect(player.page.locator("#now")).to_be_hidden()
        await expect(aria.page.get_by_role("button", name="Go on")).to_be_enabled()
        # One line per action in the story log; the protocol's chatter stays in "details".
        log = await visible_log(borin)
        assert [line for line in log if line.startswith("Aria —")] == ["Aria — success\nIt works."]
        assert "Scene 2: Scene 2" in log, log
        await screenshot(aria, name, "4-final-scene")
        await screenshot(borin, name, "4-final-scene")
        aria.assert_clean()
        borin.assert_clean()


async def test_the_reference_engine_narrates_an_action_on_every_screen(browser: Browser) -> None:
    """``make run``'s engine writes the scene text live (paced here by the test: each piece waits
    for a permit), and the final scene carries exactly the text that was written."""
    permits = asyncio.Semaphore(0)
    free = asyncio.Event()

    async def paced(_seconds: float) -> None:
        if not free.is_set():
            await permits.acquire()

    engine = ReferenceEngine(seed=11, narration_speed=50.0, sleep=paced)
    settings = make_settings(api_key=KEY)
    async with serve_in_process(settings, engine=engine) as srv:
        aria = await open_player(browser, "aria", page_url(srv.base, token("aria", "Aria")))
        borin = await open_player(
            browser, "borin", page_url(srv.base, token("borin", "Borin")), desktop=True
        )
        for player in (aria, borin):
            await expect(player.page.locator("#scene-title")).to_have_text("The Drowned Harbor")
        await aria.page.get_by_role("button", name="Row out to the reef").click()
        await expect(borin.page.locator("#in-flight li")).to_have_text(
            "Aria chooses — the game master is deciding…"
        )
        seen: list[str] = [""]
        for _ in range(3):  # three pieces, one at a time, on both screens
            permits.release()
            grown = await borin.page.wait_for_function(
                """prev => {
                    const text = document.querySelector('#live .live-stream .text')?.textContent;
                    return text && text.length > prev.length && text.startsWith(prev) ? text : null;
                }""",
                arg=seen[-1],
            )
            now = str(await grown.json_value())
            seen.append(now)
            await expect(aria.page.locator("#live .live-stream .text")).to_have_text(now)
        await screenshot(borin, "engine-narration", "1-writing")
        free.set()
        permits.release()
        for player in (aria, borin):
            await expect(player.page.locator("#scene-title")).to_have_text("The Reef Gate")
            await expect(player.page.locator("#in-flight li")).to_have_count(0)
            await expect(player.page.locator("#live [data-stream-id]")).to_have_count(0)
        final = await borin.page.locator("#scene-narration").inner_text()
        assert final.startswith(seen[-1].rstrip()), (seen[-1], final)
        aria.assert_clean()
        borin.assert_clean()


async def test_a_refused_action_is_explained_once_next_to_it(browser: Browser) -> None:
    engine = ScriptedEngine()
    engine.mode = "reject"
    engine.gate = asyncio.Event()
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        aria = await open_player(browser, "aria", page_url(srv.base, token("aria", "Aria")))
        borin = await open_player(browser, "borin", page_url(srv.base, token("borin", "Borin")))
        for player in (aria, borin):
            await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
        await publish_scene(srv, 1, "The Gate", ["Force the gate"])
        await aria.page.get_by_role("button", name="Force the gate").click()
        await expect(borin.page.locator("#in-flight li")).to_have_text(
            "Aria chooses — the game master is deciding…"
        )
        engine.gate.set()
        error = aria.page.locator("#scene-error")
        await expect(error).to_be_visible()
        await expect(error).to_have_text(
            "The game master won't allow that: that option is not open"
        )
        await expect(error).to_have_attribute("data-code", "action_rejected")
        # Once, in words; no raw code anywhere a player reads.
        await expect(aria.page.get_by_text("that option is not open")).to_have_count(1)
        for player in (aria, borin):
            await expect(player.page.locator("#in-flight li")).to_have_count(0)
            assert "action_rejected" not in "\n".join(await visible_log(player))
        await expect(borin.page.locator("#log li:visible").last).to_have_text(
            "Aria's action was not resolved: The game master won't allow that."
        )
        await expect(aria.page.get_by_role("button", name="Force the gate")).to_be_enabled()
        await screenshot(aria, "refused-action", "1-error-in-place")
        aria.assert_clean()
        borin.assert_clean()


BadLink = Callable[[], str]

BAD_LINKS: dict[str, BadLink] = {
    "garbage": lambda: "not-a-token",
    "another-server": lambda: token("aria", "Aria", secret="another-secret-0123456789abcdef0123"),
    "expired": lambda: token("aria", "Aria", ttl=-60.0),
}


@pytest.mark.parametrize("link", sorted(BAD_LINKS))
async def test_an_invalid_link_says_so_instead_of_reconnecting(browser: Browser, link: str) -> None:
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        player = await open_player(browser, f"link-{link}", page_url(srv.base, BAD_LINKS[link]()))
        problem = player.page.locator("#signin-problem")
        await expect(problem).to_be_visible()
        expected = "This link has expired." if link == "expired" else "This link is not valid"
        await expect(problem).to_contain_text(expected)
        await expect(player.page.locator("#status")).to_have_attribute("data-status", "closed")
        await expect(player.page.locator("#signin-text")).to_contain_text(
            "Ask the game for a new link"
        )
        await expect(player.page.locator("#signin-choices button")).to_have_count(0)
        await expect(player.page.locator("#signin-custom")).to_be_hidden()
        status = await player.page.evaluate("window.partySync ? window.partySync.status : 'none'")
        assert status == ("none" if link == "expired" else "closed"), "no retry loop"
        await screenshot(player, "invalid-link", link)
        player.assert_clean()


async def test_in_development_mode_an_invalid_link_offers_the_picker(browser: Browser) -> None:
    settings = make_settings(api_key=KEY)
    async with serve_in_process(settings, engine=ReferenceEngine(seed=3), dev_mode=True) as srv:
        player = await open_player(
            browser, "dev-link", page_url(srv.base, "not-a-token"), desktop=True
        )
        await expect(player.page.locator("#signin-problem")).to_contain_text(
            "This link is not valid"
        )
        await expect(player.page.locator("#status")).to_have_text("Link not valid")
        await screenshot(player, "invalid-link", "dev-picker")
        await player.page.get_by_role("button", name="Play Borin").click()
        await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
        await expect(player.page.locator("#title")).to_have_text("Borin demo-party")
        await expect(player.page.locator("#signin")).to_be_hidden()
        assert "token=" not in player.page.url and "as=borin" in player.page.url
        player.assert_clean()
