"""Build hook: the JSON Schemas and the built web pages go inside the package.

A wheel or an sdist must work without the repository, so both carry, inside ``party_sync``:

- ``_contracts/``: the JSON Schemas of ``contracts/jsonschema/party_sync``, its ``engine/``
  subdirectory included (read by ``party_sync.protocol.schemas``);
- ``_web/``: the built pages of ``clients/js``, laid out as there (read by
  ``party_sync.transport.demo``): each page's static files (``demo/index.html``,
  ``demo/demo.css``), the library's ES modules (``dist/*.js``) and each page's compiled script
  (``dist/demo/app.js``).

From the checkout they are copied from the repository (the sdist holds them under
``src/party_sync/``); from an unpacked sdist they are already in ``src/party_sync/`` and the wheel
takes them from there. An editable install copies nothing: the running code finds the checkout.
A wheel is refused when the pages are not built, so a wheel without ``/demo`` cannot be made by
mistake (``make dist`` builds them first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: The static files of a page (its sources need no build); the TypeScript is compiled to dist/.
PAGE_SUFFIXES = frozenset({".html", ".css", ".svg", ".png", ".ico"})
NOT_BUILT = (
    "the web pages of clients/js are not built ({missing} is missing): run `make setup` "
    "(npm ci && npm run build in clients/js) or `make dist`, then build again"
)


def contract_files(repo: Path) -> list[tuple[Path, str]]:
    """The JSON Schemas: (source, path inside the package)."""
    directory = repo / "contracts" / "jsonschema" / "party_sync"
    return [
        (path, f"_contracts/{path.relative_to(directory).as_posix()}")
        for path in sorted(directory.rglob("*.json"))
    ]


def web_files(repo: Path) -> list[tuple[Path, str]]:
    """The built pages of clients/js: (source, path inside the package), as the server reads them.

    A page is a directory of clients/js with an ``index.html`` (demo/, and any later one); the
    library's modules are ``dist/*.js`` (declarations, source maps and tests stay out)."""
    client = repo / "clients" / "js"
    dist = client / "dist"
    pages = sorted(p.parent for p in client.glob("*/index.html") if p.parent.name != "dist")
    files: list[tuple[Path, str]] = []
    for page in pages:
        script = dist / page.name / "app.js"
        if not script.is_file():
            raise FileNotFoundError(NOT_BUILT.format(missing=script))
        for path in sorted(page.iterdir()):
            if path.is_file() and path.suffix in PAGE_SUFFIXES:
                files.append((path, f"_web/{page.name}/{path.name}"))
        for path in sorted((dist / page.name).glob("*.js")):
            files.append((path, f"_web/dist/{page.name}/{path.name}"))
    if not (dist / "index.js").is_file():
        raise FileNotFoundError(NOT_BUILT.format(missing=dist / "index.js"))
    files += [(path, f"_web/dist/{path.name}") for path in sorted(dist.glob("*.js"))]
    return files


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version == "editable":
            return  # the checkout's contracts/ and clients/js are found at run time
        root = Path(self.root)
        package = root / "src" / "party_sync"
        if (package / "_contracts").is_dir() and (package / "_web").is_dir():
            return  # an unpacked sdist: they are in the package already
        repo = root.parents[1]
        if not (repo / "contracts").is_dir():
            raise FileNotFoundError(
                f"neither {package}/_contracts nor the repository's contracts/ ({repo}) is here"
            )
        prefix = "src/party_sync" if self.target_name == "sdist" else "party_sync"
        for source, inside in contract_files(repo) + web_files(repo):
            build_data["force_include"][str(source)] = f"{prefix}/{inside}"
