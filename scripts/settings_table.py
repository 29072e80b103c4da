"""Print the README's settings table from party_sync.config (``make docs`` writes it in place)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from party_sync import config

START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def table() -> str:
    rows = ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for flag, env, help_text, default in config.options():
        if default is None or default == ():
            shown = "(unset)" if default is None else "(empty)"
        else:
            shown = f"`{config.shown_default(default)}`"
        rows.append(f"| `{flag}` | `{env}` | {shown} | {help_text} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    block = f"{START}\n{table()}\n{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
