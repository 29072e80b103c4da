"""The party's Redis key names and their order: both are contracts (``backends/keys.py``).

The names are read by operators and other services; the order is ``KEYS[1..11]`` of every party
script, which ``_lib.lua`` names once (``K_META`` ... ``K_BALLOTS``). Python reads the keys by
field name (``PartyKeys``), so a field moved in one place only would silently swap two keys.
"""

from __future__ import annotations

import re
from importlib import resources

from party_sync.backends.keys import PARTY_KEYS, KeySpace, PartyKeys


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
