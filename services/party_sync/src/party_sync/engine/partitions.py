"""The actions stream's partitions (``actions_stream_partitions``; docs/engines.md).

Pure functions, the one place the layout is defined; any engine, in any language, computes the
same:

- ``N = 1`` (the default): one stream, named exactly ``<actions_stream>`` (``party_sync:actions``).
- ``N > 1``: ``N`` streams named ``<actions_stream>:<i>`` for ``i`` in ``0 … N-1``
  (``party_sync:actions:0``, ``party_sync:actions:1``, …). Every entry of a party (its actions,
  joins and restate notices) goes to partition ``crc32(party_id) mod N``: CRC-32 as in zlib,
  gzip and PNG (IEEE 802.3, reflected, initial value and final XOR ``0xFFFFFFFF``; Python's
  ``zlib.crc32``, Go's ``hash/crc32.ChecksumIEEE``, Java's ``java.util.zip.CRC32``) of the
  party_id's UTF-8 bytes, taken as an unsigned 32-bit integer. So one party's entries stay in one
  stream, in order.
- ``<actions_stream>:partitions``: a string key holding ``N`` as the serving nodes last set it,
  so an engine worker can tell whether it reads the streams the nodes write
  (:func:`mismatch`).

No partition name carries a hash tag, so on a Redis Cluster each name hashes to its own slot
(``CRC16(name) mod 16384``), and every command of a worker's read loop names one stream: no
command is cross-slot.
"""

from __future__ import annotations

import zlib


def partition_of(party_id: str, partitions: int) -> int:
    """The partition (``0 … partitions-1``) of ``party_id``'s entries: CRC-32 of its UTF-8
    bytes, modulo ``partitions``."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, not {partitions}")
    return zlib.crc32(party_id.encode("utf-8")) % partitions


def stream_names(stream: str, partitions: int) -> tuple[str, ...]:
    """Every stream of the layout, partition 0 first: ``(stream,)`` for one partition, else
    ``stream:0 … stream:N-1``."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, not {partitions}")
    if partitions == 1:
        return (stream,)
    return tuple(f"{stream}:{index}" for index in range(partitions))


def stream_of(stream: str, partitions: int, party_id: str) -> str:
    """The stream ``party_id``'s entries go to."""
    if partitions == 1:
        return stream
    return f"{stream}:{partition_of(party_id, partitions)}"


def count_key(stream: str) -> str:
    """The key the serving nodes write their partition count to: ``<stream>:partitions``."""
    return f"{stream}:partitions"


def foreign_key(stream: str, prefix: str) -> str:
    """``<stream>:foreign:<prefix>``: set (for ``FOREIGN_TTL`` s) by an engine worker that met an
    entry of the deployment whose ``redis_prefix`` is ``prefix`` and ran none (its own prefix
    is another), to the worker's prefix; that deployment's nodes read it (the monitor)."""
    return f"{stream}:foreign:{prefix}"


#: Seconds a worker's foreign mark lasts after the last entry it dropped.
FOREIGN_TTL = 120


def workers_key(stream: str) -> str:
    """The sorted set of the engine workers reading ``stream`` (consumer name → the wall-clock
    millisecond of its last round): ``<stream>:workers``. Redis before 7.2 does not refresh a
    consumer's ``idle`` (XINFO CONSUMERS) when a read finds nothing, so an idle but live worker
    looks dead there; the monitor reads this instead (``stream_monitor.read_stream``)."""
    return f"{stream}:workers"


def parse_count(raw: bytes | str | None) -> int | None:
    """The count stored in :func:`count_key` (None: absent or not a positive number)."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 1 else None


def mismatch(mine: int, written: int | None, stream: str) -> str | None:
    """What is wrong when a worker reads ``mine`` partitions and the nodes write ``written``
    (None: no node has said yet, nothing to compare), or None when they agree."""
    if written is None or written == mine:
        return None
    missed = set(stream_names(stream, written)) - set(stream_names(stream, mine))
    return (
        f"the serving nodes write {written} actions stream partition(s) ({count_key(stream)}) "
        f"but this worker reads {mine}: the actions in {len(missed)} stream(s) it does not read "
        f"wait for another worker (and time out at their deadline); start engine-worker with "
        f"--actions-stream-partitions {written}"
    )
