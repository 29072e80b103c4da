"""TokenBucket and ConnectionLimits (time passed in)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from party_sync.core.limits import ConnectionLimits, KeyedBuckets, LimitPolicy, TokenBucket


def takes(bucket: TokenBucket, now: float, n: int) -> int:
    return sum(bucket.take(now) for _ in range(n))


def test_a_bucket_starts_full_then_refuses() -> None:
    bucket = TokenBucket(rate=2.0, burst=5.0)
    assert takes(bucket, 100.0, 10) == 5
    assert bucket.take(100.0) is False


def test_a_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=5.0)
    takes(bucket, 0.0, 5)
    assert bucket.take(0.4) is False  # 0.8 token
    assert bucket.take(0.5) is True  # 1.0 token
    assert bucket.take(0.5) is False
    assert takes(bucket, 2.0, 10) == 3  # 1.5 s later: 3 tokens


def test_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=5.0)
    takes(bucket, 0.0, 5)
    assert takes(bucket, 3600.0, 100) == 5


def test_cost_is_spent_whole_or_not_at_all() -> None:
    bucket = TokenBucket(rate=1.0, burst=3.0)
    assert bucket.take(0.0, cost=2.0) is True
    assert bucket.take(0.0, cost=2.0) is False  # 1 token left: nothing spent
    assert bucket.take(0.0, cost=1.0) is True
    assert bucket.take(0.0, cost=4.0) is False  # more than burst: never


def test_a_token_given_back_can_be_taken_again_but_never_past_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=3.0)
    bucket.give_back()  # never used: full already, nothing changes
    assert takes(bucket, 0.0, 10) == 3
    bucket.give_back()
    assert takes(bucket, 0.0, 10) == 1
    bucket.give_back(5.0)
    assert takes(bucket, 0.0, 10) == 3


def test_a_clock_going_backwards_mints_no_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    takes(bucket, 100.0, 2)
    assert takes(bucket, 50.0, 5) == 0
    assert takes(bucket, 51.0, 5) == 1  # refill resumes from the latest time seen


def test_connection_limits_admit_at_the_message_rate() -> None:
    limits = ConnectionLimits(LimitPolicy(messages_per_s=10.0, message_burst=3.0))
    assert [limits.admit(0.0) for _ in range(4)] == [True, True, True, False]
    assert limits.admit(0.1) is True


def test_strikes_close_the_connection_after_the_strike_burst() -> None:
    limits = ConnectionLimits(LimitPolicy(strikes_per_s=1.0, strike_burst=3.0))
    assert [limits.strike(0.0) for _ in range(4)] == [False, False, False, True]
    assert limits.strike(1.0) is False  # one strike forgiven per second
    assert limits.strike(1.0) is True


def test_strikes_and_messages_use_separate_buckets() -> None:
    policy = LimitPolicy(messages_per_s=1.0, message_burst=2.0, strikes_per_s=1.0, strike_burst=2.0)
    limits = ConnectionLimits(policy)
    assert limits.strike(0.0) is False
    assert limits.strike(0.0) is False
    assert limits.admit(0.0) is True  # striking spent no message token
    assert limits.admit(0.0) is True
    assert limits.admit(0.0) is False
    assert limits.strike(0.0) is True


def test_default_policy() -> None:
    limits = ConnectionLimits(LimitPolicy())
    assert sum(limits.admit(0.0) for _ in range(100)) == 60
    assert sum(not limits.strike(0.0) for _ in range(100)) == 20


def test_the_byte_rate_holds_the_message_rate_of_the_largest_messages() -> None:
    """``LimitPolicy.of``: a client sending its largest messages (and their frames' headers) at
    its message rate, burst first, stays within its bytes; twice that does not, for long."""
    size = 4096 + 14  # the message and its largest client frame header
    limits = ConnectionLimits(LimitPolicy.of(20.0, 20.0, 4096))
    now, sent = 0.0, 0
    while now < 60.0:  # a minute at the full rate, after its burst
        while sent < 20 + int(now * 20.0):
            assert limits.admit_bytes(size, now)
            sent += 1
        now += 0.05
    flooding = ConnectionLimits(LimitPolicy.of(20.0, 20.0, 4096))
    admitted = [flooding.admit_bytes(size, n * 0.025) for n in range(2400)]  # 40/s for 60 s
    assert not all(admitted)


def test_the_byte_burst_takes_a_refused_frame_of_four_times_the_size_and_a_mebibyte() -> None:
    tiny = ConnectionLimits(LimitPolicy.of(1.0, 1.0, 1024))
    assert tiny.admit_bytes(1 << 20, 0.0)  # (a socket's read of up to 1 MiB at once)
    assert not tiny.admit_bytes(1, 0.0)
    big = LimitPolicy.of(1.0, 1.0, 1 << 20)
    assert big.byte_burst >= 4 * (1 << 20)


def test_the_default_policy_counts_no_bytes() -> None:
    limits = ConnectionLimits(LimitPolicy())
    assert all(limits.admit_bytes(1 << 30, 0.0) for _ in range(10))


# -- properties --------------------------------------------------------------------------------

rates = st.floats(min_value=0.1, max_value=100.0, allow_nan=False)
bursts = st.floats(min_value=1.0, max_value=50.0, allow_nan=False)
steps: st.SearchStrategy[list[float]] = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=3.0, allow_nan=False)),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, start=st.floats(min_value=0.0, max_value=1e6), dts=steps)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: float, start: float, dts: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now, admitted = start, 0
    for dt in dts:
        now += dt
        admitted += bucket.take(now)
        assert admitted <= burst + rate * (now - start) + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    dts=st.lists(st.floats(min_value=1.0, max_value=5.0), max_size=100),
)
def test_calls_spaced_at_least_one_token_apart_are_all_admitted(
    rate: float, burst: float, dts: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    admitted_at_start = takes(bucket, 0.0, math.floor(burst))
    assert admitted_at_start == math.floor(burst)  # the bucket really starts full
    now = 0.0
    for dt in dts:
        now += dt / rate * 1.0001  # a bit more than one token's worth of time
        assert bucket.take(now) is True


def test_keyed_buckets_refuse_past_the_burst_then_refill_at_the_rate() -> None:
    buckets = KeyedBuckets(rate=2.0, burst=3.0)
    assert buckets.wait("u", 0.0) == 0.0  # never seen: a full bucket
    for _ in range(3):
        assert buckets.wait("u", 0.0) == 0.0
        buckets.spend("u", 0.0)
    assert buckets.wait("u", 0.0) == 0.5  # one token at 2/s
    assert buckets.wait("other", 0.0) == 0.0  # per key
    assert buckets.wait("u", 0.25) == 0.25
    assert buckets.wait("u", 0.5) == 0.0
    buckets.spend("u", 0.5)
    assert buckets.wait("u", 0.5) == 0.5
    assert buckets.wait("u", 100.0) == 0.0  # refilled (to the burst, no more)
    for _ in range(3):
        buckets.spend("u", 100.0)
    assert buckets.wait("u", 100.0) > 0


def test_keyed_buckets_forget_full_buckets_then_the_least_recently_used() -> None:
    buckets = KeyedBuckets(rate=1.0, burst=2.0, max_keys=3)
    for i in range(3):
        buckets.spend(f"k{i}", 0.0)
    buckets.spend("k3", 5.0)  # past max_keys: k0..k2 (full again by 5.0) are forgotten
    assert len(buckets) == 1
    for i in range(4, 8):  # none is full at 5.0: past max_keys the least recently used go
        buckets.spend(f"k{i}", 5.0)
        buckets.spend(f"k{i}", 5.0)
    assert len(buckets) == 3
    assert buckets.wait("k3", 5.0) == 0.0  # k3 forgotten: a full bucket again
    assert all(buckets.wait(f"k{i}", 5.0) == 1.0 for i in (5, 6, 7))  # the newest kept, empty


@given(st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=60))
def test_keyed_buckets_never_let_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    """However the attempts are spaced, the sessions opened (an attempt spends only when
    ``wait`` said 0) stay within burst + rate × elapsed."""
    buckets = KeyedBuckets(rate=2.0, burst=5.0)
    now, opened = 0.0, 0
    for gap in gaps:
        now += gap
        if buckets.wait("u", now) == 0.0:
            buckets.spend("u", now)
            opened += 1
        assert opened <= 5.0 + 2.0 * now + 1e-9
