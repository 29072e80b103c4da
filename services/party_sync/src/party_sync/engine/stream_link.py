"""The Redis Streams engine link: accepted actions are appended to a stream (docs/engines.md).

Entry fields (all strings; never pickle):

- ``kind``: ``action`` | ``join`` | ``restate``;
- ``party_id`` and ``campaign_run_id``;
- ``envelope``: the whole JSON envelope (``action.request``, ``party.join``, or
  ``party.restate`` = ``{"type": "party.restate", "timestamp", "trace_id",
  "payload": {"epoch": …}}``, see ``party_sync.engine.wire``);
- ``deadline`` (actions only, absent when the action has none): decimal Unix seconds after which
  the action must not be *started* (``ActionRequest.deadline``);
- ``traceparent`` (optional; only while tracing is on): the W3C trace context of the append, so
  the worker's spans join the action's trace (``party_sync.tracing``);
- ``prefix`` (optional): the appending node's ``redis_prefix``, the deployment the entry is of;
  ``party-sync engine-worker`` runs none of another deployment's (a worker given the wrong
  ``--redis-prefix`` would answer in other keys: another deployment's party of the same id).

Engines consume the stream with a consumer group (``party-sync engine-worker``): delivery is at
least once, an entry stays pending until the engine acknowledges it, and a dead worker's entries
are reclaimed by another. Before starting an action the worker claims it (``LinkHost.claim``), so
an action that waited past its deadline (no worker running) is refused with ``action_timeout``
and never applied later.

Restate notices (``notify_restate``) travel the same stream, so a party's lost state is re-stated
by whichever worker is up, at least once: a notice whose append fails (its partition's Redis or
master down, stalled, failing over) is appended again in the background, with a capped backoff,
until it is or ``give_up_after`` (``action_record_ttl``) has passed, as the HTTP link tries a
notice (a newer notice for the party replaces one still being tried).

**Partitions** (``actions_stream_partitions`` = N, ``party_sync.engine.partitions``): with N > 1
every entry of a party goes to the stream ``<stream>:<crc32(party_id) mod N>``, so one party's
entries stay in order in one stream and, on a Redis Cluster, the streams spread over slots. The
link writes N to ``<stream>:partitions`` when it starts and again after an append failed, and
writes it every ``COUNT_REFRESH`` seconds while it runs if the key is missing (Redis may have come
back empty, or been flushed without a failed command), so engine workers can check they read the
same partitions; it logs a WARNING when that key held another count (the partition count
changed, or the nodes disagree; once per count seen).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import orjson
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from party_sync import tracing
from party_sync.backends import shared_settings
from party_sync.backends.redis_connect import RedisTarget, make_any_client, stale_socket_retry
from party_sync.engine import partitions as layout
from party_sync.engine import wire
from party_sync.engine.health import Periodic
from party_sync.engine.interface import ActionRequest, JoinNotice, LinkHost, RestateNotice
from party_sync.protocol.errors import BackendUnavailable
from party_sync.tasks import (
    Episode,
    LatestPerKey,
    cancel_and_wait,
    described,
    retried,
    spawn_kept,
)

log = logging.getLogger(__name__)

#: Seconds between two writes of the partition count while the link runs.
COUNT_REFRESH = 5.0
#: Seconds before a restate notice whose append failed is appended again, then doubling up to
#: ``RESTATE_RETRY_MAX``.
RESTATE_RETRY_FIRST = 0.05
RESTATE_RETRY_MAX = 2.0


def entry(
    kind: str,
    party_id: str,
    campaign_run_id: str,
    envelope: Any,
    deadline: float | None = None,
    traceparent: str | None = None,
) -> dict[str, bytes]:
    """The fields of one stream entry (see the module docstring)."""
    fields = {
        "kind": kind.encode(),
        "party_id": party_id.encode(),
        "campaign_run_id": campaign_run_id.encode(),
        "envelope": orjson.dumps(envelope),
    }
    if deadline is not None:
        fields["deadline"] = wire.format_deadline(deadline).encode()
    if traceparent is not None:
        fields["traceparent"] = traceparent.encode()
    return fields


class StreamEngineLink:
    #: The stream worker claims each action right before it starts (``EngineLink``).
    claims_on_accept = False

    def __init__(
        self,
        redis_url: str | RedisTarget,
        stream: str,
        maxlen: int,
        *,
        partitions: int = 1,
        timeout: float = 5.0,
        prefix: str | None = None,
        max_connections: int | None = None,
        client_name: str | None = None,
        give_up_after: float = 600.0,
        shared: tuple[str, bytes] | None = None,
    ) -> None:
        """``shared``: the key and value of the nodes' shared settings (``shared_settings``),
        written when the link starts and again if it goes missing, for the engine workers;
        ``timeout``: the most one append may wait for Redis (``redis_command_timeout``);
        ``give_up_after``: how long a restate notice is appended again (``action_record_ttl``);
        ``max_connections``: its pool's bound (``redis_max_connections``; redis_connect.py);
        ``client_name``: its connections' name in ``CLIENT LIST``;
        ``prefix``: this deployment's ``redis_prefix``, written in each entry (``prefix``)."""
        self.stream = stream
        self._prefix = None if prefix is None else prefix.encode()
        self.maxlen = maxlen  # per partition stream
        self.partitions = partitions
        self.streams = layout.stream_names(stream, partitions)
        # One retry on a fresh connection: after a Redis restart the pooled socket is dead. A
        # retried XADD may append the entry twice: harmless, delivery is at least once anyway.
        self._redis = make_any_client(
            redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=min(2.0, timeout),
            max_connections=max_connections,
            client_name=client_name,
            retry=stale_socket_retry(),  # not after a timeout (one Redis; a cluster retries it)
        )
        self.failures = 0  # appends that failed (party_sync_engine_link_failures_total)
        # Redis answered an append with an error (a NOPERM, an OOM): one WARNING with its reply
        # (recheck probe: with XADD taken from the user, players got backend_unavailable and
        # the node logged nothing but INFO lines); an outage is told by the backend's own.
        self._refused = Episode(log, "actions stream append refused")
        self._count_written = False  # N is in <stream>:partitions (as far as this link knows)
        self._counts_told: set[int] = set()  # other counts found there (warned once each)
        self._refresh = Periodic(self._keep_count, COUNT_REFRESH)
        self._counting: asyncio.Task[None] | None = None  # the count being written again
        self.give_up_after = give_up_after
        self._restates = LatestPerKey()  # per party, a notice being appended again
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shared = shared
        self._shared_values = None if shared is None else shared_settings.decode(shared[1])
        self._shared_told: set[bytes] = set()  # other nodes' settings found there (told once)

    async def start(self, host: LinkHost) -> None:
        await self._write_count()
        await self._write_shared(only_if_missing=False)
        self._refresh.start()

    async def _write_shared(self, *, only_if_missing: bool) -> None:
        """Write this node's shared settings for the workers: when the link starts (the newest
        node's values), and every ``COUNT_REFRESH`` s if missing (an emptied Redis); another
        node's, found there, is warned about once (the nodes disagree: workers take one)."""
        if self._shared is None:
            return
        key, value = self._shared
        try:
            there: Any = await self._redis.set(key, value, nx=only_if_missing, get=True)
        except Exception as exc:  # best effort (Redis down, ...): tried again next time
            log.debug("cannot write %s yet: %s", key, described(exc))
            return
        found, mine = shared_settings.decode(there), self._shared_values
        if found is None or mine is None or there in self._shared_told:
            return
        differ = shared_settings.differences(mine, found)
        if differ:
            self._shared_told.add(there)
            log.warning(
                "the settings engine workers write with differ between the nodes, or changed "
                "(%s held: %s): workers take the last written; give every node the same values",
                key,
                "; ".join(differ),
            )

    async def _keep_count(self) -> None:
        await self._write_shared(only_if_missing=True)
        await self._keep_partition_count()

    async def _keep_partition_count(self) -> None:
        """Write the count again (every ``COUNT_REFRESH`` s) **if it is missing** (``SET NX``):
        a flushed or emptied Redis loses it with no append failing, and a worker started then
        would not be checked against it. Only a missing count: nodes of two counts during a
        change of N do not overwrite each other every few seconds; a count of another node found
        there is warned about once."""
        key = layout.count_key(self.stream)
        try:
            there: Any = await self._redis.set(key, str(self.partitions), nx=True, get=True)
        except Exception as exc:  # best effort (Redis down, ...): tried again next time
            log.debug("cannot write the partition count: %s", described(exc))
            return
        other = self._first_told(there)
        if other is not None:
            log.warning(
                "the nodes disagree on the actions stream's partition count: %s holds %d, "
                "this node writes %d; workers check against the key",
                key,
                other,
                self.partitions,
                extra={"stream": self.stream},
            )

    async def _write_count(self) -> None:
        """Write N to ``<stream>:partitions`` (best effort: Redis may be down; tried again at the
        next append)."""
        key = layout.count_key(self.stream)
        try:
            before: Any = await self._redis.set(key, str(self.partitions), get=True)
        except (RedisError, RedisClusterException, OSError) as exc:
            log.debug("cannot write %s yet: %s", key, exc)
            return
        self._count_written = True
        previous = self._first_told(before)
        if previous is not None:
            log.warning(
                "the actions stream's partition count changed from %d to %d (%s): the entries "
                "still in the old streams wait for an engine-worker with "
                "--actions-stream-partitions %d (--burst drains them), and workers must use %d",
                previous,
                self.partitions,
                key,
                previous,
                self.partitions,
                extra={"stream": self.stream},
            )

    def _first_told(self, found: Any) -> int | None:
        """The other count ``found`` in the key, the first time this link meets it (to warn
        about once), else None."""
        other = layout.parse_count(found)
        if other is None or other == self.partitions or other in self._counts_told:
            return None
        self._counts_told.add(other)
        return other

    def stream_for(self, party_id: str) -> str:
        """The stream ``party_id``'s entries go to."""
        return layout.stream_of(self.stream, self.partitions, party_id)

    async def _append(self, party_id: str, fields: dict[str, bytes]) -> None:
        stream = self.stream_for(party_id)
        if self._prefix is not None:
            fields["prefix"] = self._prefix
        if not self._count_written and (self._counting is None or self._counting.done()):
            # Said again beside the append, not before it: on a Redis Cluster the count's key is
            # on whichever master its name hashes to, and while that master was stalled every
            # append, of every partition, first waited out a command timeout on it (cluster
            # probe). Best effort, one write at a time, as at start.
            self._counting = asyncio.get_running_loop().create_task(self._write_count())
        try:
            # (on a Cluster bounded in all, retries included: redis_connect.BoundedRedisCluster)
            await self._redis.xadd(
                stream,
                fields,  # type: ignore[arg-type]
                maxlen=self.maxlen,
                approximate=True,
            )
        except (RedisError, RedisClusterException) as exc:
            self.failures += 1
            self._count_written = False  # Redis may come back empty: say N again
            if isinstance(exc, ResponseError):
                self._refused.trouble(
                    type(exc).__name__,
                    f"Redis refused XADD to {stream}: {described(exc)}; each action is "
                    "answered backend_unavailable until it takes them (docs/redis.md, ACL)",
                    stream=stream,
                )
            raise BackendUnavailable(f"cannot append to {stream}: {exc}") from None
        if self._refused.active:
            self._refused.fine(f"Redis takes appends to {stream} again", stream=stream)

    async def submit(self, action: ActionRequest) -> None:
        attributes = {"party_sync.action_id": action.action_id, "party_sync.transport": "stream"}
        with tracing.span(
            "engine.stream append", kind=tracing.SpanKind.PRODUCER, attributes=attributes
        ):
            await self._append(
                action.party_id,
                entry(
                    "action",
                    action.party_id,
                    action.campaign_run_id,
                    dict(action.envelope),
                    action.deadline,
                    tracing.traceparent(),
                ),
            )

    async def notify_join(self, notice: JoinNotice) -> None:
        envelope = wire.join_envelope(notice)
        await self._append(
            notice.party_id, entry("join", notice.party_id, notice.campaign_run_id, envelope)
        )

    async def notify_restate(self, notice: RestateNotice) -> None:
        """Append the notice; if that fails, append it again in the background (returns)."""
        try:
            await self._append_restate(notice)
        except BackendUnavailable as exc:
            log.warning(
                "re-state notice not appended (%s): trying again",
                exc,
                extra={"trace_id": notice.trace_id, "party_id": notice.party_id},
            )
            task = spawn_kept(self._tasks, self._restate_again(notice), "a re-state notice")
            self._restates.put(notice.party_id, task)
        else:
            self._restates.cancel(notice.party_id)  # an older one still tried: this is newer

    async def _append_restate(self, notice: RestateNotice) -> None:
        envelope = wire.restate_envelope(notice)
        await self._append(
            notice.party_id, entry("restate", notice.party_id, notice.campaign_run_id, envelope)
        )

    async def _restate_again(self, notice: RestateNotice) -> None:
        """The notice appended again, with a capped backoff, until it is or ``give_up_after``
        has passed."""
        extra = {"trace_id": notice.trace_id, "party_id": notice.party_id}
        attempts = await retried(
            functools.partial(self._append_restate, notice),
            BackendUnavailable,
            patience=self.give_up_after,
            first=RESTATE_RETRY_FIRST,
            cap=RESTATE_RETRY_MAX,
        )
        if attempts is None:
            log.error(
                "re-state notice never appended in %.0f s: given up",
                self.give_up_after,
                extra=extra,
            )
        else:
            log.info("re-state notice appended after %d attempts", attempts, extra=extra)

    async def close(self) -> None:
        self._restates.cancel_all()  # nothing new to say on the way out
        try:
            if self._tasks:
                await cancel_and_wait(list(self._tasks), what="the re-state notices' appends")
            await self._refresh.stop()
            if self._counting is not None:
                await cancel_and_wait([self._counting], what="the partition count's write")
        finally:  # (closed even when a step before failed or the close was cancelled)
            await self._redis.aclose()
