"""The worker's git mirror of the training repository: resolve refs, check
scripts, and build code bundles, all before anything reaches an instance."""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import os
import posixpath
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from workers.errors import ConfigError, GitError, RefNotFound, ScriptNotFound, ScriptSyntaxError
from workers.redact import redact
from workers.slack.escape import code, escape

__all__ = ["CodeRepo", "GitError"]


def mirror_name(source: str) -> str:
    """One mirror per repository URL: a changed RUNCTL_REPO gets its own, never the old
    remote, and two deployments of different repositories never share one."""
    return f"{hashlib.sha256(source.encode()).hexdigest()[:16]}.git"


class CodeRepo:
    def __init__(self, source: str, mirrors_dir: Path) -> None:
        self.source = source
        self.mirror = mirrors_dir / mirror_name(source)

    def _git(self, *args: str, input_: bytes | None = None) -> bytes:
        proc = subprocess.run(
            ["git", "--git-dir", str(self.mirror), *args],
            input=input_,
            capture_output=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise GitError(
                f"`git {args[0]}` failed in the worker's copy of the training repository.",
                why=escape(redact(proc.stderr.decode(errors="replace").strip())[-500:])
                or f"git exited {proc.returncode}.",
                fix=f"Run the command again; if it fails the same way, delete the worker's mirror "
                f"({self.mirror}, RUNCTL_MIRROR_DIR) so that the next command clones it afresh.",
            )
        return proc.stdout

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.mirror.parent.mkdir(parents=True, exist_ok=True)
        with open(str(self.mirror) + ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def sync(self) -> None:
        asked = time.time()
        stamp = Path(str(self.mirror) + ".fetched")
        with self._locked():
            # A fetch that *started* after we asked is as fresh as ours would be.
            if stamp.exists() and stamp.stat().st_mtime >= asked:
                return
            started = time.time()
            self._fetch()
            stamp.touch()
            os.utime(stamp, (started, started))

    def _fetch(self) -> None:
        if not (self.mirror / "HEAD").exists():
            proc = subprocess.run(
                ["git", "clone", "--mirror", "--quiet", "--", self.source, str(self.mirror)],
                capture_output=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise ConfigError(
                    f"Could not clone RUNCTL_REPO ({code(redact(self.source))}).",
                    why=escape(redact(proc.stderr.decode(errors="replace").strip())[-500:]),
                    fix="Check RUNCTL_REPO and the worker's git credentials.",
                )
        else:
            try:
                self._git("remote", "update", "--prune")
            except GitError as exc:
                raise ConfigError(
                    f"Could not fetch RUNCTL_REPO ({code(redact(self.source))}).", why=exc.why, fix=exc.fix
                ) from None

    def resolve(self, ref: str) -> str:
        try:
            out = self._git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
        except GitError:
            branches = self._git("for-each-ref", "--format=%(refname:short)", "refs/heads", "refs/tags")
            names = branches.decode().split()
            close = difflib.get_close_matches(ref, names, n=3)
            hint = f" Did you mean {', '.join(code(n) for n in close)}?" if close else ""
            raise RefNotFound(
                f"{code(ref)} is not a branch, tag or commit of the training repository.{hint}",
                why=f"Known branches and tags: {', '.join(code(n) for n in names[:15]) or 'none'}.",
                fix="Push the branch, or pass an existing one with `--ref`.",
            ) from None
        return out.decode().strip()

    def files(self, sha: str) -> list[str]:
        return self._git("ls-tree", "-r", "--name-only", "-z", sha).decode().split("\0")[:-1]

    def _entry(self, sha: str, path: str) -> tuple[str, str] | None:
        out = self._git("ls-tree", "-z", sha, "--", path).decode()
        if not out:
            return None
        meta, _, _name = out.rstrip("\0").partition("\t")
        mode, kind, obj = meta.split()
        return mode, obj if kind == "blob" else ""

    def read(self, sha: str, path: str, _depth: int = 0) -> bytes | None:
        """A file's bytes at sha; symlinks are followed only while they stay in the tree."""
        entry = self._entry(sha, path)
        if entry is None or not entry[1]:
            return None
        mode, obj = entry
        data = self._git("cat-file", "blob", obj)
        if mode == "120000":
            target = posixpath.normpath(posixpath.join(posixpath.dirname(path), data.decode()))
            if target.startswith("..") or target.startswith("/") or _depth > 5:
                raise ScriptNotFound(
                    f"{code(path)} is a symlink that points outside the repository "
                    f"({code(data.decode(errors='replace'))}).",
                    why="runctl only runs files inside the repository tree.",
                )
            return self.read(sha, target, _depth + 1)
        return data

    def check_script(self, sha: str, ref: str, path: str) -> bytes:
        data = self.read(sha, path)
        if data is None:
            close = nearest_scripts(path, [f for f in self.files(sha) if f.endswith(".py")])
            hint = f" Did you mean {', '.join(code(n) for n in close)}?" if close else ""
            raise ScriptNotFound(
                f"{code(path)} does not exist at {code(ref)} ({sha[:10]}).{hint}",
                why="Script paths are relative to the repository root.",
                fix="Check the path, or push the file and retry.",
            )
        try:
            compile(data, path, "exec", dont_inherit=True)
        except SyntaxError as exc:
            line = (exc.text or "").rstrip()
            raise ScriptSyntaxError(
                f"{code(path)} has a syntax error at line {exc.lineno}: {escape(exc.msg)}.",
                why=f"Checked at {code(ref)} ({sha[:10]}) before anything was sent to the instance.",
                fix="Fix the script, push, and run the same command again.",
                detail=f"{path}:{exc.lineno}: {line}" if line else "",
            ) from None
        return data

    def archive(self, sha: str) -> bytes:
        return self._git("archive", "--format=tar.gz", sha)


def nearest_scripts(path: str, candidates: list[str], n: int = 3) -> list[str]:
    """The scripts whose name or path is nearest the one typed. Names are compared without
    `.py` and without their folders (every candidate shares the suffix, which made
    `train.py` look nearest `broken.py`); a name that contains the typed one, or is contained
    in it, counts as near; the full path breaks ties."""

    def stem(p: str) -> str:
        return posixpath.basename(p).removesuffix(".py").lower()

    typed = stem(path)

    def score(candidate: str) -> float:
        name = stem(candidate)
        contained = 0.8 if typed and (typed in name or name in typed) else 0.0
        by_name = difflib.SequenceMatcher(None, typed, name).ratio()
        by_path = difflib.SequenceMatcher(None, path.lower(), candidate.lower()).ratio()
        return max(by_name, contained) + by_path / 10

    ranked = sorted(((score(c), c) for c in candidates), key=lambda sc: (-sc[0], sc[1]))
    return [c for sc, c in ranked if sc >= 0.6][:n]
