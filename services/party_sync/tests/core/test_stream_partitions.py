"""The actions stream's partition layout (engine/partitions.py): the hash every engine computes,
the stream names, the nodes' count key and the mismatch a worker reports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from party_sync.engine.partitions import (
    count_key,
    mismatch,
    parse_count,
    partition_of,
    stream_names,
    stream_of,
)
from redis.crc import key_slot

STREAM = "party_sync:actions"
#: Party ids as tokens and schemas allow them.
PARTY_IDS = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-",
    min_size=1,
    max_size=64,
)


@pytest.mark.parametrize(
    ("party_id", "partitions", "expected"),
    [
        # CRC-32's published check value: crc32("123456789") = 0xCBF43926 = 3421780262.
        ("123456789", 1, 0),
        ("123456789", 2, 0),
        ("123456789", 3, 2),
        ("123456789", 4, 2),
        ("123456789", 8, 6),
        ("p1", 3, 1),  # crc32 0x3F386B33
        ("p1", 4, 3),
        ("party-1", 3, 0),  # crc32 0xFF375EC4
        ("party-1", 8, 4),
        ("Ω-party", 3, 0),  # UTF-8 bytes: crc32 0x2CB8B3C4
        ("Ω-party", 8, 4),
    ],
)
def test_the_partition_is_crc32_of_the_party_id_modulo_n(
    party_id: str, partitions: int, expected: int
) -> None:
    assert partition_of(party_id, partitions) == expected


@given(party_id=PARTY_IDS, partitions=st.integers(min_value=1, max_value=1024))
def test_every_party_has_one_partition_in_range_and_always_the_same(
    party_id: str, partitions: int
) -> None:
    index = partition_of(party_id, partitions)
    assert 0 <= index < partitions
    assert partition_of(party_id, partitions) == index
    assert stream_of(STREAM, partitions, party_id) == stream_names(STREAM, partitions)[index]


def test_many_parties_spread_over_every_partition() -> None:
    counts = [0] * 4
    for n in range(4000):
        counts[partition_of(f"party-{n}", 4)] += 1
    assert all(800 <= count <= 1200 for count in counts), counts


def test_one_partition_is_exactly_the_public_stream() -> None:
    assert stream_names(STREAM, 1) == (STREAM,)
    assert stream_of(STREAM, 1, "any-party") == STREAM


def test_n_partitions_are_named_stream_colon_index() -> None:
    assert stream_names(STREAM, 3) == (
        "party_sync:actions:0",
        "party_sync:actions:1",
        "party_sync:actions:2",
    )
    assert stream_of("game:acts", 3, "p1") == "game:acts:1"


@pytest.mark.parametrize("partitions", [0, -1])
def test_no_partitions_is_refused(partitions: int) -> None:
    with pytest.raises(ValueError, match="partitions"):
        partition_of("p1", partitions)
    with pytest.raises(ValueError, match="partitions"):
        stream_names(STREAM, partitions)


def test_partition_names_have_no_hash_tag_and_their_slots_are_the_documented_ones() -> None:
    """docs/engines.md lists these slots and how they fall on a 3-master cluster's default slot
    split (0-5460, 5461-10922, 10923-16383): 4 partitions reach every master, 3 do not."""
    names = stream_names(STREAM, 4)
    assert not any("{" in name for name in names)
    slots = [key_slot(name.encode()) for name in names]
    assert slots == [506, 4571, 8632, 12697]
    masters = [0 if slot <= 5460 else 1 if slot <= 10922 else 2 for slot in slots]
    assert masters == [0, 0, 1, 2]
    assert key_slot(STREAM.encode()) == 3055


def test_the_count_key_and_its_parsing() -> None:
    assert count_key(STREAM) == "party_sync:actions:partitions"
    assert count_key(STREAM) not in stream_names(STREAM, 8)
    assert parse_count(b"3") == 3
    assert parse_count("1") == 1
    assert parse_count(None) is None
    assert parse_count(b"0") is None
    assert parse_count(b"three") is None


def test_a_mismatch_names_both_counts_and_the_flag_to_use() -> None:
    assert mismatch(3, 3, STREAM) is None
    assert mismatch(3, None, STREAM) is None  # no node has said: nothing to compare
    detail = mismatch(1, 3, STREAM)
    assert detail is not None
    assert "write 3" in detail and "reads 1" in detail
    assert "3 stream(s) it does not read" in detail  # party_sync:actions:0..2
    assert "--actions-stream-partitions 3" in detail
    fewer = mismatch(2, 4, STREAM)
    assert fewer is not None and "2 stream(s) it does not read" in fewer  # :2 and :3
