"""The party's Redis key names and their order: both are contracts (``backends/keys.py``).

The names are read by operators and other services; the order is ``KEYS[1..11]`` of every party
script, which ``_lib.lua`` names once (``K_META`` ... ``K_BALLOTS``). Python reads the keys by
field name (``PartyKeys``), so a field moved in one place only would silently swap two keys.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest
from party_sync.backends.keys import PARTY_KEYS, KeySpace, PartyKeys, party_channel, slot_tag
from party_sync.backends.redis_fence import first_slot
from redis.crc import key_slot


def test_the_party_keys_keep_their_names() -> None:
    keys = KeySpace("ps").party_keys("p1")
    assert isinstance(keys, tuple)  # passed to a script as it is
    assert keys.meta == "ps:{party:p1}:meta"
    assert list(keys) == [f"ps:{{party:p1}}:{name}" for name in PARTY_KEYS]
    assert PARTY_KEYS == (
        "meta", "history", "members", "names", "online", "state", "presence", "gone", "locks",
        "vote", "ballots",
    )  # fmt: skip


def test_the_lua_prelude_names_the_keys_in_the_same_order() -> None:
    lib = (resources.files("party_sync.backends") / "lua" / "_lib.lua").read_text("utf-8")
    named: dict[int, str] = {}
    for names, indices in re.findall(r"^local (K_[A-Z_, ]+) = (KEYS\[[^\n]+)$", lib, re.M):
        for name, index in zip(
            names.split(", "), re.findall(r"KEYS\[(\d+)\]", indices), strict=True
        ):
            named[int(index)] = name.removeprefix("K_").lower()
    assert [named[i] for i in range(1, len(PartyKeys._fields) + 1)] == list(PARTY_KEYS)
    assert named[len(PARTY_KEYS) + 1] == "action"  # KEYS[12]: an action record, when given


def test_the_keys_outside_the_scripts_keep_their_names() -> None:
    keys = KeySpace("ps")
    assert keys.unapplied("p1") == "ps:{party:p1}:unapplied"  # in the party's slot
    assert keys.unapplied("p1").startswith(keys.tag("p1") + ":")
    assert keys.vote_index() == "ps:vote-index"
    assert keys.directory("p1") == "ps:{party:p1}:directory"


@pytest.mark.parametrize("slot", [0, 1, 5460, 5461, 10922, 10923, 16383])
def test_a_slot_tag_puts_a_key_and_a_channel_in_that_slot(slot: int) -> None:
    keys = KeySpace("ps")
    assert key_slot(keys.shard_fence(slot).encode()) == slot
    assert key_slot(keys.shard_probe_channel("n1", slot).encode()) == slot
    assert keys.shard_fence(slot) == f"ps:fence:{{{slot_tag(slot)}}}"


def test_the_party_channel_is_in_the_slot_of_the_partys_keys() -> None:
    for party_id in ("p1", "mig", "a.b-c:d"):
        slot = key_slot(party_channel(party_id).encode())
        assert all(key_slot(k.encode()) == slot for k in KeySpace().party_keys(party_id))


def test_the_fence_finds_the_first_slot_a_master_serves() -> None:
    master = "id1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 5461-10922 0-3"
    migrating = "id1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected [5->-id2] 7-9"
    other = "id2 127.0.0.1:7001@17001 master - 0 0 2 connected 10923-16383"
    replica = "id3 127.0.0.1:7002@17002 myself,slave id1 0 0 1 connected"
    empty = "id4 127.0.0.1:7003@17003 myself,master - 0 0 4 connected"
    assert first_slot(f"{other}\n{master}\n") == 5461
    assert first_slot(migrating) == 7
    assert first_slot(f"{master.replace('myself,', '')}\n{replica}") is None
    assert first_slot(empty) is None
