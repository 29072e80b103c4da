"""The README documents every setting, and the docs the contracts promise exist."""

from __future__ import annotations

from pathlib import Path

import pytest
from party_sync import config

ROOT = Path(__file__).resolve().parents[4]
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(("flag", "env"), [(o[0], o[1]) for o in config.options()])
def test_readme_documents_every_setting(flag: str, env: str) -> None:
    assert f"`{flag}`" in README and f"`{env}`" in README


def test_readme_settings_table_is_generated_from_config() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "settings_table", ROOT / "scripts/settings_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render(README) == README, "README settings table is stale: run `make docs`"


def test_the_metrics_reference_is_generated_from_the_metrics_module() -> None:
    """docs/metrics.md lists every family a node exports (the operator's probe found families
    no document named)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "metrics_table", ROOT / "scripts/metrics_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    document = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert module.render(document) == document, "docs/metrics.md is stale: run `make docs`"
    for name in ("party_sync_node_info", "party_sync_actions_stream_consumers_active"):
        assert f"`{name}`" in document
    assert "docs/metrics.md" in README


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one() -> None:
    assert "make run" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("doc", ["protocol.md", "architecture.md"])
def test_docs_exist(doc: str) -> None:
    assert (ROOT / "docs" / doc).stat().st_size > 1000
