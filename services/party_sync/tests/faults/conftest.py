"""The fault tier: real processes, one fault at a time; see ``test_faults.py``."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: the fault tier (real nodes, workers and redis-server, faults injected)"
    )
