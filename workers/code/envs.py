"""Which requirements a run needs, read from the tree at the run's commit, and a
digest of everything that decides what gets installed.

The search walks from the script's directory up to the repository root; in each
directory a ``requirements.txt`` wins over a ``pyproject.toml`` with
``[project] dependencies``. The nearest one is used, so a project folder in a
monorepo gets its own requirements and the root file is the fallback.
"""

from __future__ import annotations

import hashlib
import posixpath
import tomllib
from dataclasses import dataclass
from typing import Protocol

from workers.errors import CodeError
from workers.slack.escape import code, escape

DIGEST_VERSION = b"runctl-env-v1\n"
_INCLUDES = ("-r", "--requirement", "-c", "--constraint")
_EDITABLE = ("-e", "--editable")
MAX_INCLUDE_DEPTH = 5


class Tree(Protocol):
    """What we need from the code repository (``workers.code.repo.CodeRepo``)."""

    def read(self, sha: str, path: str) -> bytes | None: ...

    def files(self, sha: str) -> list[str]: ...


@dataclass(frozen=True)
class Requirements:
    source: str  # repository path of the file they came from
    workdir: str  # repository directory the install runs in ("" = root); relative paths start here
    text: str  # requirements.txt syntax; generated from pyproject.toml when that is the source
    digest: str  # sha256 over the text, the files it includes and the local packages it names

    @property
    def empty(self) -> bool:
        """Only blank lines and comments: nothing to install."""
        return not any(line.split("#", 1)[0].strip() for line in self.text.splitlines())

    @property
    def from_pyproject(self) -> bool:
        return self.source.endswith("pyproject.toml")

    def env_name(self, python_version: str) -> str:
        return f"{self.digest[:16]}-py{python_version}"


def find(tree: Tree, sha: str, script: str) -> Requirements | None:
    """The requirements for ``script`` at ``sha``, or None when there are none."""
    directory = posixpath.dirname(script)
    while True:
        req_path = posixpath.join(directory, "requirements.txt")
        data = tree.read(sha, req_path)
        if data is not None:
            text = data.decode(errors="replace")
            return Requirements(req_path, directory, text, _digest(tree, sha, directory, text))
        toml_path = posixpath.join(directory, "pyproject.toml")
        data = tree.read(sha, toml_path)
        deps = _pyproject_dependencies(toml_path, data) if data is not None else []
        if deps:
            text = "".join(f"{dep}\n" for dep in deps)
            return Requirements(toml_path, directory, text, _digest(tree, sha, directory, text))
        if not directory:
            return None
        directory = posixpath.dirname(directory)


def _pyproject_dependencies(path: str, data: bytes) -> list[str]:
    try:
        doc = tomllib.loads(data.decode(errors="replace"))
    except tomllib.TOMLDecodeError as exc:
        raise CodeError(
            f"{code(path)} is not valid TOML: {escape(exc)}.",
            why="runctl reads `[project] dependencies` from it to set up the run's environment.",
            fix=f"Fix {code(path)} and push, or run with `--no-deps` to skip the environment step.",
        ) from None
    project = doc.get("project")
    deps = project.get("dependencies") if isinstance(project, dict) else None
    if not isinstance(deps, list):
        return []
    return [str(d).strip() for d in deps if str(d).strip()]


def _digest(tree: Tree, sha: str, workdir: str, text: str) -> str:
    """sha256 of the requirements plus what they pull from the tree: included
    requirement files and local packages (so editing a vendored package
    rebuilds the environment even when requirements.txt is unchanged)."""
    h = hashlib.sha256(DIGEST_VERSION)
    h.update(text.encode())
    files: list[str] | None = None
    for kind, path in _local_references(tree, sha, workdir, text, depth=0):
        h.update(f"\0{kind}:{path}\0".encode())
        if kind == "file":
            h.update(tree.read(sha, path) or b"")
            continue
        if files is None:
            files = tree.files(sha)
        prefix = f"{path}/" if path else ""
        for name in sorted(f for f in files if f.startswith(prefix)):
            h.update(f"\0{name}\0".encode())
            h.update(tree.read(sha, name) or b"")
    return h.hexdigest()


def _local_references(tree: Tree, sha: str, base: str, text: str, depth: int) -> list[tuple[str, str]]:
    """("file", path) for included requirement files and local wheel/sdist files,
    ("dir", path) for local package directories; repository paths, inside the tree only."""
    found: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        option, _, rest = line.partition(" ")
        if "=" in option and option.startswith("--"):
            option, _, rest = option.partition("=")
        rest = rest.strip()
        if option in _INCLUDES:
            path = _in_tree(base, rest)
            data = tree.read(sha, path) if path is not None else None
            if path is not None and data is not None:
                found.append(("file", path))
                if depth < MAX_INCLUDE_DEPTH:
                    found += _local_references(
                        tree, sha, posixpath.dirname(path), data.decode(errors="replace"), depth + 1
                    )
            continue
        target = rest if option in _EDITABLE else line
        if not target.startswith((".", "/")):
            continue
        path = _in_tree(base, target.split(";", 1)[0].split("[", 1)[0].strip())
        if path is None:
            continue
        found.append(("file", path) if tree.read(sha, path) is not None else ("dir", path))
    return found


def _in_tree(base: str, relative: str) -> str | None:
    if relative.startswith("/"):
        return None  # a path on the instance itself; its text is all we can hash
    path = posixpath.normpath(posixpath.join(base, relative))
    if path == ".":
        return ""
    if path.startswith("../") or path == "..":
        return None
    return path
