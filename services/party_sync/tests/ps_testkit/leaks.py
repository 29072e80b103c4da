"""Name the test that made a Redis Cluster client left open.

redis-py's ``RedisCluster`` warns "Unclosed RedisCluster client" from ``__del__``, at whatever
garbage collection finds it: pytest (warnings are errors) fails the test running *then*, often
minutes and tiers after the one that leaked it (a CI run failed so in the security tier). This
plugin writes the creating test's node id on every cluster client and, when one is collected
unclosed, warns with that id first (with warnings as errors, that is the failure reported), so
the failure names where to look.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

_current = ["(outside any test)"]
_init = RedisCluster.__init__
_del = RedisCluster.__del__


def _tracked_init(self: RedisCluster, *args: Any, **kwargs: Any) -> None:
    self._ps_made_in = _current[0]  # type: ignore[attr-defined]
    _init(self, *args, **kwargs)


def _tracked_del(self: RedisCluster, *args: Any, **kwargs: Any) -> None:
    if hasattr(self, "_initialize") and not self._initialize:
        made_in = getattr(self, "_ps_made_in", "(unknown)")
        warnings.warn(
            f"Unclosed RedisCluster client made in {made_in}", ResourceWarning, stacklevel=1
        )
    _del(self, *args, **kwargs)


RedisCluster.__init__ = _tracked_init  # type: ignore[method-assign]
RedisCluster.__del__ = _tracked_del  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    _current[0] = item.nodeid
    try:
        return (yield)
    finally:
        _current[0] = f"(after {item.nodeid})"
