"""The import graph of aiosfs, kernel, services and bench: no cycle anywhere, and
no import against the layering of docs/layout.md.

The graph is built from the sources with `ast`: every import counts, those inside
functions and under `if TYPE_CHECKING:` too, since a type-only cycle is still a
knot in the design. `from P import name` is an edge to the module P.name when
that is a module, else to P.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("aiosfs", "kernel", "services", "clients", "setup", "bench")

# Ranks, lowest first: a module may import only modules of its own rank or lower.
# The longest matching prefix decides a module's rank.
RANKS: dict[str, int] = {
    # 0: the vocabulary every part speaks
    "kernel.errors": 0,
    "kernel.params": 0,
    "kernel.keyfile": 0,
    "kernel.text": 0,
    # 1: records: data types and their parsers, no behaviour that reaches other parts
    "kernel.agents.config": 1,
    "kernel.agents.request": 1,
    "kernel.access.policy": 1,
    "kernel.storage.database": 1,
    "kernel.llm.jobs": 1,
    "kernel.llm.events": 1,
    "kernel.cores.backends": 1,
    "kernel.cores.scheduler": 1,
    "kernel.cores.wire": 1,
    "kernel.types": 1,
    # 2: the subsystems (their allowed dependencies on each other: SUBSYSTEM_DEPENDS)
    "kernel.access": 2,
    "kernel.storage": 2,
    "kernel.memory": 2,
    "kernel.tools": 2,
    "kernel.cores": 2,
    "kernel.agents": 2,
    # 3: the LLM request path, which composes the subsystems
    "kernel.llm": 3,
    # 4: the composition root; 5: the syscall table, the way in; 6: the public surface
    "kernel.kernel": 4,
    "kernel.syscall": 5,
    "kernel": 6,
    # 7: userland: the filesystem, the services the mount starts, the benchmark
    "services": 7,
    "aiosfs": 7,
    "clients": 7,
    "setup": 7,
    "bench": 7,
}
SUBSYSTEM_DEPENDS: dict[str, set[str]] = {
    "kernel.access": set(),
    "kernel.storage": set(),
    "kernel.cores": set(),
    "kernel.memory": {"kernel.access"},
    "kernel.tools": {"kernel.memory", "kernel.access"},
    "kernel.agents": {"kernel.memory", "kernel.storage", "kernel.access"},
}
# What userland may import from the kernel: its public surface, the syscall table
# (the way in), the two vocabulary modules, and the backends (the benchmark builds
# its own in-process kernel).
USERLAND_MAY_IMPORT = re.compile(r"kernel(\.syscall(\.checks)?|\.params|\.errors|\.cores\.backends(\.\w+)?)?$")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import of a project module."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            plain = [alias.name for alias in node.names if f"{base}.{alias.name}" not in modules]
            found += [(f"{base}.{alias.name}", [], node.lineno) for alias in node.names if f"{base}.{alias.name}" in modules]
            if plain:
                found.append((base, plain, node.lineno))
    return [(target, names, line) for target, names, line in found if target in modules]


def graph(modules: dict[str, Path]) -> dict[str, list[tuple[str, list[str], int]]]:
    return {name: imports(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, list[tuple[str, list[str], int]]]) -> list[list[str]]:
    """Every strongly connected knot (Tarjan), each as a sorted list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target, _, _ in edges.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            knot = []
            while True:
                member = stack.pop()
                knot.append(member)
                if member == node:
                    break
            if len(knot) > 1 or any(t == node for t, _, _ in edges.get(node, [])):
                found.append(sorted(knot))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def prefix(name: str, table: Iterable[str]) -> str | None:
    matches = [p for p in table if name == p or name.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def violations(edges: dict[str, list[tuple[str, list[str], int]]], exports: Iterable[str]) -> list[str]:
    exported = set(exports)
    found = []
    for source, targets in edges.items():
        src_layer = prefix(source, RANKS)
        for target, names, line in targets:
            dst_layer = prefix(target, RANKS)
            if src_layer is None or dst_layer is None or target == source:
                continue
            where = f"{source}:{line} imports {target}"
            if RANKS[dst_layer] > RANKS[src_layer]:
                found.append(f"{where}: rank {RANKS[dst_layer]} ({dst_layer}) is above rank {RANKS[src_layer]} ({src_layer})")
            elif RANKS[src_layer] == RANKS[dst_layer] == 2 and src_layer != dst_layer and dst_layer not in SUBSYSTEM_DEPENDS[src_layer]:
                found.append(f"{where}: {src_layer} may use only {sorted(SUBSYSTEM_DEPENDS[src_layer]) or 'no other subsystem'}")
            if RANKS[src_layer] == 7 and target.startswith("kernel") and not USERLAND_MAY_IMPORT.match(target):
                found.append(f"{where}: userland imports the kernel's public surface (`from kernel import ...`), not its insides")
            if RANKS[src_layer] == 7 and target == "kernel" and set(names) - exported:
                found.append(f"{where}: {sorted(set(names) - exported)} are not in kernel.EXPORTS")
            if source.startswith("services") and target.startswith("aiosfs"):
                found.append(f"{where}: a service uses the kernel, not the filesystem")
            if source.startswith("clients") and target.split(".")[0] in ("kernel", "aiosfs", "services"):
                found.append(f"{where}: a client of the mount uses its files, not the kernel or the filesystem")
    return found


def test_the_import_graph_has_no_cycle() -> None:
    knots = cycles(graph(sources(ROOT, PACKAGES)))
    assert knots == [], "import cycles: " + "; ".join(" <-> ".join(knot) for knot in knots)


def test_every_import_follows_the_layering() -> None:
    import kernel

    modules = sources(ROOT, PACKAGES)
    unranked = [name for name in modules if prefix(name, RANKS) is None]
    assert unranked == []
    problems = violations(graph(modules), kernel.EXPORTS)
    assert problems == [], "\n".join(problems)


def test_the_public_surface_resolves_and_is_typed() -> None:
    """Each exported name loads from the module it names, and the `TYPE_CHECKING` block
    that types them for mypy lists the same names."""
    import kernel

    for name, module in kernel.EXPORTS.items():
        assert getattr(kernel, name) is getattr(__import__(module, fromlist=[name]), name)
    tree = ast.parse((ROOT / "kernel" / "__init__.py").read_text())
    typed = {alias.asname for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names if alias.asname}
    assert typed == set(kernel.EXPORTS)
    with pytest.raises(AttributeError):
        _ = kernel.no_such_name  # type: ignore[attr-defined]


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above fail when the design is broken: a package whose storage imports
    the kernel, and a subsystem that reaches for another it may not use."""
    for name, text in {
        "kernel/__init__.py": "",
        "kernel/kernel.py": "from .storage import database\n",
        "kernel/storage/__init__.py": "",
        "kernel/storage/database.py": "from ..kernel import Kernel\n",
        "kernel/cores/__init__.py": "",
        "kernel/cores/engine.py": "from ..tools.manager import ToolManager\n",
        "kernel/tools/__init__.py": "",
        "kernel/tools/manager.py": "",
        "aiosfs/__init__.py": "",
        "aiosfs/ops.py": "from kernel.kernel import Kernel\nfrom kernel import Nothing\n",
        "clients/__init__.py": "",
        "clients/gateway.py": "from aiosfs import ops\nfrom kernel import Kernel\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = graph(sources(tmp_path, ("kernel", "aiosfs", "clients")))
    assert cycles(edges) == [["kernel.kernel", "kernel.storage.database"]]
    problems = violations(edges, ["Kernel"])
    assert any("kernel.storage.database:1 imports kernel.kernel: rank 4" in p for p in problems)
    assert any("kernel.cores.engine:1 imports kernel.tools.manager: kernel.cores may use only" in p for p in problems)
    assert any("aiosfs.ops:1 imports kernel.kernel: userland" in p for p in problems)
    assert any("['Nothing'] are not in kernel.EXPORTS" in p for p in problems)
    assert any("clients.gateway:1 imports aiosfs.ops: a client of the mount uses its files" in p for p in problems)
    assert any("clients.gateway:2 imports kernel: a client of the mount uses its files" in p for p in problems)


def test_the_filesystem_changes_the_kernel_only_through_syscalls() -> None:
    """What the filesystem does to the kernel's state (cancels, refusals kept, errors
    recorded) goes through `syscall()`, where it is checked and audited: no handle
    reaches into the request path for it."""
    reach = re.compile(r"\.requests\.(cancel|record_error|submit|admit|pause)\(|\.refused\[[^]]*\]\s*=")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in ("aiosfs", "services", "clients")
        for path in sorted((ROOT / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if reach.search(line)
    ]
    assert found == []
