"""``engine.loader.load_engine``: ``MODULE:ATTR`` specs, their errors, and a module in the working
directory (what a console script run next to ``mymodule.py`` is given)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from party_sync.engine.loader import load_engine
from party_sync.protocol.errors import ConfigError, EngineStartError

ENGINE = """
class Engine:
    async def start(self, publisher): ...
    async def handle_action(self, action): ...
    async def handle_join(self, notice): ...
    async def close(self): ...

def create_engine():
    return Engine()

NOT_AN_ENGINE = 42
"""


@pytest.fixture
def in_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory is ``tmp_path`` and, as for a console script, not on sys.path."""
    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", here)])
    return tmp_path


def test_an_engine_module_in_the_working_directory_is_found(in_a_directory: Path) -> None:
    (in_a_directory / "ps_loader_probe_engine.py").write_text(ENGINE)
    try:
        engine = load_engine("ps_loader_probe_engine:create_engine")
        assert type(engine).__name__ == "Engine"
        assert sys.path[-1] == str(in_a_directory)  # after what is installed: never shadows
    finally:
        sys.modules.pop("ps_loader_probe_engine", None)


def test_an_engine_class_is_a_factory_of_its_engines(in_a_directory: Path) -> None:
    """New-user probe: ``--engine echo_engine:EchoEngine`` (the class, not a factory function)
    passed the runtime protocol check as it was (the class has the methods) and failed at start:
    "start() missing 1 required positional argument: 'publisher'". The class is called; an
    instance named so is taken as it is."""
    (in_a_directory / "ps_loader_class_engine.py").write_text(ENGINE + "\nTHE_ONE = Engine()\n")
    try:
        engine = load_engine("ps_loader_class_engine:Engine")
        assert type(engine).__name__ == "Engine" and not isinstance(engine, type)
        module = sys.modules["ps_loader_class_engine"]
        assert load_engine("ps_loader_class_engine:THE_ONE") is module.THE_ONE
    finally:
        sys.modules.pop("ps_loader_class_engine", None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "MODULE:ATTR"),
        (":attr", "MODULE:ATTR"),
        ("ps_no_such_module_anywhere:x", "cannot import engine module 'ps_no_such_module"),
        ("ps_loader_bad_engine:missing", "has no attribute 'missing'"),
        ("ps_loader_bad_engine:NOT_AN_ENGINE", "neither an Engine"),
    ],
)
def test_a_bad_spec_is_a_configuration_error(in_a_directory: Path, spec: str, message: str) -> None:
    (in_a_directory / "ps_loader_bad_engine.py").write_text(ENGINE)
    try:
        with pytest.raises(ConfigError, match=message):
            load_engine(spec)
    finally:
        sys.modules.pop("ps_loader_bad_engine", None)


def test_a_missing_import_inside_the_module_is_not_hidden(in_a_directory: Path) -> None:
    (in_a_directory / "ps_loader_broken.py").write_text("import ps_missing_dependency_xyz\n")
    try:
        with pytest.raises(ConfigError, match="ps_missing_dependency_xyz"):
            load_engine("ps_loader_broken:create_engine")
    finally:
        sys.modules.pop("ps_loader_broken", None)
        assert os.getcwd() == str(in_a_directory)


def test_the_reference_engine_missing_says_it_is_a_package_of_its_own(
    in_a_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The party_sync wheel installed alone: the default engine cannot be imported, and the
    message says what it is and how to name another."""
    monkeypatch.setitem(sys.modules, "campaign_engine", None)  # as if not installed
    with pytest.raises(ConfigError) as raised:
        load_engine("campaign_engine:create_engine")
    message = str(raised.value)
    assert "reference Campaign Engine" in message and "--engine MODULE:ATTR" in message
    with pytest.raises(ConfigError) as other:
        load_engine("not_installed_engine_xyz:create_engine")
    assert "reference Campaign Engine" not in str(other.value)


def test_a_factory_refusing_its_settings_is_a_configuration_error(in_a_directory: Path) -> None:
    """CAMPAIGN_ENGINE_SEED=abc made serve, engine-http and engine-worker die with a 20-line
    traceback; a factory's ValueError is a setting's problem: one line, exit 2."""
    (in_a_directory / "picky_engine.py").write_text(
        "def create():\n    raise ValueError('PICKY_SEED must be an integer, got \\'abc\\'')\n"
    )
    with pytest.raises(ConfigError, match="picky_engine:create: PICKY_SEED must be an integer"):
        load_engine("picky_engine:create")


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        (
            "def create():\n    raise RuntimeError('MY_ENGINE_TOKEN is not set')\n",
            "failing_engine:create",
            "failing_engine:create: RuntimeError: MY_ENGINE_TOKEN is not set",
        ),
        ("def create(:\n", "failing_engine:create", "importing 'failing_engine': SyntaxError"),
        (
            "raise KeyError('MY_ENGINE_TOKEN')\n",
            "failing_engine:create",
            "importing 'failing_engine': KeyError: 'MY_ENGINE_TOKEN'",
        ),
        ("", "json:dumps", "json:dumps: TypeError"),  # a callable that is no factory
    ],
)
def test_an_engine_that_raises_as_it_loads_is_one_line_not_a_traceback(
    in_a_directory: Path, source: str, spec: str, message: str
) -> None:
    """A factory (or the module, as it is imported) that raises something other than a
    ValueError stopped ``serve`` with a 22-line traceback (49 for a syntax error) where the
    README promises one line: ``party-sync: the engine could not start: …`` (exit 1)."""
    (in_a_directory / "failing_engine.py").write_text(source)
    with pytest.raises(EngineStartError) as raised:
        load_engine(spec)
    assert str(raised.value).startswith("the engine could not start: " + message)
    assert "\n" not in str(raised.value)
    sys.modules.pop("failing_engine", None)
