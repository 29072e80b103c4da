"""The packages as a user installs them: built, installed into a fresh virtual environment, run.

Both sdists are built from the checkout and each wheel from its sdist (``python -m build``, as
``make dist`` does), so this also proves the sdists build. The wheels go into a new venv (no pip
inside it: the test's pip installs into it with ``--python``) with no checkout in sight: run from
a temporary directory, ``PYTHONPATH`` and every ``PARTY_SYNC_*`` variable cleared. Then
``party-sync serve`` plays a party on the embedded default with the reference engine, ``/demo``
included (the built page is inside the wheel), ``campaign-engine`` runs, and ``--redis-url``
plays the same with ``party-sync engine-worker`` on a private redis-server.

Speed: the dependencies come from a local wheelhouse (``$PS_WHEELHOUSE``, default
``~/.cache/party_sync/wheelhouse``) with ``--no-index``, pinned by requirements.lock; only when it
lacks one (the first run on a machine, or a changed lock) is it filled by ``pip wheel`` from the
index (pip's own cache makes that quick when ``make setup`` has just downloaded the same files).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
from party_sync.backends.keys import ACTIONS_STREAM
from party_sync.engine.stream_monitor import ENGINE_GROUP
from party_sync.protocol.schemas import Contracts
from ps_testkit.redis_server import RedisServer
from ps_testkit.servers import SECRET, Running, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[4]
LOCK = REPO / "requirements.lock"
PACKAGES = ("party_sync", "campaign_engine")


def wheelhouse() -> Path:
    configured = os.environ.get("PS_WHEELHOUSE")
    return Path(configured) if configured else Path.home() / ".cache" / "party_sync" / "wheelhouse"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: nothing that points at the checkout or configures us."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PARTY_SYNC_", "CAMPAIGN_ENGINE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO))
    )
    return {**env, **extra}


def run(*args: str | Path, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def pip(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )


@dataclass(frozen=True)
class Installed:
    home: Path  # the user's working directory (no checkout)
    bin: Path  # the venv's bin/
    wheels: tuple[Path, ...]

    @property
    def python(self) -> Path:
        return self.bin / "python"


def install(venv_python: Path, wheels: list[Path]) -> subprocess.CompletedProcess[str]:
    house = wheelhouse()
    house.mkdir(parents=True, exist_ok=True)
    return pip(
        "--python",
        venv_python,
        "install",
        "-q",
        "--no-compile",  # half the time; the first start compiles what it imports
        "--no-index",
        "--find-links",
        house,
        "-c",
        LOCK,
        *wheels,
    )


def build_hook() -> ModuleType:
    """services/party_sync/hatch_build.py, which puts the schemas and the pages in the package."""
    spec = importlib.util.spec_from_file_location(
        "party_sync_hatch_build", REPO / "services" / "party_sync" / "hatch_build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheel_takes_the_built_pages_only_and_refuses_to_go_without_them(
    tmp_path: Path,
) -> None:
    hook = build_hook()
    client = tmp_path / "clients" / "js"
    for name, text in {
        "demo/index.html": "<html>",
        "demo/demo.css": "body{}",
        "demo/app.ts": "source",
        "demo/tsconfig.json": "{}",
        "dist/index.js": "export {};",
        "dist/index.js.map": "{}",
        "dist/index.d.ts": "export {};",
        "dist/bundle/party-sync-client.js": "bundle",
        "dist/test/test/x.test.js": "test",
    }.items():
        (client / name).parent.mkdir(parents=True, exist_ok=True)
        (client / name).write_text(text)
    with pytest.raises(FileNotFoundError, match="make setup"):
        hook.web_files(tmp_path)  # the page's script is not built
    (client / "dist" / "demo").mkdir()
    (client / "dist" / "demo" / "app.js").write_text("page")
    inside = sorted(target for _, target in hook.web_files(tmp_path))
    assert inside == [
        "_web/demo/demo.css",
        "_web/demo/index.html",
        "_web/dist/demo/app.js",
        "_web/dist/index.js",
    ]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("install")
    out = root / "dist"
    for package in PACKAGES:
        # An sdist, then the wheel built from it: the sdist must hold everything (schemas, pages).
        run(sys.executable, "-m", "build", "--no-isolation", "-o", out, REPO / "services" / package)
    wheels = sorted(out.glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["campaign_engine", "party_sync"]
    assert len(list(out.glob("*.tar.gz"))) == 2
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    venv_python = venv / "bin" / "python"
    done = install(venv_python, wheels)
    if done.returncode != 0:  # the wheelhouse lacks a locked dependency: fill it, once
        house = wheelhouse()
        filled = pip("wheel", "-q", "-w", house, "-c", LOCK, *wheels)
        assert filled.returncode == 0, filled.stderr
        for ours in PACKAGES:  # only the dependencies stay there, never a stale build of ours
            for stale in house.glob(f"{ours}-*"):
                stale.unlink()
        done = install(venv_python, wheels)
    assert done.returncode == 0, done.stderr
    home = root / "home"
    home.mkdir()
    yield Installed(home=home, bin=venv / "bin", wheels=tuple(wheels))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def user(installed: Installed, tmp_path: Path) -> Installed:
    """The installed packages, used from a fresh working directory of this test's own (the
    reference engine keeps its SQLite database there)."""
    return replace(installed, home=tmp_path)


def test_the_wheels_hold_the_schemas_the_page_and_the_type_marker(installed: Installed) -> None:
    code = (
        "import json, sys, importlib.resources as r, party_sync, campaign_engine\n"
        "from party_sync.protocol.schemas import Contracts\n"
        "from party_sync.transport.demo import find_client_dir\n"
        "c = Contracts()\n"
        "print(json.dumps({'files': [party_sync.__file__, campaign_engine.__file__],\n"
        "  'path': sys.path, 'contracts': str(c.directory), 'engine': sorted(c.engine_documents),\n"
        "  'web': str(find_client_dir()),\n"
        "  'typed': [r.files(p).joinpath('py.typed').is_file()\n"
        "            for p in ('party_sync', 'campaign_engine')]}))\n"
    )
    found = json.loads(run(installed.python, "-c", code, cwd=installed.home, env=clean_env()))
    site = str(installed.bin.parent)
    assert all(f.startswith(site) for f in found["files"]), found["files"]
    assert not [p for p in found["path"] if p.startswith(str(REPO))], found["path"]
    assert found["contracts"].startswith(site) and found["contracts"].endswith("_contracts")
    assert found["engine"] == sorted(Contracts().engine_documents), found["engine"]
    assert found["web"].startswith(site) and found["web"].endswith("_web")
    assert found["typed"] == [True, True]
    described = run(installed.bin / "campaign-engine", "describe", cwd=installed.home)
    assert "Sunken Lantern" in described


@contextlib.asynccontextmanager
async def process(
    installed: Installed, *args: str, env: Mapping[str, str], name: str
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """One installed command, its output in a log file; stopped with SIGTERM at the end."""
    log = installed.home / f"{name}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(installed.bin / args[0]), *args[1:]],
            cwd=installed.home,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait)


@contextlib.asynccontextmanager
async def serve(installed: Installed, *args: str) -> AsyncIterator[Running]:
    port = free_port()
    env = clean_env(PARTY_SYNC_JWT_SECRET=SECRET, PARTY_SYNC_LOG_LEVEL="WARNING")
    cmd = ("party-sync", "serve", "--port", str(port), *args)
    async with (
        process(installed, *cmd, env=env, name=f"serve-{port}") as proc,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                log = (installed.home / f"serve-{port}.log").read_text()
                raise AssertionError(f"party-sync serve exited {proc.returncode}:\n{log[-3000:]}")
            assert time.monotonic() < deadline, "party-sync serve did not become healthy"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(base + "/healthz") as resp:
                    if resp.status == 200:
                        break
            await asyncio.sleep(0.05)  # polling for a condition (the process listening), bounded
        yield Running(base, http, process=proc)


async def play_one_action(srv: Running, installed: Installed) -> None:
    """Join, see the reference engine's opening scene, choose and get the result (the logs of
    every process in the message when something does not come)."""
    try:
        await _play(srv)
    except TimeoutError:
        logs = "\n".join(
            f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(installed.home.glob("*.log"))
        )
        raise AssertionError(f"the party did not play:\n{logs}") from None


async def _play(srv: Running) -> None:
    aria, hello = await srv.join("aria")
    assert hello["payload"]["you"] == "aria"
    opening = await aria.until("scene.update", timeout=30)
    option = opening["payload"]["options"][0]["id"]
    await aria.act("install-1", "aria", "r1", action_type="choice", payload={"option": option})
    result = await aria.until("action.result", timeout=30)
    assert result["payload"]["action_id"] == "install-1"
    assert result["payload"]["outcome"] in {"success", "failure", "partial"}
    await aria.close()


async def test_embedded_serve_plays_and_serves_the_pages(user: Installed) -> None:
    async with serve(user) as srv:
        async with srv.http.get(srv.base + "/demo") as resp:
            assert resp.status == 200
            html = await resp.text()
        assert '<script type="module" src="/demo/app.js">' in html
        for path, kind in (
            ("/demo/app.js", "text/javascript"),
            ("/demo/lib/index.js", "text/javascript"),
            ("/demo/lib/client.js", "text/javascript"),
            ("/demo/assets/demo.css", "text/css"),
            ("/demo/config.json", "application/json"),
            ("/admin", "text/html"),  # the operators' page, built the same way
            ("/admin/app.js", "text/javascript"),
        ):
            async with srv.http.get(srv.base + path) as resp:
                assert resp.status == 200, path
                assert resp.content_type == kind, path
        await play_one_action(srv, user)


async def worker_listening(redis: RedisServer, worker: subprocess.Popen[bytes]) -> None:
    """Until the engine worker reads the actions stream as a consumer of its group."""
    deadline = time.monotonic() + 30
    while True:
        assert worker.poll() is None, f"party-sync engine-worker exited {worker.returncode}"
        assert time.monotonic() < deadline, "party-sync engine-worker did not start reading"
        reply = redis.command("XINFO", "CONSUMERS", ACTIONS_STREAM, ENGINE_GROUP)
        if reply.startswith(b"*") and not reply.startswith(b"*0"):
            return
        await asyncio.sleep(0.05)  # polling for a condition (the worker's first read), bounded


@pytest.mark.redis
async def test_redis_mode_plays_with_an_engine_worker(user: Installed) -> None:
    redis = RedisServer()
    redis.start()
    try:
        env = clean_env(PARTY_SYNC_LOG_LEVEL="WARNING")
        cmd = ("party-sync", "engine-worker", "campaign_engine:create_engine")
        async with process(user, *cmd, "--redis-url", redis.url, env=env, name="worker") as w:
            await worker_listening(redis, w)
            async with serve(user, "--redis-url", redis.url) as srv:
                async with srv.http.get(srv.base + "/readyz") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["backend"] == {"name": "redis", "ok": True}
                await play_one_action(srv, user)
    finally:
        redis.close()
