"""The demo page as a player lives it, in a real headless chromium: narration written live on
every screen (and after a reconnect in the middle of it), actions seen as they happen, an error
in words next to the action (and gone once the fight moves on), a link that does not work (at
the start, or during play), leaving the party, and a closed vote whose choice is being settled
(no option offered meanwhile, the "party decided" banner until the scene it leads to).

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
from party_sync.engine.interface import ActionRequest
from party_sync.protocol.errors import BackendUnavailable
from playwright.async_api import Browser, expect
from ps_testkit.browser import Player, chromium, open_player, screenshot
from ps_testkit.client import wait_until
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


async def at_the_gate(
    browser: Browser, srv: Running, proxy: TcpProxy, aria_name: str, borin_name: str
) -> tuple[Player, Player]:
    """Aria on a phone behind ``proxy`` (the test can cut her off), Borin on a desktop window,
    both connected and shown scene 1, "The Gate"."""
    aria = await open_player(browser, aria_name, page_url(proxy.base, token("aria", "Aria")))
    borin = await open_player(
        browser, borin_name, page_url(srv.base, token("borin", "Borin")), desktop=True
    )
    for player in (aria, borin):
        await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
    await publish_scene(srv, 1, "The Gate", ["Force the gate", "Climb the wall"])
    for player in (aria, borin):
        await expect(player.page.locator("#scene-title")).to_have_text("The Gate")
    return aria, borin


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
        aria, borin = await at_the_gate(browser, srv, proxy, "aria-phone", "borin-desktop")

        # Aria acts: every screen shows it being resolved, in words.
        await aria.page.get_by_role("button", name="Force the gate").click()
        mine = aria.page.locator("#in-flight li[data-phase='deciding']")
        await expect(mine).to_have_text("You chose “Force the gate” — the game master is deciding…")
        theirs = borin.page.locator("#in-flight li")
        await expect(theirs).to_have_text("Aria made a choice — the game master is deciding…")
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
            "Aria made a choice — the game master is deciding…"
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
        # aria's second tab: it did not send the action, and is told of its refusal all the same
        other_tab = await open_player(browser, "aria-2", page_url(srv.base, token("aria", "Aria")))
        for player in (aria, borin, other_tab):
            await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
        await publish_scene(srv, 1, "The Gate", ["Force the gate"])
        await aria.page.get_by_role("button", name="Force the gate").click()
        await expect(borin.page.locator("#in-flight li")).to_have_text(
            "Aria made a choice — the game master is deciding…"
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
        await expect(other_tab.page.locator("#log li:visible").last).to_have_text(
            "Your action from another tab or device was not resolved: "
            "The game master won't allow that."
        )
        await expect(aria.page.get_by_text("from another tab")).to_have_count(0)
        await screenshot(aria, "refused-action", "1-error-in-place")
        aria.assert_clean()
        borin.assert_clean()
        other_tab.assert_clean()


async def test_trying_an_action_again_after_backend_unavailable_keeps_its_action_id(
    browser: Browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Demo probe: after ``backend_unavailable`` (the outcome unknown: the first send may still
    be applied) the player's second click went out under a new action_id, which the docs say
    could apply the action twice. The demo now tries the same action again under its id."""
    engine = ScriptedEngine()
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        assert srv.server is not None
        backend = srv.server.gateway.backend
        original = backend.begin_action
        tried: list[str] = []

        async def unavailable_once(
            party_id: str, character_id: str, action_id: str, *args: Any, **kwargs: Any
        ) -> Any:
            tried.append(action_id)
            if len(tried) == 1:  # Redis did not answer: the player hears backend_unavailable
                raise BackendUnavailable("redis is not answering")
            return await original(party_id, character_id, action_id, *args, **kwargs)

        monkeypatch.setattr(backend, "begin_action", unavailable_once)
        aria = await open_player(browser, "aria", page_url(srv.base, token("aria", "Aria")))
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        await publish_scene(srv, 1, "The Gate", ["Force the gate"])
        gate = aria.page.get_by_role("button", name="Force the gate")
        await gate.click()
        error = aria.page.locator("#scene-error")
        await expect(error).to_have_attribute("data-code", "backend_unavailable")
        await gate.click()
        await expect(error).to_be_hidden()
        await wait_until(lambda: len(engine.calls) == 1)
        assert tried == [tried[0], tried[0]]
        assert engine.calls[0].action_id == tried[0]
        # After an answer, the next action: a new action_id, as before
        await publish_scene(srv, 2, "The Yard", ["Go on"])
        await aria.page.get_by_role("button", name="Go on").click()
        await wait_until(lambda: len(tried) == 3)
        assert tried[2] != tried[0]
        aria.assert_clean()


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


# --- the page stops playing: a link that stops working, leaving -------------------------------


async def clickable(player: Player) -> list[str]:
    """Every control a player can use on the page now: "signin:<what>" inside the sign-in card."""
    found: list[str] = await player.page.evaluate(
        """() => [...document.querySelectorAll(
                'button, input, select, textarea, a[href], [tabindex]')]
            .filter(e => e.getClientRects().length > 0 && !e.disabled)
            .map(e => (e.closest('#signin') ? 'signin:' : '') +
                      (e.id || e.dataset.character || e.textContent.trim()))"""
    )
    return found


PLAYING = ("#party", "#scene", "#now", "#combat", "#vote", "#vote-result", "#leave")


async def expect_only_the_sign_in_card(player: Player, *, dev_mode: bool) -> None:
    """The page shows that it stopped, alone: nothing of the party, nothing to click but the
    picker in development mode."""
    await expect(player.page.locator("#signin")).to_be_visible()
    for panel in PLAYING:
        await expect(player.page.locator(panel)).to_be_hidden()
    controls = await clickable(player)
    if dev_mode:
        assert controls and all(c.startswith("signin:") for c in controls), controls
        assert {"signin:aria", "signin:borin"} <= set(controls), controls
    else:
        assert controls == [], controls


async def block(srv: Running, character: str) -> None:
    """An operator disconnects the character and refuses it for two days (the admin API): longer
    than the client waits for a block to end (a day), so the link is refused for good."""
    async with srv.http.delete(
        f"{srv.base}/api/v1/parties/{PARTY}/members/{character}/connections",
        params={"until": str(time.time() + 2 * 86400)},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        assert response.status == 202, await response.text()


@pytest.mark.parametrize("dev_mode", [False, True], ids=["production", "development"])
@pytest.mark.parametrize("how", ["expires", "refused"])
async def test_a_link_that_stops_working_during_play_leaves_only_its_message(
    browser: Browser, how: str, dev_mode: bool
) -> None:
    """The token expires while the page plays (the server closes with 4001), or the open tab's
    link is refused on its reconnect (an operator's block of two days, 403; a shorter one is
    waited for, see the blocked-for-a-while test): the page says so and shows nothing of the
    party it played in any more (no dead "Leave" button)."""
    settings = make_settings(api_key=KEY)
    # Long enough to see the page play first, short enough to wait for (on the page).
    ttl = 8.0 if how == "expires" else 3600.0
    async with serve_in_process(settings, engine=ScriptedEngine(), dev_mode=dev_mode) as srv:
        aria = await open_player(
            browser, f"stops-{how}-{dev_mode}", page_url(srv.base, token("aria", "Aria", ttl=ttl))
        )
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        await publish_scene(srv, 1, "The Gate", ["Force the gate"])
        await expect(aria.page.locator("#scene-title")).to_have_text("The Gate")
        for panel in ("#party", "#scene", "#leave"):
            await expect(aria.page.locator(panel)).to_be_visible()
        if how == "refused":
            await block(srv, "aria")
            expected = "The server refused this connection"
        else:
            expected = "This link has expired."
        problem = aria.page.locator("#signin-problem")
        await expect(problem).to_contain_text(expected, timeout=int(ttl * 1000) + TIMEOUT)
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "closed")
        await expect(aria.page.locator("#signin-title")).to_have_text("This link does not work")
        await expect_only_the_sign_in_card(aria, dev_mode=dev_mode)
        # The story so far stays readable.
        await expect(aria.page.locator("#log li:visible").first).to_have_text(
            "Scene 1: The Gate", use_inner_text=True
        )
        await screenshot(aria, "link-stops", f"{how}-{'dev' if dev_mode else 'prod'}")
        if dev_mode:
            await aria.page.get_by_role("button", name="Play Borin").click()
            await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
            await expect(aria.page.locator("#title")).to_have_text("Borin demo-party")
            await expect(aria.page.locator("#leave")).to_be_visible()
        aria.assert_clean()


@pytest.mark.parametrize("dev_mode", [False, True], ids=["production", "development"])
async def test_leaving_shows_that_you_left_and_nothing_to_click(
    browser: Browser, dev_mode: bool
) -> None:
    settings = make_settings(api_key=KEY)
    async with serve_in_process(settings, engine=ScriptedEngine(), dev_mode=dev_mode) as srv:
        if dev_mode:  # the page mints its tokens (the demo party); Borin watches from it too
            party = "demo-party"
            aria = await open_player(browser, "leave-dev", f"{srv.base}/demo?as=aria")
            borin = await open_player(browser, "leave-dev-borin", f"{srv.base}/demo?as=borin")
        else:
            party = PARTY
            aria = await open_player(browser, "leave", page_url(srv.base, token("aria", "Aria")))
            borin = await open_player(
                browser, "leave-borin", page_url(srv.base, token("borin", "Borin"))
            )
        for player in (aria, borin):
            await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
            await expect(player.page.locator("#members li")).to_have_count(2)
        leave = aria.page.locator("#leave")
        await expect(leave).to_have_text("Leave the party")
        await leave.click()
        # Honest: the same link brings Aria back, so the page does not say "for good".
        await expect(leave).to_have_text("Tap again to leave")
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        await leave.click()

        await expect(aria.page.locator("#signin-title")).to_have_text("You left the party")
        await expect(aria.page.locator("#status")).to_have_text("Left the party")
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "closed")
        # The header keeps her name (not the lower-case id once the roster dropped her).
        await expect(aria.page.locator("#title")).to_have_text(f"Aria {party}")
        await expect(aria.page.locator("#signin-problem")).to_be_hidden()
        await expect_only_the_sign_in_card(aria, dev_mode=dev_mode)
        await expect(borin.page.locator("#members li")).to_have_count(1)
        await expect(borin.page.locator("#log li:visible").last).to_have_text(
            "Aria left the party", use_inner_text=True
        )
        await screenshot(aria, "left", "dev" if dev_mode else "prod")
        if dev_mode:
            await aria.page.get_by_role("button", name="Play Aria").click()
        else:
            await expect(aria.page.locator("#signin-text")).to_contain_text(
                "open your link to the party again"
            )
            await aria.page.reload()
        # Not for good, as the page said: the link brings her back.
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        await expect(aria.page.locator("#leave")).to_have_text("Leave the party")
        await expect(borin.page.locator("#members li[data-character=aria]")).to_have_attribute(
            "data-online", "true"
        )
        aria.assert_clean()
        borin.assert_clean()


# --- a vote's choice, and errors that go away ---------------------------------------------------


class TwoStepEngine(ScriptedEngine):
    """``ScriptedEngine``'s answer in two steps the test releases: ``action.result`` once
    ``result_gate`` is set, then ``scene.update`` once ``scene_gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.result_gate = asyncio.Event()
        self.scene_gate = asyncio.Event()

    async def handle_action(self, action: ActionRequest) -> None:
        self.calls.append(action)
        assert self.publisher is not None
        await self.result_gate.wait()
        party = action.character_id == "party"
        result: dict[str, Any] = {
            "action_id": action.action_id,
            "character_id": action.character_id,
            "action_type": action.action_type,
            "outcome": "success",
            "state": {"effects": [], "scene_flags": {}}
            if party
            else {"hp": 10, "max_hp": 10, "effects": [], "scene_flags": {}},
            "narration": "It is done.",
        }
        await self.publisher.publish(action.party_id, "action.result", result)
        await self.scene_gate.wait()
        self.scene_number += 1
        scene = {
            "scene_number": self.scene_number,
            "scene_id": f"scene-{self.scene_number}",
            "title": f"Scene {self.scene_number}",
            "narration": "The story goes on.",
            "options": [{"id": "A", "label": "Go on"}],
            "kind": "story",
        }
        await self.publisher.publish(action.party_id, "scene.update", scene)


async def test_after_a_vote_the_options_wait_for_the_scene_the_party_chose(
    browser: Browser,
) -> None:
    """While the party's choice is settled (its action in flight, then until the scene it leads
    to), the scene's options are not offered (the engine would refuse them); the "party decided"
    banner lasts as long, and the next scene.update after the choice's answer ends it."""
    engine = TwoStepEngine()
    engine.scene_number = 1
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        aria = await open_player(browser, "vote-aria", page_url(srv.base, token("aria", "Aria")))
        borin = await open_player(
            browser, "vote-borin", page_url(srv.base, token("borin", "Borin")), desktop=True
        )
        for player in (aria, borin):
            await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
        await publish_scene(srv, 1, "The Gate", ["Force the gate", "Climb the wall"])
        options = [{"id": "o0", "label": "Force the gate"}, {"id": "o1", "label": "Climb the wall"}]
        vote = await api(
            srv,
            "votes",
            {"vote_id": "v-gate", "question": "How?", "options": options, "timeout_s": 60},
        )
        assert vote["vote_id"] == "v-gate"
        for player in (aria, borin):
            await expect(player.page.locator("#vote")).to_be_visible()
            await expect(player.page.locator("#scene-options button")).to_have_count(0)
            await player.page.locator("#vote-options button[data-option=o1]").click()

        # Closed: the party's choice is with the engine (held). No option comes back meanwhile.
        for player in (aria, borin):
            await expect(player.page.locator("#vote")).to_be_hidden()
            banner = player.page.locator("#vote-result")
            await expect(banner).to_have_text("The party decided: “Climb the wall”.")
            await expect(player.page.locator("#in-flight li[data-character=party]")).to_have_text(
                "The party's choice: “Climb the wall” — the game master is deciding…"
            )
            await expect(player.page.locator("#scene-options button")).to_have_count(0)
            hint = player.page.locator("#scene-vote-hint")
            await expect(hint).to_have_attribute("data-reason", "party")
            await expect(hint).to_be_visible()
            await expect(player.page.locator("#skill-check")).to_be_enabled()
        await screenshot(aria, "party-choice", "1-deciding")
        # A page opened now learns it from the hello's actions_in_flight.
        await borin.page.reload()
        await expect(borin.page.locator("#status")).to_have_attribute("data-status", "open")
        await expect(borin.page.locator("#scene-title")).to_have_text("The Gate")
        await expect(borin.page.locator("#in-flight li[data-character=party]")).to_be_visible()
        await expect(borin.page.locator("#scene-vote-hint")).to_be_visible()
        await expect(borin.page.locator("#scene-options button")).to_have_count(0)

        # The choice's answer: not in flight any more, but its scene has not come yet.
        engine.result_gate.set()
        for player in (aria, borin):
            result = player.page.locator("#log li[data-type='action.result']").last
            await expect(result).to_have_text(
                "The party — success\nIt is done.", use_inner_text=True
            )
            await expect(player.page.locator("#in-flight li")).to_have_count(0)
            await expect(player.page.locator("#scene-options button")).to_have_count(0)
        await expect(aria.page.locator("#vote-result")).to_be_visible()

        # The scene the party chose: its options, and the banner is gone.
        engine.scene_gate.set()
        for player in (aria, borin):
            await expect(player.page.locator("#scene-title")).to_have_text("Scene 2")
            await expect(player.page.get_by_role("button", name="Go on")).to_be_enabled()
            await expect(player.page.locator("#scene-vote-hint")).to_be_hidden()
            await expect(player.page.locator("#vote-result")).to_be_hidden()
        # Later actions of that scene do not bring it back.
        await aria.page.get_by_role("button", name="Go on").click()
        for player in (aria, borin):
            await expect(player.page.locator("#scene-title")).to_have_text("Scene 3")
            await expect(player.page.locator("#vote-result")).to_be_hidden()
        await expect(aria.page.locator("#log li[data-type='action.result']").last).to_have_text(
            "You chose “Go on” — success\nIt is done.", use_inner_text=True
        )
        await screenshot(aria, "party-choice", "2-next-scene")
        aria.assert_clean()
        borin.assert_clean()


def combat(round_number: int, enemy_hp: int) -> dict[str, Any]:
    return {
        "active": True,
        "round": round_number,
        "combatants": [
            {"id": "aria", "name": "Aria", "side": "party", "hp": 20, "max_hp": 20},
            {"id": "borin", "name": "Borin", "side": "party", "hp": 20, "max_hp": 20},
            {"id": "wolf", "name": "Grey Wolf", "side": "enemy", "hp": enemy_hp, "max_hp": 9},
        ],
    }


async def test_an_error_goes_away_when_the_fight_moves_on_or_the_next_action_goes_through(
    browser: Browser,
) -> None:
    """An error that arrives after the scene turned into a fight stays only until the fight
    moves on; one about a combat move, until the next move goes through."""
    engine = ScriptedEngine()
    engine.mode = "reject"
    engine.gate = asyncio.Event()
    async with serve_in_process(make_settings(api_key=KEY), engine=engine) as srv:
        aria = await open_player(browser, "errors", page_url(srv.base, token("aria", "Aria")))
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        await publish_scene(srv, 1, "The Gate", ["Force the gate"])
        await aria.page.get_by_role("button", name="Force the gate").click()
        await expect(aria.page.locator("#in-flight li")).to_have_count(1)
        # Meanwhile the story turns into a fight (another player's doing).
        await api(
            srv,
            "events",
            {
                "type": "scene.update",
                "payload": {
                    "scene_number": 2,
                    "scene_id": "ambush",
                    "title": "Ambush",
                    "narration": "Wolves!",
                    "options": [{"id": "run", "label": "Run for it"}],
                    "kind": "combat",
                },
            },
        )
        await api(srv, "events", {"type": "combat.update", "payload": combat(1, 9)})
        await expect(aria.page.locator("#combat")).to_be_visible()

        # The refusal of Aria's choice arrives after the change: shown once, next to the scene.
        engine.gate.set()
        scene_error = aria.page.locator("#scene-error")
        await expect(scene_error).to_have_text(
            "The game master won't allow that: that option is not open"
        )
        await expect(aria.page.locator("#in-flight li")).to_have_count(0)
        await screenshot(aria, "error-clears", "1-error-after-the-change")
        # The fight moves on: the error is old news.
        await api(srv, "events", {"type": "combat.update", "payload": combat(2, 5)})
        await expect(aria.page.locator("#combat-round")).to_have_text("round 2")
        await expect(scene_error).to_be_hidden()

        # A refused combat move: its error, next to the fight's buttons...
        await aria.page.locator("#combat-actions button[data-move=attack]").click()
        combat_error = aria.page.locator("#combat-error")
        await expect(combat_error).to_have_attribute("data-code", "action_rejected")
        await expect(combat_error).to_be_visible()
        # ... until her next move goes through.
        engine.mode = "answer"
        await aria.page.locator("#combat-actions button[data-move=defend]").click()
        await expect(aria.page.locator("#log li[data-type='action.result']").last).to_have_text(
            "You defend — success\nIt works.", use_inner_text=True
        )
        await expect(combat_error).to_be_hidden()
        await expect(scene_error).to_be_hidden()

        # An engine publishes the next scene, then the fight's end: the story tells the end first.
        await publish_scene(srv, 9, "The Clearing", ["Rest"])
        await api(
            srv, "events", {"type": "combat.update", "payload": {**combat(3, 0), "active": False}}
        )
        await expect(aria.page.locator("#combat")).to_be_hidden()
        story = await visible_log(aria)
        assert story[-2:] == [
            "The fight is over: Aria 20/20, Borin 20/20, Grey Wolf 0/9",
            "Scene 9: The Clearing",
        ], story
        aria.assert_clean()


async def test_long_words_stay_within_a_phones_width(browser: Browser) -> None:
    """XSS probe: a display name of 64 letters without a space (the longest a token may carry),
    an option label holding a URL, names and labels of the length the schemas allow made the
    page 1,107 px (and with the longest labels 53,032 px) wide on a 390 px phone: nothing
    broke a long word. Every text the page shows stays within the screen's width."""
    word = "W" * 64
    long_label = "see https://example.org/" + "a" * 80 + " then " + "b" * 190
    async with serve_in_process(make_settings(api_key=KEY), engine=ScriptedEngine()) as srv:
        aria = await open_player(browser, "long-words", page_url(srv.base, token("aria", word)))
        borin = await open_player(browser, "long-words", page_url(srv.base, token("borin", word)))
        for player in (aria, borin):
            await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
        await publish_scene(srv, 1, "T" * 120, [long_label[:200], "Wait"])
        await expect(aria.page.get_by_role("button", name="Wait")).to_be_visible()
        fight = combat(1, 9)
        fight["combatants"][2]["name"] = "N" * 150
        await api(srv, "events", {"type": "combat.update", "payload": fight})
        await expect(aria.page.locator("#combat")).to_be_visible()
        await narrate(srv, "s-long", 0, "x" * 300, done=True, action="a-long")
        widths = await aria.page.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth]"
        )
        await screenshot(aria, "long-words", "1-phone")
        assert widths[0] <= widths[1], widths
        aria.assert_clean()


async def test_an_operators_disconnect_is_said_in_plain_sight(browser: Browser) -> None:
    """Demo probe: disconnected by an operator (4004, no block), the page said only
    "Reconnecting…" while the client waited before reconnecting; it says why, and comes back."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ReferenceEngine(seed=3)) as srv:
        aria = await open_player(browser, "aria", page_url(srv.base, token("aria", "Aria")))
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        async with srv.http.delete(
            f"{srv.base}/api/v1/parties/{PARTY}/members/aria/connections",
            headers={"Authorization": f"Bearer {KEY}"},
        ) as response:
            assert response.status == 202, await response.text()
        told = aria.page.locator("#log li:visible", has_text="An operator disconnected you")
        await expect(told).to_have_count(1)
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        aria.assert_clean()


async def test_a_player_blocked_for_a_while_is_told_and_comes_back_when_it_ends(
    browser: Browser,
) -> None:
    """Blocked by an operator for a few seconds (403 with ``Retry-After`` to every handshake
    meanwhile), the page said the link did not work and gave up for good, until a reload
    (browser probe). It says she is blocked for now, and comes back by itself once the block
    has ended."""
    async with serve_in_process(make_settings(api_key=KEY), engine=ReferenceEngine(seed=3)) as srv:
        aria = await open_player(browser, "blocked", page_url(srv.base, token("aria", "Aria")))
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        async with srv.http.delete(
            f"{srv.base}/api/v1/parties/{PARTY}/members/aria/connections",
            params={"until": str(int(time.time()) + 4)},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as response:
            assert response.status == 202, await response.text()
        told = aria.page.locator("#log li:visible", has_text="An operator has blocked you")
        await expect(told).to_have_count(1)
        await expect(aria.page.locator("#status")).to_have_attribute(
            "data-status", "open", timeout=20_000
        )
        await expect(aria.page.locator("#signin-problem")).to_be_hidden()
        aria.assert_clean()


async def test_a_snapshot_after_time_away_tells_the_story_it_missed(browser: Browser) -> None:
    """Aria is away for more than a resume replays (``max_replay`` 1 here; a restart does the
    same): her page gets a snapshot in a scene her story log never named, with a vote open.
    The log said neither (browser probe: "Scene 2" and "The party votes" missing after a
    restart); it tells both, once, as the pages that stayed saw them."""
    settings = make_settings(api_key=KEY, presence_grace=0.3, max_replay=1)
    async with (
        serve_in_process(settings, engine=ScriptedEngine()) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
    ):
        aria, borin = await at_the_gate(browser, srv, proxy, "away-aria", "away-borin")

        proxy.refusing = True
        assert proxy.cut() >= 1
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "reconnecting")
        await publish_scene(srv, 2, "The Reef", ["Swim", "Wait"])
        options = [{"id": "o0", "label": "Swim"}, {"id": "o1", "label": "Wait"}]
        await api(
            srv, "votes", {"question": "Into the water?", "options": options, "timeout_s": 60}
        )
        await expect(borin.page.locator("#vote")).to_be_visible()

        proxy.refusing = False
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        await expect(aria.page.locator("#scene-title")).to_have_text("The Reef")
        await expect(aria.page.locator("#vote")).to_be_visible()
        for player in (aria, borin):
            story = await visible_log(player)
            assert story.count("Scene 2: The Reef") == 1, (player.name, story)
            assert story.count("The party votes: Into the water?") == 1, (player.name, story)
        aria.assert_clean()
        borin.assert_clean()


async def test_a_ballot_cast_while_the_link_is_down_and_refused_after_the_vote_closed_is_told(
    browser: Browser,
) -> None:
    """Aria votes while her link is down; the vote closes before she is back; her page casts the
    ballot again on reconnecting and the server refuses it (closed). The refusal was shown in the
    vote's card, hidden with the vote, and cleared with it: she never learnt her vote did not
    count (browser probe). Her story log says it, once."""
    settings = make_settings(api_key=KEY, presence_grace=0.3)
    async with (
        serve_in_process(settings, engine=ScriptedEngine()) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
    ):
        aria, borin = await at_the_gate(browser, srv, proxy, "ballot-aria", "ballot-borin")
        options = [{"id": "o0", "label": "Swim"}, {"id": "o1", "label": "Wait"}]
        await api(
            srv,
            "votes",
            {
                "vote_id": "v-late",
                "question": "Into the water?",
                "options": options,
                "timeout_s": 3,
            },
        )
        await expect(aria.page.locator("#vote")).to_be_visible()
        proxy.refusing = True
        assert proxy.cut() >= 1
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "reconnecting")
        await aria.page.locator("#vote-options button[data-option=o0]").click()
        await expect(borin.page.locator("#vote")).to_be_hidden()  # closed (timeout)
        proxy.refusing = False
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        said = aria.page.locator("#log li.error", has_text="Your vote for “Swim” was not counted")
        await expect(said).to_have_count(1)
        await screenshot(aria, "late-ballot", "told")
        aria.assert_clean()
        borin.assert_clean()


async def test_the_result_of_ones_own_action_told_only_as_a_repeat_is_in_the_story(
    browser: Browser,
) -> None:
    """Aria's action is answered while she is away for more than a resume replays (a restart
    that lost the party's state does the same): her page resends it, and its result comes back
    as a repeat, to her only, which settles the action but is no event. Her story jumped from
    "deciding…" to the next scene without its outcome (UX probe); it tells it, once."""
    engine = ScriptedEngine()
    engine.gate = asyncio.Event()  # her action stays in flight until she is gone
    engine.scene_number = 1
    settings = make_settings(api_key=KEY, presence_grace=0.3, max_replay=1)
    async with (
        serve_in_process(settings, engine=engine) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
    ):
        aria, borin = await at_the_gate(browser, srv, proxy, "repeat-aria", "repeat-borin")
        await aria.page.get_by_role("button", name="Force the gate").click()
        mine = aria.page.locator("#in-flight li[data-phase='deciding']")
        await expect(mine).to_be_visible()
        action = await mine.get_attribute("data-action-id")
        proxy.refusing = True
        assert proxy.cut() >= 1
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "reconnecting")
        engine.gate.set()  # answered while she is away: its result and the next scene
        results = "#log li[data-type='action.result']"
        await expect(borin.page.locator(results)).to_have_count(1)
        await expect(borin.page.locator("#scene-title")).not_to_have_text("The Gate")
        proxy.refusing = False
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        told = aria.page.locator(results)
        await expect(told).to_have_count(1)
        await expect(told).to_have_attribute("data-action", action or "")
        await expect(mine).to_have_count(0)
        aria.assert_clean()
        borin.assert_clean()


async def test_the_keyboard_focus_comes_back_to_the_control_after_an_action(
    browser: Browser,
) -> None:
    """A keyboard player acts with Enter: the button is disabled while the game master decides,
    which drops the focus to the page, and it stayed there (UX probe: a keyboard or
    screen-reader player started from the top after every move). It comes back to the control
    once it is usable again."""
    settings = make_settings(api_key=KEY, presence_grace=0.3)
    async with (
        serve_in_process(settings, engine=ScriptedEngine()) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
    ):
        aria, borin = await at_the_gate(browser, srv, proxy, "focus-aria", "focus-borin")
        check = aria.page.locator("#skill-check")
        await check.focus()
        await aria.page.keyboard.press("Enter")
        await expect(aria.page.locator("#log li[data-type='action.result']")).to_have_count(1)
        await expect(check).to_be_enabled()
        await expect(check).to_be_focused()
        aria.assert_clean()
        borin.assert_clean()
