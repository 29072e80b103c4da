"""``PublishedKeys``: the first event's seq under a key stands for ``record_ttl``; old keys are
collected by age and by count. Virtual time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from party_sync.core.published import PublishedKeys, replayed


def test_the_first_event_under_a_key_stands_until_its_ttl() -> None:
    keys = PublishedKeys(record_ttl=60.0)
    assert keys.first("k", 0.0) is None
    keys.record("k", 1, 10.0)
    assert keys.first("k", 10.0) == 1
    assert keys.first("k", 69.9) == 1
    assert keys.first("k", 70.0) is None  # expired: a publish under it is new again
    keys.record("k", 7, 70.0)
    assert keys.first("k", 70.0) == 7
    assert keys.first("other", 70.0) is None


def test_expired_keys_are_collected_oldest_first_and_the_count_is_bounded() -> None:
    keys = PublishedKeys(record_ttl=10.0, max_keys=3)
    for i in range(5):
        keys.record(f"k{i}", i, float(i))
    assert len(keys) == 3  # k0, k1 gone by count
    assert [keys.first(f"k{i}", 4.0) for i in range(5)] == [None, None, 2, 3, 4]
    keys.collect(13.5)  # k2 (10 + 2 + ... expires at 12) and k3 (13) expired
    assert len(keys) == 1 and keys.first("k4", 13.5) == 4


@given(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.floats(min_value=0, max_value=5)),
        max_size=40,
    )
)
def test_a_key_answers_the_event_recorded_under_it_within_the_ttl(
    steps: list[tuple[str, float]],
) -> None:
    """Against a model: publishing under a key returns what the model says stands, else records."""
    keys = PublishedKeys(record_ttl=3.0, max_keys=1_000)
    model: dict[str, tuple[int, float]] = {}
    now = 0.0
    for n, (key, step) in enumerate(steps):
        now += step
        kept = model.get(key)
        expected = kept[0] if kept is not None and kept[1] > now else None
        assert keys.first(key, now) == expected
        if expected is None:
            keys.record(key, n, now)
            model[key] = (n, now + 3.0)
    assert len(keys) <= len(model)


def _message(kind: str, action_id: str = "") -> dict[str, object]:
    payload = {"action_id": action_id} if kind == "action.result" else {}
    return {"type": kind, "payload": payload, "trace_id": "t"}


@given(
    st.lists(
        st.tuples(st.sampled_from(["action.result", "scene.update"]), st.sampled_from("abc")),
        max_size=6,
    ),
    st.sets(st.sampled_from("abc")),
)
def test_an_answer_is_a_replay_only_when_every_result_in_it_is_out_already(
    events: list[tuple[str, str]], answered: set[str]
) -> None:
    """``replayed``: a late copy of an answer (publish nothing) exactly when it holds a result
    and every result's action has one already; the earlier results in their places."""
    messages = [_message(kind, a) for kind, a in events]
    found = replayed(messages, lambda a: f"r-{a}".encode() if a in answered else None)
    results = [a for kind, a in events if kind == "action.result"]
    if not results or any(a not in answered for a in results):
        assert found is None
        return
    assert found == [f"r-{a}".encode() if kind == "action.result" else None for kind, a in events]


def test_a_request_of_another_shape_under_a_key_is_refused() -> None:
    from party_sync.core.published import shape
    from party_sync.protocol.errors import IdempotencyKeyReused

    keys = PublishedKeys(record_ttl=60.0)
    one, three = shape([{}]), shape([{}, {}, {}])
    keys.record("k", 4, 0.0, one)
    assert keys.first("k", 1.0, one) == 4
    assert keys.first("k", 1.0) == 4  # (a caller that does not say: as before)
    try:
        keys.first("k", 1.0, three)
    except IdempotencyKeyReused:
        pass
    else:
        raise AssertionError("a batch of three under a single event's key was answered")
    assert keys.first("k", 61.0, three) is None  # expired: the key is free again
