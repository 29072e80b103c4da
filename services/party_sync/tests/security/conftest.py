"""The security tier (docs/security.md): hostile input through the public surface only.

``make test`` runs it with a CI budget (the whole tier in about two minutes on two cores);
``make test-security-long`` (``PS_SECURITY_LONG=1``) also runs the tests marked
``security_long`` and gives every hypothesis fuzzer ``PS_SECURITY_EXAMPLES`` examples.
"""

from __future__ import annotations

import os

import pytest
from ps_testkit.security_fuzz import LONG


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "security_long: the long security runs (make test-security-long only)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG:
        return
    here = os.path.dirname(__file__)
    long_items = [
        item
        for item in items
        if item.get_closest_marker("security_long") and str(item.path).startswith(here)
    ]
    if long_items:
        config.hook.pytest_deselected(items=long_items)
        items[:] = [item for item in items if item not in long_items]
