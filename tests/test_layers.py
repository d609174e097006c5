"""The product's layers, read from the source's syntax trees (`ast`): every project import is
at module level, the lower rooms never import the jobs, the Slack face never reaches AWS, and
no two project modules import each other, directly or round a loop.

A module-level import cycle works only in the order someone happened to import things in;
a function-level import hides one. Type-only imports (`if TYPE_CHECKING:`) never run, so
they count for the direction of the layers but not for cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "workers")
LOWER = ("workers.slack", "workers.state", "workers.remote", "workers.aws", "workers.code")
UPPER = ("workers.jobs", "workers.services")
AWS = ("workers.aws", "boto3", "botocore")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a project module, or a third-party name)
    line: int
    nested: bool  # inside a function or class body
    typing_only: bool  # under `if TYPE_CHECKING:`


def within(module: str, rooms: tuple[str, ...]) -> bool:
    return any(module == room or module.startswith(room + ".") for room in rooms)


def name_of(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {name_of(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: Path, known: set[str]) -> list[str]:
    """The modules an import statement loads: `from a import b` is `a.b` when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    return subs if len(subs) == len(node.names) else [base, *subs]


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, nested: bool, typing_only: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _targets(node, module, path, known):
                found.append(Import(module, target, node.lineno, nested, typing_only))
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, nested, True)
            for child in node.orelse:
                visit(child, nested, typing_only)
            return
        inner = nested or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef)
        for sub in ast.iter_child_nodes(node):
            visit(sub, inner, typing_only)

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    mods = modules()
    known = set(mods)
    return tuple(i for name, path in mods.items() for i in imports_of(name, path, known))


def project(target: str) -> bool:
    return within(target, PACKAGES)


def graph(imports: tuple[Import, ...]) -> dict[str, set[str]]:
    """What loading each module runs: its module-level imports, and the `__init__` of each package
    an imported module sits in (unless the importer sits in that package too, which is then loaded)."""
    edges: dict[str, set[str]] = {}
    for i in imports:
        if i.nested or i.typing_only or not project(i.target):
            continue
        edges.setdefault(i.source, set()).add(i.target)
        parts = i.target.split(".")
        for n in range(1, len(parts)):
            package = ".".join(parts[:n])
            if not within(i.source, (package,)):
                edges[i.source].add(package)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(edges.get(v, ()))
    return seen


def where(i: Import) -> str:
    return f"{i.source}:{i.line} imports {i.target}"


def test_the_analysis_sees_the_tree() -> None:
    mods = modules()
    assert {"bot.app", "workers.jobs.funnel", "workers.remote.core", "workers.state.runs"} <= set(mods)
    edges = graph(all_imports())
    assert "workers.state.runs" in edges["workers.jobs.funnel"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_project_imports_are_at_module_level() -> None:
    nested = [where(i) for i in all_imports() if i.nested and project(i.target)]
    assert nested == [], "a function-level import hides a cycle; fix the layering instead"


def test_lower_rooms_never_import_the_jobs_or_the_services() -> None:
    upward = [where(i) for i in all_imports() if within(i.source, LOWER) and within(i.target, UPPER)]
    assert upward == []


def test_the_slack_face_never_reaches_aws() -> None:
    imports = all_imports()
    edges = graph(imports)
    loaded = set().union(*(reachable(edges, m) for m in modules() if within(m, ("bot",))))
    aws = [where(i) for i in imports if i.source in loaded and within(i.target, AWS) and not i.typing_only]
    assert aws == []


def test_no_import_cycles() -> None:
    assert cycles(graph(all_imports())) == []


def test_the_web_process_loads_no_aws_sdk() -> None:
    """What the import graph cannot see: a third-party package of ours that loads the SDK."""
    code = (
        "import sys, bot.app, bot.web, bot.socket, bot.events\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore') or m.startswith('workers.aws')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
