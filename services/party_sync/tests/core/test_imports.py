"""Imports point inwards: no cycle between modules, no import from an inner room to an outer one.

The package is laid out in rooms (docs/architecture.md): the wire contract (``protocol``), the
pure party rules (``core``), where party state lives (``backends``), the engine link
(``engine``), the orchestration (``publishing``, ``gateway``), the HTTP/WebSocket server
(``transport``) and the entry points (``server``, ``cli``). A module may import its own room and
the rooms inside it, never one outside it, so that each room can be read, tested and replaced
knowing only the rooms within.

Every module's imports are read from its source (``ast``, nothing is imported), wherever they
are: at the top, inside a function (a deferred import is still a dependency) and under
``if TYPE_CHECKING:`` (a type-only import still couples the two modules). Each offence is
printed with its chain of ``file:line`` so that it says which import to change.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PACKAGE = "party_sync"
SRC = Path(__file__).resolve().parents[2] / "src" / PACKAGE

#: The rooms, innermost first. A level may hold several rooms: rooms of one level may not import
#: each other. A room lists module names; a name covers that module and, for a package,
#: everything under it (``party_sync`` itself stands only for the package's ``__init__``).
LEVELS: tuple[dict[str, tuple[str, ...]], ...] = (
    {"package": ("party_sync",)},  # __version__
    {"protocol": ("party_sync.protocol",)},  # the wire contract: envelope, types, codes, schemas
    {"core": ("party_sync.core",)},  # pure party rules: no await, no clock, no I/O
    {
        # Small leaf modules the server rooms share: tokens, Telegram initData, tracing, metrics,
        # the development secret, the bounded stop of background tasks.
        "support": (
            "party_sync.auth",
            "party_sync.initdata",
            "party_sync.tracing",
            "party_sync.metrics",
            "party_sync.devmode",
            "party_sync.tasks",
        ),
        # The Python client library: it speaks the protocol and shares the core's rules, and
        # knows nothing of the server.
        "client": ("party_sync.client",),
    },
    {"backends": ("party_sync.backends",)},  # party state and the event stream: memory, Redis
    {"config": ("party_sync.config", "party_sync.logs")},  # settings (names Redis keys) and logs
    # HTTP refusals, the one table of their statuses and codes, the body reader: shared by the
    # server's routes (transport) and the engine host (engine/http_host.py).
    {"problems": ("party_sync.problems",)},
    {"engine": ("party_sync.engine",)},  # the Campaign Engine interface and its links
    {"publishing": ("party_sync.publishing",)},  # engine events into the backend's stream
    {"gateway": ("party_sync.gateway",)},  # connections in, backend and engine out
    {"transport": ("party_sync.transport",)},  # aiohttp: WebSocket, HTTP API, admin, pages
    {
        "app": ("party_sync.server", "party_sync.workers", "party_sync.cli", "party_sync.__main__")
    },  # entry points
)

#: Rooms nothing outside them may import, whatever their level: the client ships in the same
#: package but is a separate product (a server module that needs it is misplaced).
STANDALONE = frozenset({"client"})


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    line: int
    where: str  # "", "in a function", "under TYPE_CHECKING"

    def __str__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"{self.source} -> {self.target}  [{_path(self.source)}:{self.line}{where}]"


def _path(module: str) -> str:
    return str(_modules()[module].relative_to(SRC.parent))


@cache
def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found: dict[str, Path] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str) -> str | None:
    """The module ``name`` is, or lies in (``party_sync.x.Y`` for a class ``Y`` of ``x``)."""
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, where: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import under ``node``, with where it sits (the innermost reason wins)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, where
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for branch in child.body:
                yield from _walk_one(branch, "under TYPE_CHECKING")
            for branch in child.orelse:
                yield from _walk_one(branch, where)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, where or "in a function")
        else:
            yield from _walk(child, where)


def _walk_one(node: ast.stmt, where: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, where
    else:
        yield from _walk(node, where)


@cache
def _imports() -> tuple[Import, ...]:
    """Every import of one package module by another (each pair once, at its first line)."""
    modules = _modules()
    seen: dict[tuple[str, str], Import] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        for node, where in _walk(tree, ""):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_resolve(a.name) for a in node.names if _in_package(a.name)]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    anchor = module if is_package else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                if not _in_package(base):
                    continue
                for alias in node.names:  # ``from pkg import module`` imports that module
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else _resolve(base))
            for target in targets:
                if target is not None and target != module:
                    key = (module, target)
                    if key not in seen:
                        seen[key] = Import(module, target, node.lineno, where)
    return tuple(seen.values())


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _room(module: str) -> tuple[int, str] | None:
    """``(level, room)`` of a module: the room naming it most precisely."""
    best: tuple[int, int, str] | None = None  # (name length, level, room)
    for level, rooms in enumerate(LEVELS):
        for room, names in rooms.items():
            for name in names:
                covers = module == name or (name != PACKAGE and module.startswith(name + "."))
                if covers and (best is None or len(name) > best[0]):
                    best = (len(name), level, room)
    return None if best is None else (best[1], best[2])


def _outward(imp: Import) -> str | None:
    """Why ``imp`` breaks the rooms, or None if it points inwards (or stays in its room)."""
    source, target = _room(imp.source), _room(imp.target)
    if source is None or target is None:  # test_every_module_is_in_a_room says which
        return None
    if source[1] == target[1]:
        return None
    if target[1] in STANDALONE:
        return f"{target[1]} is standalone: nothing outside it may import it"
    if target[0] > source[0]:
        return f"{source[1]} imports {target[1]}, a room outside it"
    if target[0] == source[0]:
        return f"{source[1]} imports {target[1]}, a room beside it"
    return None


def _cycles() -> list[tuple[list[str], list[Import]]]:
    """Each knot of modules that import each other (a strongly connected group, Tarjan's
    algorithm), with one shortest cycle through it."""
    edges: dict[str, list[Import]] = {}
    for imp in _imports():
        edges.setdefault(imp.source, []).append(imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the module count
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for imp in edges.get(node, []):
            if imp.target not in index:
                connect(imp.target)
                low[node] = min(low[node], low[imp.target])
            elif imp.target in on_stack:
                low[node] = min(low[node], index[imp.target])
        if low[node] == index[node]:
            group: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(_modules()):
        if module not in index:
            connect(module)
    return [(sorted(g), _cycle_in(sorted(g)[0], g, edges)) for g in groups]


def _cycle_in(start: str, group: set[str], edges: dict[str, list[Import]]) -> list[Import]:
    """The shortest chain of imports from ``start`` back to itself, within ``group`` (BFS)."""
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for imp in edges.get(node, []):
                if imp.target not in group or imp.target in came:
                    continue
                came[imp.target] = imp
                if imp.target == start:
                    chain = [imp]
                    while chain[0].source != start:
                        chain.insert(0, came[chain[0].source])
                    return chain
                following.append(imp.target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group has one


def test_every_module_is_in_a_room() -> None:
    unplaced = [m for m in _modules() if _room(m) is None]
    assert not unplaced, "modules in no room (add them to LEVELS): " + ", ".join(unplaced)


def test_the_walk_sees_deferred_and_type_only_imports() -> None:
    """The walker itself: every kind of import is found (else the other tests prove nothing)."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import party_sync.core.events\n"
        "if TYPE_CHECKING:\n"
        "    from party_sync.protocol import codec\n"
        "def f() -> None:\n"
        "    from party_sync.backends.keys import KeySpace\n"
    )
    found = [(n.lineno, where) for n, where in _walk(ast.parse(source), "")]
    assert found == [(1, ""), (2, ""), (4, "under TYPE_CHECKING"), (6, "in a function")]
    assert _imports(), "no import found in the package"


def test_the_rooms_rule() -> None:
    """The rule itself, on made-up imports (else the test below proves nothing)."""

    def why(source: str, target: str) -> str | None:
        return _outward(Import(f"party_sync.{source}", f"party_sync.{target}", 1, ""))

    assert why("gateway.gateway", "backends.base") is None  # inwards
    assert why("backends.memory", "backends.base") is None  # within a room
    assert why("core.votes", "backends.keys") == "core imports backends, a room outside it"
    assert why("auth", "client.state") == "client is standalone: nothing outside it may import it"
    assert why("server", "client") == "client is standalone: nothing outside it may import it"
    assert why("client.stream", "tracing") == "client imports support, a room beside it"


def test_no_import_cycle() -> None:
    cycles = _cycles()
    report = "\n\n".join(
        f"cycle {n} (its knot: {', '.join(knot)}):\n" + "\n".join(f"  {imp}" for imp in chain)
        for n, (knot, chain) in enumerate(cycles, 1)
    )
    print(report)
    assert not cycles, f"{len(cycles)} import cycle(s):\n{report}"


def test_imports_point_inwards() -> None:
    offences = [(imp, why) for imp in _imports() if (why := _outward(imp)) is not None]
    report = "\n".join(f"  {imp}\n      {why}" for imp, why in offences)
    print(report)
    assert not offences, f"{len(offences)} import(s) from an inner room to an outer one:\n{report}"
