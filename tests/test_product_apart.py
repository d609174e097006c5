"""The product (bot/ and workers/, the runctl-bot wheel) never imports the sandbox or what
only the sandbox needs: the fakes live in their own distribution (sandbox/), and a
deployment installs none of moto, werkzeug or fakeredis. `.ci/run` checks the built wheel too."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The wheel check's own scan, so the source tree and the built wheel are judged alike.
_spec = importlib.util.spec_from_file_location("check_wheels", ROOT / ".ci" / "check_wheels.py")
assert _spec is not None and _spec.loader is not None
check_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_wheels)
SANDBOX_ONLY: set[str] = check_wheels.SANDBOX_ONLY
imported_roots = check_wheels.imported_roots


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
