"""A ``--workers`` process's log lines (``workers.tag_logs``): its number on every line, and the
same fields and escapes as any line of the format (streams probe: in text, a worker's lines
lost every field, trace_id, party_id, action_id, and were no longer escaped)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from party_sync import logs
from party_sync.workers import tag_logs


@pytest.fixture
def restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def said(fmt: str) -> str:
    out = io.StringIO()
    logs.configure("INFO", fmt, stream=out)
    tag_logs(3, fmt)
    logging.getLogger("party_sync.test").info(
        "new epoch\nforged line", extra={"trace_id": "t-1", "party_id": "p1"}
    )
    return out.getvalue()


@pytest.mark.usefixtures("restored")
def test_a_workers_text_line_keeps_its_fields_and_escapes() -> None:
    line = said("text")
    assert line.count("\n") == 1  # one line: the message's newline written escaped
    assert "party_sync.test [worker 3]: " in line
    assert "new epoch\\nforged line" in line
    assert line.rstrip("\n").endswith("trace_id=t-1 party_id=p1")
    assert "worker=3" not in line  # shown once, where the format puts it


@pytest.mark.usefixtures("restored")
def test_a_workers_json_line_carries_its_number_as_a_field() -> None:
    record = json.loads(said("json"))
    assert (record["worker"], record["trace_id"], record["party_id"]) == (3, "t-1", "p1")
