"""The nodes' shared settings as engine workers read them (``backends/shared_settings.py``):
only what a node writes is taken; anything else in the key is ignored, never half taken."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from party_sync.backends import shared_settings
from party_sync.config import Settings


def test_what_a_node_writes_is_what_a_worker_reads() -> None:
    values = shared_settings.values_of(Settings(party_ttl=60, history_size=50))
    assert shared_settings.decode(shared_settings.encode(values)) == values
    assert shared_settings.differences(values, values) == []
    other = {**values, "party_ttl": 90.0}
    assert shared_settings.differences(values, other) == ["party_ttl 90 (this process: 60)"]
    assert shared_settings.differences(values, other, "until now") == [
        "party_ttl 90 (until now: 60)"
    ]


@pytest.mark.parametrize(
    "raw",
    [None, b"", b"not json", b"[]", b"{}", b'{"party_ttl": 60}', b"\xff\xfe"],
)
def test_a_key_that_is_not_a_nodes_is_ignored(raw: Any) -> None:
    assert shared_settings.decode(raw) is None


@given(
    st.dictionaries(
        st.sampled_from(shared_settings.SHARED),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False),
            st.text(),
        ),
    )
)
def test_any_value_is_taken_whole_or_not_at_all(data: dict[str, Any]) -> None:
    decoded = shared_settings.decode(orjson.dumps(data))
    if decoded is not None:
        assert set(shared_settings.SHARED) - shared_settings.OPTIONAL <= set(decoded)
        assert set(decoded) <= set(shared_settings.SHARED)
        assert all(value >= 0 for value in decoded.values())


def test_a_key_written_by_a_node_of_an_earlier_release_is_taken_without_the_newer_settings() -> (
    None
):
    """``api_max_body_bytes`` joined the shared settings later: a key without it is still the
    nodes' (the worker keeps its own bound for it), and is no difference."""
    values = shared_settings.values_of(Settings(api_max_body_bytes=4096))
    older = {name: value for name, value in values.items() if name != "api_max_body_bytes"}
    decoded = shared_settings.decode(orjson.dumps(older))
    assert decoded == older
    assert shared_settings.differences(values, decoded) == []
    newer = shared_settings.decode(shared_settings.encode(values))
    assert newer is not None and newer["api_max_body_bytes"] == 4096
    assert shared_settings.differences(shared_settings.values_of(Settings()), newer) == [
        "api_max_body_bytes 4096 (this process: 262144)"
    ]
