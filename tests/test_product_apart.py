"""The product (bot/ and workers/, the runctl-bot wheel) never imports the sandbox or what
only the sandbox needs: the fakes live in their own distribution (sandbox/), and a
deployment installs none of moto, werkzeug or fakeredis. `.ci/run` checks the built wheel too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SANDBOX_ONLY = {"runctl_sandbox", "moto", "werkzeug", "fakeredis"}


def imported_roots(source: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_imported_roots_sees_every_form_of_import() -> None:
    source = "import json, moto.ec2\nfrom werkzeug.http import X\nfrom . import fakeredis\n\ndef f():\n    import runctl_sandbox\n"
    assert imported_roots(source) == {"json", "moto", "werkzeug", "runctl_sandbox"}


def test_bot_and_workers_import_nothing_of_the_sandbox() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path.read_text()) & SANDBOX_ONLY)
        for package in ("bot", "workers")
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}
