"""The demo page's routes: the page and its assets, and token minting only in development mode."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp import web
from party_sync.transport import demo
from ps_testkit.browser import require_demo_build
from ps_testkit.engines import ScriptedEngine
from ps_testkit.servers import make_settings, serve_in_process


async def test_the_page_and_its_assets_are_served_with_a_strict_policy() -> None:
    require_demo_build()  # never skipped: fails saying how to build, or rebuilds a stale build
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        async with srv.http.get(srv.base + "/demo") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            html = await resp.text()
            csp = resp.headers["Content-Security-Policy"]
            assert resp.headers["Referrer-Policy"] == "no-referrer"  # URLs carry tokens
        assert '<script type="importmap">' in html and "/demo/app.js" in html
        # an icon of its own (empty, inline): a page that names none makes the browser ask for
        # /favicon.ico, a 404 in every player's console (demo probe)
        assert '<link rel="icon" href="data:," />' in html
        assert "default-src 'self'" in csp and "'sha256-" in csp and "unsafe-inline" not in csp
        assert "connect-src 'self'" in csp
        for path in ("/demo/app.js", "/demo/lib/index.js", "/demo/lib/client.js"):
            async with srv.http.get(srv.base + path) as resp:
                assert resp.status == 200, path
                assert resp.content_type == "text/javascript"
        async with srv.http.get(srv.base + "/demo/assets/demo.css") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/css"
        for path in (
            "/demo/lib/nope.js",
            "/demo/lib/index.d.ts",
            "/demo/lib/..%2Fpackage.json",
            "/demo/assets/..%2F..%2Fpackage.json",
            "/demo/assets/app.ts",
        ):
            async with srv.http.get(srv.base + path) as resp:
                assert resp.status == 404, path
        # a typed trailing slash, on both pages (/admin/ was 404: outside new-user probe)
        for page in ("/demo", "/admin"):
            async with srv.http.get(f"{srv.base}{page}/?token=x", allow_redirects=False) as resp:
                assert resp.status == 308, page
                assert resp.headers["Location"] == f"{page}?token=x"
            async with srv.http.get(f"{srv.base}{page}/") as resp:
                assert resp.status == 200, page
                assert resp.content_type == "text/html"


async def test_production_mode_has_no_token_minting() -> None:
    async with serve_in_process(engine=ScriptedEngine()) as srv:
        async with srv.http.get(srv.base + "/demo/config.json") as resp:
            config = await resp.json()
        assert config["dev_mode"] is False
        assert config["telegram_auth_path"] == "/api/v1/auth/telegram"
        async with srv.http.post(
            srv.base + "/api/v1/dev/token", json={"character_id": "aria"}
        ) as resp:
            assert resp.status == 404


async def test_development_mode_mints_tokens_the_server_accepts() -> None:
    async with serve_in_process(make_settings(), engine=ScriptedEngine(), dev_mode=True) as srv:
        async with srv.http.get(srv.base + "/demo/config.json") as resp:
            config = await resp.json()
        assert config["dev_mode"] is True
        assert [c["character_id"] for c in config["characters"]] == ["aria", "borin"]
        async with srv.http.post(
            srv.base + "/api/v1/dev/token", json={"character_id": "cora", "display_name": "Cora"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Control"] == "no-store"
            minted = await resp.json()
        assert (minted["party_id"], minted["campaign_run_id"]) == ("demo-party", "demo-run")
        client, hello = await srv.join("cora", token_value=minted["token"])
        assert hello["payload"]["you"] == "cora"
        assert hello["payload"]["party_id"] == "demo-party"
        assert hello["payload"]["members"][0]["display_name"] == "Cora"
        await client.close()
        async with srv.http.post(srv.base + "/api/v1/dev/token", json={}) as resp:
            assert resp.status == 422  # a character is required
        for body, code in (
            ({"character_id": "party"}, "invalid_request"),
            ({"character_id": "a b"}, "invalid_request"),
            ({"character_id": "aria", "party_id": ""}, "invalid_request"),
            ({"character_id": "aria", "display_name": "x" * 65}, "invalid_display_name"),
            ({"character_id": "aria", "party": "p9"}, "invalid_request"),  # a typo: not ignored
            (["aria"], "invalid_request"),
        ):
            async with srv.http.post(srv.base + "/api/v1/dev/token", json=body) as resp:
                assert resp.status == 422, body
                assert resp.content_type == "application/problem+json"
                assert (await resp.json())["code"] == code, body
        async with srv.http.post(srv.base + "/api/v1/dev/token", data=b"{nope") as resp:
            assert resp.status == 400


async def test_without_a_build_the_page_says_how_to_make_it(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text("{}")
    app = web.Application()
    demo.add_routes(app, dev_mode=False, client_dir=tmp_path)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/demo", "/demo/app.js", "/demo/lib/index.js"):
                async with http.get(base + path) as resp:
                    assert resp.status == 503, path
                    assert "make setup" in await resp.text()
    finally:
        await runner.cleanup()


def test_the_client_directory_is_found_from_the_package() -> None:
    found = demo.find_client_dir()
    assert found is not None and (found / "package.json").is_file()
    assert demo.find_client_dir(Path("/")) is None


def test_an_installed_wheel_serves_its_own_copy_of_the_pages(tmp_path: Path) -> None:
    packaged = tmp_path / "_web"
    assert demo.find_client_dir(packaged=packaged) == demo.find_client_dir()  # none: the checkout
    (packaged / "dist").mkdir(parents=True)
    assert demo.find_client_dir(packaged=packaged) == packaged
    assert demo.find_client_dir(Path("/"), packaged=packaged) is None  # a given start: only there
