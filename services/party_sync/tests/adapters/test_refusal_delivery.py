"""A refusal is the action's final answer in the ledger, then sent to its sender
(``send_direct``, not in history). Cluster probe: in a resharding the send failed once, the
failure was raised to the engine host, whose retry found the action final and said nothing: the
player heard of it only at the deadline sweep, 10 s later. The send is now tried again for a
moment; past that it is left to the sweep, and never raised (the action is answered)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from party_sync.backends.memory import MemoryBackend
from party_sync.protocol.errors import BackendUnavailable, ErrorCode
from party_sync.protocol.schemas import Contracts
from party_sync.publishing import BackendPublisher
from ps_testkit.hosts import make_action


class FlakyDirect(MemoryBackend):
    """The embedded backend whose ``send_direct`` fails the first ``failures`` times."""

    def __init__(self, failures: int, slow: float = 0.0) -> None:
        super().__init__()
        self.failures = failures
        self.slow = slow  # seconds each failure takes (a command timeout)
        self.sent: list[tuple[str, str, bytes]] = []

    async def send_direct(self, party_id: str, character_id: str, data: bytes) -> None:
        if self.failures > 0:
            self.failures -= 1
            await asyncio.sleep(self.slow)
            raise BackendUnavailable("redis cluster unavailable during publish: TRYAGAIN")
        self.sent.append((party_id, character_id, data))


async def test_a_refusal_whose_send_failed_a_moment_reaches_its_sender() -> None:
    backend = FlakyDirect(failures=2)
    publisher = BackendPublisher(backend, Contracts(), time.time)
    await publisher.fail(make_action("a1"), ErrorCode.ENGINE_ERROR, "the engine failed")
    [(party_id, character_id, data)] = backend.sent
    assert (party_id, character_id) == ("p1", "aria")
    assert b'"engine_error"' in data and b'"a1"' in data


async def test_a_refusal_that_cannot_be_sent_is_left_to_the_sweep_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("party_sync.publishing.TELL_PATIENCE", 0.2)
    backend = FlakyDirect(failures=1_000)
    publisher = BackendPublisher(backend, Contracts(), time.time)
    with caplog.at_level(logging.WARNING, "party_sync.publishing"):
        await publisher.reject(make_action("a2"), "no such option")  # returns
    assert backend.sent == []
    assert any("refusal not delivered" in r.getMessage() for r in caplog.records)
    # the refusal is the action's final answer all the same: a second one records nothing
    await publisher.fail(make_action("a2"), ErrorCode.ENGINE_ERROR, "later")
    assert backend.sent == []


async def test_a_send_that_failed_after_a_whole_timeout_is_still_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cluster probe: in a resharding the first send waited out the 5-s command timeout, longer
    than the whole patience, and was never tried again: the player heard at the deadline. The
    patience counts from the first failure."""
    monkeypatch.setattr("party_sync.publishing.TELL_PATIENCE", 0.2)
    backend = FlakyDirect(failures=1, slow=0.3)
    publisher = BackendPublisher(backend, Contracts(), time.time)
    await publisher.reject(make_action("a3"), "no such option")
    assert [character for _, character, _ in backend.sent] == ["aria"]
