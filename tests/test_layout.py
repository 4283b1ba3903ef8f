"""The package's import structure: no cycles, and a verifier that shares no code path with the kernel."""

from __future__ import annotations

import ast
from pathlib import Path

import orthopatch

PACKAGE_DIR = Path(orthopatch.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that ``name`` imports, at any depth of its code (function bodies too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from .pkg import name``: the submodule ``pkg.name`` when there is one, else ``pkg`` itself
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import orthopatch.a.b``: the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports."""
    mods = modules(root)
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "d"}, "b": set(), "d": {"e"}, "e": {"d"}}) == ["d", "e", "d"]


def test_the_graph_sees_every_kind_of_import(tmp_path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n\ndef f():\n    from .sub import c\n")
    (pkg / "b.py").write_text("import pkg.sub.c\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b", "pkg.sub.c"}, "pkg.b": {"pkg.sub.c"},
                     "pkg.sub": {"pkg.sub.c"}, "pkg.sub.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "orthopatch.patch.apply" in graph and graph["orthopatch.patch.apply"]
    assert find_cycle(graph) is None


def test_apply_never_reaches_verify_or_the_hub_push() -> None:
    graph = import_graph()
    assert not {m for m in reachable(graph, "orthopatch.patch.apply") if m.startswith("orthopatch.verify")}
    assert "orthopatch.verify" not in reachable(graph, "orthopatch.hub")


def test_verify_shares_no_code_path_with_the_kernel() -> None:
    """The proof imports nothing, directly or through another module, that computes or writes the output."""
    graph = import_graph()
    writers = {f"orthopatch.patch.{m}" for m in ("projection", "kernel", "stream", "shard", "apply", "driver",
                                                 "conversion", "output", "inplace", "journal")}
    writers |= {f"orthopatch.gguf.{m}" for m in ("requantize", "output", "quants", "plainquants", "kquants",
                                                "blockmath", "convert")}
    assert writers <= set(graph)
    verifiers = [m for m in graph if m == "orthopatch.verify" or m.startswith("orthopatch.verify.")]
    assert len(verifiers) >= 3
    for module in verifiers:
        assert not (reachable(graph, module) | {module}) & writers, module


def in_folder(module: str, folder: str) -> bool:
    return module.startswith(f"orthopatch.{folder}.") or module == f"orthopatch.{folder}"


#: folder -> what its modules may import from the package besides their own folder.
FOLDER_RULES = {
    # Bytes and files: nothing above them but the error type.
    "io": {"orthopatch.errors"},
}
#: folder -> package prefixes its modules must never import (directly or not).
FORBIDDEN = {
    "patch": ("orthopatch.run", "orthopatch.hub", "orthopatch.verify", "orthopatch.cli"),
    "io": ("orthopatch.patch", "orthopatch.run", "orthopatch.hub", "orthopatch.verify", "orthopatch.cli"),
}


def test_io_imports_nothing_above_it() -> None:
    graph = import_graph()
    for module, imports in graph.items():
        for folder, allowed in FOLDER_RULES.items():
            if in_folder(module, folder):
                outside = {m for m in imports if not in_folder(m, folder) and m not in allowed | {"orthopatch"}}
                assert not outside, f"{module} imports {sorted(outside)}"


def test_folders_never_reach_the_layers_above() -> None:
    graph = import_graph()
    for folder, prefixes in FORBIDDEN.items():
        members = [m for m in graph if in_folder(m, folder)]
        assert members, folder
        for module in members:
            bad = {m for m in reachable(graph, module) if m.startswith(prefixes)}
            assert not bad, f"{module} reaches {sorted(bad)}"


def test_the_rules_catch_a_breach(tmp_path) -> None:
    pkg = tmp_path / "orthopatch"
    for folder in ("io", "patch", "run"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "a.py").write_text("from orthopatch.patch import b\n")
    (pkg / "patch" / "b.py").write_text("def f():\n    from orthopatch.run import c\n")
    (pkg / "run" / "c.py").write_text("")
    graph = import_graph(pkg)
    assert "orthopatch.patch.b" in graph["orthopatch.io.a"]
    assert "orthopatch.run.c" in reachable(graph, "orthopatch.io.a")


def test_no_module_is_long() -> None:
    """Small modules: a file past ~500 lines is two files."""
    for name, path in modules(PACKAGE_DIR).items():
        assert len(path.read_text().splitlines()) <= 520, name
