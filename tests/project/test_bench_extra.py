"""The ``bench`` extra installs everything bench/ imports (issue 15).

``pip install -e '.[bench]' && python bench/run.py`` must work on a clean venv. Rather than
build a venv in the test run (minutes of installing), this walks the import statements of
bench/*.py, and of the repository modules they import (bench/dnszone.py runs the tests' DNS
server, smtpproxy/zoneserver.py, whose dnslib is no base dependency), and checks that every third-party module is provided by a distribution named in the
project's dependencies or its ``bench`` extra. An import another package merely happens to
bring along (``cryptography`` came with the test extra's trustme) fails here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Packages of this repository: their own imports are followed, not looked up.
LOCAL = {"bench": ROOT / "bench", "tests": ROOT / "tests"}
#: The project itself: what it imports is covered by its (base) dependencies...
PROJECT = {"smtpproxy", "smtpproxy_plugins"}
#: ... except its modules for tests, whose imports are followed too.
FOLLOWED = {"smtpproxy.zoneserver": ROOT / "smtpproxy" / "zoneserver.py"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["bench"]]
    return {_normalize(re.match(r"[A-Za-z0-9_.-]+", spec).group()) for spec in specs}  # type: ignore[union-attr]


def _imports(path: Path) -> set[str]:
    """Dotted names of every module *path* imports (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _local_file(dotted: str) -> Path | None:
    top, _, rest = dotted.partition(".")
    base = LOCAL.get(top)
    if base is None or not rest:
        return None
    path = base / (rest.replace(".", "/") + ".py")
    return path if path.exists() else None


def bench_third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the files importing it, over bench/ and what it pulls in."""
    found: dict[str, set[str]] = {}
    todo = sorted((ROOT / "bench").glob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for dotted in _imports(path):
            top = dotted.partition(".")[0]
            if dotted in FOLLOWED:
                todo.append(FOLLOWED[dotted])
                continue
            if top in LOCAL:
                local = _local_file(dotted)
                if local is not None:
                    todo.append(local)
                continue
            if top in PROJECT or top in sys.stdlib_module_names or top == "__future__":
                continue
            found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_walk_finds_the_imports_bench_needs() -> None:
    """The walk sees function-level imports and follows bench -> tests.dns_server -> smtpproxy.zoneserver."""
    found = bench_third_party_imports()
    assert {"psutil", "cryptography", "dkim", "dnslib", "matplotlib", "yaml"} <= set(found)
    assert "smtpproxy/zoneserver.py" in found["dnslib"]


def test_bench_extra_provides_every_bench_import() -> None:
    declared = _declared()
    installed = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(bench_third_party_imports().items()):
        # Installed: ask its metadata which distribution provides it (yaml -> PyYAML, dkim ->
        # dkimpy). Not installed here (the bench extra may not be): its distribution is the
        # module's name, which is true for every such module bench/ uses today.
        providers = {_normalize(d) for d in installed.get(module, [module])}
        if not providers & declared:
            missing.append(f"{module} (imported by {', '.join(sorted(files))}; provided by "
                           f"{', '.join(sorted(providers))})")
    assert not missing, "bench/ imports modules the bench extra does not install: " + "; ".join(missing)
