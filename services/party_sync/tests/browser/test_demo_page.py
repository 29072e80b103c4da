"""The demo page in a real headless chromium: two players, actions, a vote, a cut network.

Each player is its own browser context on a phone-sized viewport. The server runs in-process with
the reference engine (seeded dice). Aria's page reaches the server through a TCP proxy, so the
test can cut her network (both ends see the connection drop) and keep it down while the game goes
on. Screenshots go to artifacts/browser/. Live narration, actions in flight, errors in words and
refused links: test_demo_live.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.parse
from typing import Any

import pytest
from campaign_engine import ReferenceEngine
from party_sync.auth import issue_token
from playwright.async_api import Route, expect
from ps_testkit.browser import (
    Player,
    assert_contiguous,
    chromium,
    open_player,
    screenshot,
)
from ps_testkit.client import wait_until
from ps_testkit.proxy import TcpProxy
from ps_testkit.servers import SECRET, make_settings, serve_in_process

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

KEY = "api-key-browser-0123456789abcdef"
PARTY, RUN = "p-browser", "r-browser"
TIMEOUT = 10_000  # ms, for every wait on the page

expect.set_options(timeout=TIMEOUT)


def token(character: str, name: str, *, party: str = PARTY, run: str = RUN) -> str:
    return issue_token(
        SECRET,
        party_id=party,
        campaign_run_id=run,
        character_id=character,
        display_name=name,
        now=time.time(),
        ttl=3600,
    )


def page_url(base: str, token_value: str) -> str:
    # A short backoff cap keeps the reconnect after the cut quick.
    return f"{base}/demo?token={token_value}&backoff_base_ms=200&backoff_cap_ms=800"


async def last_seq(player: Player) -> int:
    seqs = await player.log_seqs()
    return seqs[-1]


async def visible_log(player: Player) -> list[str]:
    """The log as the player sees it (the protocol details are hidden unless asked for)."""
    return [t.strip() for t in await player.page.locator("#log li:visible").all_inner_texts()]


async def test_two_players_act_vote_and_survive_a_network_cut() -> None:
    name = "play"
    settings = make_settings(api_key=KEY, presence_grace=0.3)
    async with (
        serve_in_process(settings, engine=ReferenceEngine(seed=11)) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
        chromium() as browser,
    ):
        aria = await open_player(browser, "aria", page_url(proxy.base, token("aria", "Aria")))
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        await expect(aria.page.locator("#scene-title")).to_have_text("The Drowned Harbor")

        borin = await open_player(browser, "borin", page_url(srv.base, token("borin", "Borin")))
        for player in (aria, borin):
            await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
            for who in ("aria", "borin"):
                member = player.page.locator(f"#members li[data-character={who}]")
                await expect(member).to_have_attribute("data-online", "true")
        await screenshot(aria, name, "1-joined")

        # Aria acts; Borin's page shows her result and the new scene.
        await aria.page.get_by_role("button", name="Row out to the reef").click()
        result = borin.page.locator("#log li[data-type='action.result']").last
        await expect(result).to_contain_text("Aria — success")
        for player in (aria, borin):
            await expect(player.page.locator("#scene-title")).to_have_text("The Reef Gate")
            await expect(player.page.locator("#scene")).to_have_attribute("data-scene-number", "2")
        # The story log keeps what a player needs: the outcome and the new scene, one line each
        # (the party state, tallies and protocol notes are behind the "details" switch).
        story = await visible_log(borin)
        assert len([line for line in story if line.startswith("Aria —")]) == 1, story
        assert "Scene 2: The Reef Gate" in story, story
        assert not any(line.startswith(("Party ", "Vote: ", "Connected")) for line in story), story
        await screenshot(borin, name, "2-after-aria-acted")

        # The reference engine starts a party vote on entering the Reef Gate; cast from both pages.
        vote = {"vote_id": f"{RUN}.s2"}
        for player in (aria, borin):
            panel = player.page.locator("#vote")
            await expect(panel).to_be_visible()
            await expect(panel).to_have_attribute("data-vote-id", vote["vote_id"])
            await expect(player.page.locator("#vote-countdown")).to_have_text(
                # a live countdown to the deadline (60 s)
                re.compile(r"^(1:00|0:[0-5]\d)$")
            )
            # The scene's options are the vote's now: offered once, as ballots, not also as
            # actions the engine would refuse.
            await expect(player.page.locator("#scene-options button")).to_have_count(0)
            await expect(player.page.locator("#scene-vote-hint")).to_be_visible()
            wade = player.page.get_by_role("button", name=re.compile("Wade through the tide pools"))
            await expect(wade).to_have_count(1)
            await expect(player.page.locator("#vote-mine")).to_have_text("You have not voted yet.")
        await aria.page.locator("#vote-options button[data-option=wade]").click()
        await expect(borin.page.locator("#vote-count")).to_have_text("1/2 voted")
        aria_wade = aria.page.locator("#vote-options button[data-option=wade]")
        await expect(aria_wade).to_have_attribute("aria-pressed", "true")
        await expect(aria_wade).to_contain_text("your vote")
        await expect(aria.page.locator("#vote-mine")).to_contain_text(
            "You voted for “Wade through the tide pools”"
        )
        # Borin has not voted: nothing of his is marked.
        await expect(borin.page.locator("#vote-options button[aria-pressed=true]")).to_have_count(0)
        await screenshot(aria, name, "3-vote-open")
        await screenshot(borin, name, "3-vote-open")
        await borin.page.locator("#vote-options button[data-option=wade]").click()
        for player in (aria, borin):
            await expect(player.page.locator("#vote")).to_be_hidden()
            # The party's choice led into a fight: the combat panel with HP bars.
            await expect(player.page.locator("#scene-title")).to_have_text("Reefclaws!")
            await expect(player.page.locator("#combat")).to_be_visible()
            await expect(player.page.locator("#combatants li[data-side=enemy]")).to_have_count(2)
            # The "party decided" banner lasted while the choice was settled (this engine answers
            # at once; test_demo_live.py holds it): the scene it led to ends it, the log keeps it.
            await expect(player.page.locator("#vote-result")).to_be_hidden()
            await expect(
                player.page.locator("#log li:visible", has_text="Vote closed")
            ).to_have_text(
                "Vote closed (all voted): Wade through the tide pools wins", use_inner_text=True
            )
        await screenshot(aria, name, "4-vote-finished-combat")
        # On the phone, the scene's own option stays on the first screen during the fight.
        bottom = await aria.page.locator("#scene-options button").first.evaluate(
            "b => b.getBoundingClientRect().bottom + window.scrollY - window.innerHeight"
        )
        assert bottom <= 0, f"the scene's option ends {bottom}px below the first screen"

        await aria.page.locator("#combat-actions button[data-move=attack]").first.click()
        aria_attack = borin.page.locator("#log li[data-type='action.result']").last
        await expect(aria_attack).to_contain_text("Aria — ")
        await expect(aria.page.locator("#log li[data-type='action.result']").last).to_contain_text(
            "You attack "
        )
        await expect(aria.page.locator("#skill-check")).to_be_enabled()

        # Cut Aria's network and keep it down while Borin fights on.
        before_cut = await last_seq(aria)
        proxy.refusing = True
        assert proxy.cut() >= 1
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "reconnecting")
        # Aria's party list is visibly stale, not green "online".
        await expect(aria.page.locator("#party")).to_have_attribute("data-stale", "true")
        await expect(aria.page.locator("#party-stale")).to_be_visible()
        await expect(aria.page.locator("#members li .hint")).not_to_contain_text(
            [re.compile(r"^online")] * 2
        )
        await expect(borin.page.locator("#members li[data-character=aria]")).to_have_attribute(
            "data-online", "false"
        )
        await borin.page.locator("#combat-actions button[data-move=defend]").click()
        borin_move = borin.page.locator("#log li[data-type='action.result']").last
        await expect(borin_move).to_contain_text("You defend — ")
        missed_until = await last_seq(borin)
        assert missed_until > before_cut + 1, "Aria missed events while cut off"
        assert await last_seq(aria) == before_cut
        await screenshot(aria, name, "5-cut-off")

        # Restore it: Aria's page resumes and its log continues with no gap and no duplicate.
        proxy.refusing = False
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        await expect(aria.page.locator("#log li[data-hello-seq]").last).to_contain_text(
            "resumed after"
        )
        await expect(aria.page.locator(f"#log li[data-seq='{missed_until}']")).to_have_count(1)
        await expect(borin.page.locator("#members li[data-character=aria]")).to_have_attribute(
            "data-online", "true"
        )
        final = await last_seq(borin)
        await expect(aria.page.locator(f"#log li[data-seq='{final}']")).to_have_count(1)
        aria_seqs = await aria.log_seqs()
        borin_seqs = await borin.log_seqs()
        assert_contiguous(aria_seqs, "aria")
        assert_contiguous(borin_seqs, "borin")
        assert aria_seqs[-1] == borin_seqs[-1]
        assert set(range(before_cut + 1, missed_until + 1)) <= set(aria_seqs)
        # Both pages show the same fight.
        borin_hp = await borin.page.locator("#combatants li").evaluate_all(
            "items => items.map(i => [i.dataset.combatant, i.dataset.hp])"
        )
        aria_hp = await aria.page.locator("#combatants li").evaluate_all(
            "items => items.map(i => [i.dataset.combatant, i.dataset.hp])"
        )
        assert aria_hp == borin_hp
        await screenshot(aria, name, "6-resumed")
        await screenshot(borin, name, "6-resumed")

        # Through the fight the banner stayed away; a scene the engine publishes shows everywhere.
        await expect(aria.page.locator("#vote-result")).to_be_hidden()
        async with srv.http.post(
            f"{srv.base}/api/v1/parties/{PARTY}/events",
            json={
                "type": "scene.update",
                "payload": {
                    "scene_number": 4,
                    "scene_id": "beyond",
                    "title": "Beyond the Reef",
                    "narration": "The tide turns.",
                    "options": [{"id": "on", "label": "Press on"}],
                    "kind": "story",
                },
            },
            headers={"Authorization": f"Bearer {KEY}"},
        ) as response:
            assert response.status == 202
        for player in (aria, borin):
            await expect(player.page.locator("#scene-title")).to_have_text("Beyond the Reef")
            await expect(player.page.locator("#vote-result")).to_be_hidden()
        aria.assert_clean()
        borin.assert_clean()


async def test_development_mode_page_mints_a_token_for_a_picked_character() -> None:
    settings = make_settings(api_key=KEY)
    async with (
        serve_in_process(settings, engine=ReferenceEngine(seed=3), dev_mode=True) as srv,
        chromium() as browser,
    ):
        player = await open_player(browser, "dev", f"{srv.base}/demo")
        await expect(player.page.locator("#signin")).to_be_visible()
        await screenshot(player, "dev-mode", "1-picker")
        await player.page.get_by_role("button", name="Play Borin").click()
        await expect(player.page.locator("#status")).to_have_attribute("data-status", "open")
        await expect(player.page.locator("#title")).to_have_text("Borin demo-party")
        await expect(player.page.locator("#scene-title")).to_have_text("The Drowned Harbor")
        assert "as=borin" in player.page.url
        await screenshot(player, "dev-mode", "2-playing")
        player.assert_clean()


async def test_production_mode_page_asks_for_a_token_and_cannot_mint_one() -> None:
    async with (
        serve_in_process(make_settings(api_key=KEY), engine=ReferenceEngine(seed=3)) as srv,
        chromium() as browser,
    ):
        player = await open_player(browser, "prod", f"{srv.base}/demo")
        await expect(player.page.locator("#signin-text")).to_contain_text("connection token")
        await expect(player.page.locator("#signin-choices button")).to_have_count(0)
        await expect(player.page.locator("#status")).to_have_attribute("data-status", "closed")
        status = await player.page.evaluate(
            """async () => (await fetch('/api/v1/dev/token', {method: 'POST',
                 headers: {'Content-Type': 'application/json'},
                 body: JSON.stringify({character_id: 'aria'})})).status"""
        )
        assert status == 404
        player.assert_clean()


INIT_DATA = (
    "query_id=AAHdF6IQAAAAAN0XohDhrOrc"
    "&user=%7B%22id%22%3A279058397%2C%22first_name%22%3A%22Aria%22%7D"
    "&auth_date=1732570000&hash=0123456789abcdef"
)


@pytest.mark.parametrize("launch", ["webapp-object", "url-hash-offline"])
async def test_inside_telegram_the_page_signs_in_with_init_data(launch: str) -> None:
    """The page posts the raw initData to the sign-in endpoint (stubbed here: this test checks
    the page's side of the contract) and plays with the token it gets back."""
    async with (
        serve_in_process(make_settings(api_key=KEY), engine=ReferenceEngine(seed=3)) as srv,
        chromium() as browser,
    ):
        context = await browser.new_context(viewport={"width": 390, "height": 844})
        page = await context.new_page()
        posted: list[Any] = []
        external: list[str] = []

        async def sign_in(route: Route) -> None:
            posted.append(json.loads(route.request.post_data or "null"))
            body = json.dumps({"token": token("aria", "Aria", party="tg-party", run="tg-run")})
            await route.fulfill(status=200, content_type="application/json", body=body)

        async def offline(route: Route) -> None:
            external.append(route.request.url)
            await route.abort("internetdisconnected")

        await page.route("**/api/v1/auth/telegram", sign_in)
        await page.route("https://telegram.org/**", offline)
        url = f"{srv.base}/demo?party=tg-party&character=aria"
        if launch == "webapp-object":
            await page.add_init_script(
                "window.Telegram = {WebApp: {initData: " + json.dumps(INIT_DATA) + ","
                " ready() { window.tgReady = true; }, expand() {}}};"
            )
        else:  # Telegram's launch parameters in the URL hash; telegram-web-app.js unreachable
            url += "#tgWebAppData=" + urllib.parse.quote(INIT_DATA)
        await page.goto(url)
        await expect(page.locator("#status")).to_have_attribute("data-status", "open")
        await expect(page.locator("#title")).to_have_text("Aria tg-party")
        assert posted == [{"init_data": INIT_DATA, "party_id": "tg-party", "character_id": "aria"}]
        if launch == "webapp-object":
            assert await page.evaluate("window.tgReady") is True
            assert external == [], "telegram-web-app.js is not loaded when Telegram is there"
        else:
            assert external == ["https://telegram.org/js/telegram-web-app.js"]


async def test_a_refused_telegram_sign_in_stops_and_says_so() -> None:
    async with (
        serve_in_process(make_settings(api_key=KEY), engine=ReferenceEngine(seed=3)) as srv,
        chromium() as browser,
    ):
        page = await (await browser.new_context(viewport={"width": 390, "height": 844})).new_page()
        calls: list[str] = []

        async def refuse(route: Route) -> None:
            calls.append(route.request.url)
            body = json.dumps({"error": "init_data_expired", "detail": "reopen the Mini App"})
            await route.fulfill(status=401, content_type="application/json", body=body)

        await page.route("**/api/v1/auth/telegram", refuse)
        await page.add_init_script(
            "window.Telegram = {WebApp: {initData: " + json.dumps(INIT_DATA) + "}};"
        )
        await page.goto(f"{srv.base}/demo?party=tg-party&character=aria")
        await expect(page.locator("#signin-text")).to_contain_text("reopen the Mini App")
        await expect(page.locator("#status")).to_have_attribute("data-status", "closed")
        assert len(calls) == 1, "a refused sign-in is not retried"


async def test_a_server_without_telegram_sign_in_says_so_instead_of_reconnecting() -> None:
    """Demo probe: a server with no bot token answers every Telegram sign-in 503
    ``telegram_not_configured``; the page retried it for ever, a blank page saying
    "Reconnecting…", its one explanation hidden among the details. No retry cures that: the page
    stops and says so."""
    async with (
        serve_in_process(make_settings(api_key=KEY), engine=ReferenceEngine(seed=3)) as srv,
        chromium() as browser,
    ):
        page = await (await browser.new_context(viewport={"width": 390, "height": 844})).new_page()
        calls: list[int] = []
        page.on(
            "response",
            lambda r: calls.append(r.status) if r.url.endswith("/api/v1/auth/telegram") else None,
        )
        await page.add_init_script(
            "window.Telegram = {WebApp: {initData: " + json.dumps(INIT_DATA) + "}};"
        )
        await page.goto(f"{srv.base}/demo?party=tg-party&character=aria")
        await expect(page.locator("#signin-text")).to_contain_text(
            "does not take Telegram sign-ins"
        )
        await expect(page.locator("#status")).to_have_attribute("data-status", "closed")
        assert calls == [503], "a sign-in the server cannot take is not retried"


async def test_a_sign_in_that_fails_for_a_while_is_told_in_plain_sight_once() -> None:
    """A 5xx that may pass (party_sync's backend unreachable): retried, and said once where the
    player sees it (it was only among the details), not once per retry."""
    async with (
        serve_in_process(make_settings(api_key=KEY), engine=ReferenceEngine(seed=3)) as srv,
        chromium() as browser,
    ):
        page = await (await browser.new_context(viewport={"width": 390, "height": 844})).new_page()
        answers = [503, 503]

        async def sign_in(route: Route) -> None:
            if answers:
                body = json.dumps({"error": "backend_unavailable", "detail": "retry"})
                await route.fulfill(
                    status=answers.pop(), content_type="application/json", body=body
                )
                return
            body = json.dumps({"token": token("aria", "Aria", party="tg-party", run="tg-run")})
            await route.fulfill(status=200, content_type="application/json", body=body)

        await page.route("**/api/v1/auth/telegram", sign_in)
        await page.add_init_script(
            "window.Telegram = {WebApp: {initData: " + json.dumps(INIT_DATA) + "}};"
        )
        await page.goto(
            f"{srv.base}/demo?party=tg-party&character=aria&backoff_base_ms=100&backoff_cap_ms=300"
        )
        await expect(page.locator("#status")).to_have_attribute("data-status", "open")
        told = [
            line
            for line in await page.locator("#log li:visible").all_inner_texts()
            if "Could not sign in yet" in line
        ]
        assert len(told) == 1 and "backend_unavailable" in told[0], told


async def test_a_scene_restated_after_a_server_restart_is_not_a_new_chapter() -> None:
    """Demo probe: after a restart (the embedded backend's state is gone) the first page back got
    a hello with no scene, then the engine's re-statement of the scene the party was in, which
    it logged as a new chapter: the heading twice in the story log."""
    engine = ReferenceEngine(seed=11)  # the engine keeps the game across party_sync's restart
    heading = "Scene 1: The Drowned Harbor"
    async with contextlib.AsyncExitStack() as stack:
        browser = await stack.enter_async_context(chromium())
        old = serve_in_process(make_settings(api_key=KEY), engine=engine)
        srv = await old.__aenter__()
        proxy = await stack.enter_async_context(TcpProxy(int(srv.base.rsplit(":", 1)[1])))
        aria = await open_player(browser, "aria", page_url(proxy.base, token("aria", "Aria")))
        await expect(aria.page.locator("#scene-title")).to_have_text("The Drowned Harbor")
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        scenes = aria.page.locator("#log li[data-type='scene.update']")
        before = await scenes.count()
        assert (await visible_log(aria)).count(heading) == 1
        await old.__aexit__(None, None, None)  # the server stops: its state goes with it
        again = await stack.enter_async_context(
            serve_in_process(make_settings(api_key=KEY), engine=engine)
        )
        proxy.upstream = ("127.0.0.1", int(again.base.rsplit(":", 1)[1]))
        await expect(aria.page.locator("#log li[data-hello-seq]")).to_have_count(2)
        await expect(aria.page.locator("#status")).to_have_attribute("data-status", "open")
        # the engine's re-statement has arrived (a scene.update in the log, among the details)
        await expect(scenes).to_have_count(before + 1)
        await expect(aria.page.locator("#scene-title")).to_have_text("The Drowned Harbor")
        assert (await visible_log(aria)).count(heading) == 1, await visible_log(aria)


async def test_the_page_reconnects_at_once_when_the_network_comes_back() -> None:
    """Demo probe: back online, the page waited out its backoff (up to 30 s). The browser's
    ``online`` event makes it reconnect now (``reconnectNow``). The backoff here is ten minutes:
    only the event can bring the page back within the test's wait."""
    async with (
        serve_in_process(make_settings(api_key=KEY), engine=ReferenceEngine(seed=3)) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
        chromium() as browser,
    ):
        url = (
            f"{proxy.base}/demo?token={token('aria', 'Aria')}"
            "&backoff_base_ms=600000&backoff_cap_ms=600000"
        )
        aria = await open_player(browser, "aria", url)
        status = aria.page.locator("#status")
        await expect(status).to_have_attribute("data-status", "open")
        assert proxy.cut() >= 1
        await expect(status).to_have_attribute("data-status", "reconnecting")
        await aria.page.evaluate("window.dispatchEvent(new Event('online'))")
        await expect(status).to_have_attribute("data-status", "open", timeout=5_000)


async def test_the_page_checks_its_link_at_once_when_the_device_goes_offline() -> None:
    """Demo probe: the page said "Online" for up to 30 s after the browser went offline (its
    idle ping waits 20 s of silence, then 10 s for an answer). The browser's ``offline`` event
    makes it ping now (``checkNow``), and a link that does not answer within 3 s is dropped and
    reconnected; one that answers stays."""
    async with (
        serve_in_process(make_settings(api_key=KEY), engine=ReferenceEngine(seed=3)) as srv,
        TcpProxy(int(srv.base.rsplit(":", 1)[1])) as proxy,
        chromium() as browser,
    ):
        aria = await open_player(
            browser, "aria", f"{proxy.base}/demo?token={token('aria', 'Aria')}"
        )
        status = aria.page.locator("#status")
        await expect(status).to_have_attribute("data-status", "open")
        pongs = aria.received.count("system.pong")
        await aria.page.evaluate("window.dispatchEvent(new Event('offline'))")
        await wait_until(lambda: aria.received.count("system.pong") > pongs, timeout=5)
        await expect(status).to_have_attribute("data-status", "open")  # a live link answered
        hellos = aria.received.count("system.hello")
        assert proxy.stall() >= 1  # the network gone: the socket stays open, silent
        await aria.page.evaluate("window.dispatchEvent(new Event('offline'))")
        # dropped after 3 s of silence and connected again (the proxy lets new links through),
        # well before the 30 s of the idle ping and its wait
        await wait_until(lambda: aria.received.count("system.hello") > hellos, timeout=15)
        await expect(status).to_have_attribute("data-status", "open")
        aria.assert_clean()
