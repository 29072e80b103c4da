"""Print the metrics reference (docs/metrics.md) from party_sync.metrics: every family a node can
export, with its type, labels and help text (``make docs`` writes it in place). Each family is
made as the server makes it (the Redis and stream families too, and a ``serve --workers`` group's),
then read back from the exposition."""

from __future__ import annotations

import re
import sys
from functools import cached_property
from pathlib import Path

from party_sync.metrics import (
    WORKER_LABEL,
    Metrics,
    WorkerRestarts,
    merge_workers,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

START, END = "<!-- metrics:start -->", "<!-- metrics:end -->"

#: Where a family exists, by name prefix (the first that matches).
MODES = (
    ("party_sync_actions_stream_partition_", "stream mode, partitioned"),
    ("party_sync_actions_stream_", "stream mode"),
    ("party_sync_redis_cluster_", "Redis Cluster"),
    ("party_sync_redis_", "Redis"),
    ("party_sync_pubsub_", "Redis"),
    ("party_sync_worker", "`--workers` > 1"),
    ("party_sync_", "always"),
)


class _Link:
    failures = 1


def _families() -> list[tuple[str, str, list[str], str]]:
    """(name, type, labels, help) of every party_sync family, in the exposition's order."""
    metrics = Metrics("node")
    for name, attr in vars(Metrics).items():
        if isinstance(attr, cached_property):
            getattr(metrics, name)  # a first read registers the family
    metrics.register_script_counts(lambda: 0, lambda: 0)
    metrics.watch_link("stream", _Link())
    WorkerRestarts(0, metrics.registry)
    metrics.received("t")
    metrics.sent("t")
    text = generate_latest(metrics.registry)
    merged = merge_workers([(1, text)], 1, {1: 0})
    labels: dict[str, set[str]] = {}
    out: dict[str, tuple[str, str]] = {}
    for family in text_string_to_metric_families(merged.decode()):
        if not family.name.startswith("party_sync_") or family.name.endswith("_created"):
            continue  # (a histogram's _created samples parse as a family of their own)
        out[family.name] = (family.type, family.documentation)
        names = labels.setdefault(family.name, set())
        for sample in family.samples:
            per_worker = family.name.startswith("party_sync_worker_")  # else added to every one
            names.update(
                k for k in sample.labels if k != "le" and (per_worker or k != WORKER_LABEL)
            )
    for wrapper in vars(metrics).values():  # labelled families with no sample yet
        wrapped = getattr(wrapper, "_name", None)  # (prometheus_client's own attributes)
        if isinstance(wrapped, str):
            for suffix in ("", "_total"):
                if wrapped + suffix in labels:
                    labels[wrapped + suffix].update(getattr(wrapper, "_labelnames", ()))
    return [(n, t, sorted(labels[n]), d) for n, (t, d) in out.items()]


def table() -> str:
    rows = ["| Family | Type | Labels | Where | Meaning |", "|---|---|---|---|---|"]
    for name, type_, labels, documentation in _families():
        shown = f"{name}_total" if type_ == "counter" else name
        where = next(mode for prefix, mode in MODES if name.startswith(prefix))
        label_text = ", ".join(f"`{label}`" for label in labels) or "–"
        rows.append(f"| `{shown}` | {type_} | {label_text} | {where} | {documentation} |")
    return "\n".join(rows)


def render(document: str) -> str:
    block = f"{START}\n{table()}\n{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, document, flags=re.S)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/metrics.md")
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
