"""The embedded backend's own bookkeeping (what the shared contract tests cannot see)."""

from __future__ import annotations

from party_sync.backends.base import BackendSettings
from party_sync.backends.memory import MemoryBackend
from party_sync.core.binding import Binding


async def test_a_run_whose_parties_all_expired_is_forgotten() -> None:
    """A soak found one empty entry per campaign run ever seen (600 runs, 0 parties), and each
    party's expiry walked all of them: a run goes once its last party expired."""
    backend = MemoryBackend(BackendSettings(presence_ttl=1.0, idle_party_ttl=10.0))
    now = 1_000.0
    for n in range(50):
        binding = Binding(f"p{n}", f"run{n % 25}", "aria", "Aria")
        await backend.connect(binding, f"c{n}", now, "t" * 32)
        await backend.disconnect(binding, f"c{n}", now)
    assert len(backend._runs) == 25
    assert await backend.run_parties("run3") == ["p28", "p3"]
    await backend.expire(now + 100.0)
    assert backend._runs == {} and backend._parties == {}
    assert await backend.run_parties("run3") == []
