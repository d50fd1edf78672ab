"""The layers, checked: router ← workers ← sessionpool, no import cycles, engine SDKs in runtimes.

Read from the source with `ast` (nothing is imported), so a violation anywhere in a module, at
its top or inside a function, is found. Imports under `if TYPE_CHECKING:` are type-only and
exempt. Each rule is also run against a planted violation, so a checker that finds nothing
cannot pass.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "workers", "sessionpool")
# layer → the first-party packages it must never import
FORBIDDEN = {"router": {"workers", "sessionpool"}, "workers": {"sessionpool"}}
# engine SDK → the module name prefixes allowed to import it (the runtime modules)
SDKS = {"docker": ("workers.docker",), "kubernetes_asyncio": ("workers.kubernetes",)}


def modules(root: Path) -> dict[str, Path]:
    """Module name → file of every first-party module under `root`."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in `nodes`, at any depth, except under `if TYPE_CHECKING:`."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _import_nodes(node.orelse)
        else:
            yield from _import_nodes(ast.iter_child_nodes(node))


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `name` imports (first-party ones resolved to the deepest known module)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _import_nodes([ast.parse(path.read_text(), str(path))]):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = name.split(".")
            anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.add(sub if sub in known else base)
    return out


def graph(root: Path) -> dict[str, set[str]]:
    """First-party module → every module it imports (first-party or not)."""
    mods = modules(root)
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def violations(root: Path) -> list[str]:
    """Every broken layer rule under `root`, as readable lines (empty when all hold)."""
    g = graph(root)
    found = []
    for name, targets in sorted(g.items()):
        layer = name.split(".")[0]
        for target in sorted(targets):
            top = target.split(".")[0]
            if top in FORBIDDEN.get(layer, ()):
                found.append(f"{name} imports {target}: {layer}/ must not import {top}/")
            allowed = SDKS.get(top)
            if allowed is not None and not name.startswith(allowed):
                found.append(f"{name} imports {target}: only {', '.join(allowed)}* may")
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(g)]
    return found


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of first-party modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in g or w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return [[*group, group[0]] for group in groups]


def test_the_layers_hold() -> None:
    assert violations(ROOT) == []


def test_the_check_reads_the_real_tree() -> None:
    g = graph(ROOT)
    assert "router.settings" in g["sessionpool.cli"]
    assert "sessionpool.up" in g["sessionpool.cli"]
    assert any("docker" in targets for name, targets in g.items() if name.startswith("workers."))


def plant(root: Path, files: dict[str, str]) -> Path:
    for package in PACKAGES:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    for rel, source in files.items():
        (root / rel).write_text(source)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"router/app.py": "def f():\n    from workers import main\n"},
            "router.app imports workers: router/ must not import workers/",
            id="router-imports-workers-lazily",
        ),
        pytest.param(
            {"router/app.py": "import sessionpool.cli\n", "sessionpool/cli.py": ""},
            "router.app imports sessionpool.cli: router/ must not import sessionpool/",
            id="router-imports-sessionpool",
        ),
        pytest.param(
            {"workers/main.py": "from sessionpool.up import up\n", "sessionpool/up.py": ""},
            "workers.main imports sessionpool.up: workers/ must not import sessionpool/",
            id="workers-imports-sessionpool",
        ),
        pytest.param(
            {"sessionpool/up.py": "import docker\n"},
            "sessionpool.up imports docker: only workers.docker* may",
            id="sdk-outside-its-runtime",
        ),
        pytest.param(
            {"workers/docker.py": "import kubernetes_asyncio.client\n"},
            "workers.docker imports kubernetes_asyncio.client: only workers.kubernetes* may",
            id="other-runtime-sdk",
        ),
        pytest.param(
            {
                "sessionpool/cli.py": "from sessionpool.up import up\n",
                "sessionpool/up.py": "from sessionpool import cli\n",
            },
            "import cycle: sessionpool.cli -> sessionpool.up -> sessionpool.cli",
            id="cycle",
        ),
        pytest.param(
            {
                "workers/a.py": "from . import b\n",
                "workers/b.py": "from .a import x\n",
            },
            "import cycle: workers.a -> workers.b -> workers.a",
            id="relative-cycle",
        ),
    ],
)
def test_a_planted_violation_is_found(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    assert violations(plant(tmp_path, files)) == [expected]


def test_type_only_imports_are_exempt(tmp_path: Path) -> None:
    root = plant(
        tmp_path,
        {
            "router/app.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from workers.main import run\n"
                "    import docker\n"
            ),
            "workers/main.py": "from router.app import create_app\nimport kubernetes_asyncio\n",
            "workers/kubernetes.py": "import kubernetes_asyncio\n",
        },
    )
    assert violations(root) == [
        "workers.main imports kubernetes_asyncio: only workers.kubernetes* may"
    ]
