"""Training environments: found at the run's commit, cached on the instance,
shown on the run, and a broken requirement stops the run before training.

Flow tests run against moto + the executing-SSM shim (scripts really run under
/bin/sh, which is dash here) with pip offline: requirements name local wheels.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.code import envs
from workers.code.repo import CodeRepo
from workers.commands import Actor, TrainCommand
from workers.errors import CodeError
from workers.jobs.envsetup import culprit
from workers.jobs.train import train
from workers.remote.env import setup_env
from workers.services import Services
from workers.settings import Settings
from workers.state.locks import train_lock
from workers.state.runs import Run, RunState

ALICE = Actor(user_id="U0ALICE", channel_id="C0ENV")

TRAIN = """\
import os, tinylib
print(f"tinylib {tinylib.VERSION}", flush=True)
print(f"prefix {os.path.realpath(__import__('sys').prefix)}", flush=True)
"""


def wheel(name: str, version: str) -> bytes:
    """A minimal pure-Python wheel: installs with no build step and no network."""
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{name}-{version}.dist-info/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n").encode(),
        f"{name}-{version}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: runctl-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{name}-{version}.dist-info/RECORD,,")
        zf.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return buf.getvalue()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def commit(repo: Path, files: dict[str, str | bytes], message: str = "change") -> str:
    for path, content in files.items():
        target = repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
def deps_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "deps-repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit(
        repo,
        {
            "train.py": TRAIN,
            "pkgs/tinylib-0.1-py3-none-any.whl": wheel("tinylib", "0.1"),
            "pkgs/tinylib-0.2-py3-none-any.whl": wheel("tinylib", "0.2"),
            "requirements.txt": "./pkgs/tinylib-0.1-py3-none-any.whl\n",
        },
    )
    return repo


@pytest.fixture
def settings(settings: Settings, deps_repo: Path) -> Settings:
    # pip runs with the SSM agent's environment only; requirements name local wheels.
    return settings.model_copy(update={"RUNCTL_REPO": str(deps_repo)})


def run_train(svc: Services, worker: InlineWorker, iid: str, **kw: Any) -> Run:
    cmd = TrainCommand(instance_id=iid, script=kw.pop("script", "train.py"), **kw)
    run_id = f"r-env-{uuid.uuid4().hex[:12]}"
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), run_id)
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    return run


def built(sandbox: Sandbox, iid: str) -> int:
    """How many runs built an environment (their setup.log says so)."""
    return sum(
        1
        for run_dir in (sandbox.instance_dir(iid) / "runs").iterdir()
        if (run_dir / "setup.log").exists() and (run_dir / "setup.log").read_text().startswith("runctl: building")
    )


def test_first_run_builds_second_reuses_changed_requirements_build_anew(
    svc: Services, worker: InlineWorker, fleet_seed: SeedInfo, sandbox: Sandbox, deps_repo: Path, slack: FakeSlack
) -> None:
    iid = fleet_seed.instances["gpu-box-1"]
    root = sandbox.instance_dir(iid)
    # Left over from older runs: one env no recent run used, one a recent run did.
    (root / "envs" / "0000000000000000-py3.11").mkdir(parents=True)
    (root / "envs" / "1111111111111111-py3.11").mkdir(parents=True)
    (root / "runs" / "r-older").mkdir(parents=True)
    (root / "runs" / "r-older" / "env").write_text("1111111111111111-py3.11\n")

    first = run_train(svc, worker, iid)
    assert first.state is RunState.SUCCEEDED, first.error
    assert first.env_hash and first.env_built_at and first.setup_seconds is not None
    env_dir = root / "envs" / first.env_hash
    assert (env_dir / ".runctl-ready").exists()
    log = (root / "runs" / first.run_id / "training.log").read_text()
    assert "tinylib 0.1" in log and f"prefix {env_dir.resolve()}" in log
    setup_log = (root / "runs" / first.run_id / "setup.log").read_text()
    assert "tinylib" in setup_log and "ready" in setup_log
    assert any("Built environment" in n for n in first.notes)
    assert not (root / "envs" / "0000000000000000-py3.11").exists()  # pruned
    assert (root / "envs" / "1111111111111111-py3.11").exists()  # a recent run used it
    # The parent message showed the set-up state, then how long it took.
    updates = [c.params for c in slack.calls_to("chat.update") if c.params.get("ts") == first.message_ts]
    assert any(str(u.get("text", "")).startswith("setting up environment") for u in updates)
    assert any("env ready in" in str(u.get("blocks")) for u in updates)

    marker = (env_dir / ".runctl-ready").read_text()
    second = run_train(svc, worker, iid)
    assert second.state is RunState.SUCCEEDED, second.error
    assert second.env_hash == first.env_hash and second.env_built_at == first.env_built_at
    # No install ran: the log holds the one reuse line, and the env is untouched.
    assert (root / "runs" / second.run_id / "setup.log").read_text().splitlines() == [
        f"runctl: reusing environment {first.env_hash} (built "
        + (root / "runs" / second.run_id / "setup.log").read_text().split("(built ", 1)[1].rstrip("\n")
    ]
    assert (env_dir / ".runctl-ready").read_text() == marker
    assert any("Reused environment" in n for n in second.notes)
    assert built(sandbox, iid) == 1

    commit(deps_repo, {"requirements.txt": "./pkgs/tinylib-0.2-py3-none-any.whl\n"})
    third = run_train(svc, worker, iid)
    assert third.state is RunState.SUCCEEDED, third.error
    assert third.env_hash != first.env_hash
    assert "tinylib 0.2" in (root / "runs" / third.run_id / "training.log").read_text()
    assert built(sandbox, iid) == 2
    assert (root / "envs" / first.env_hash).exists()  # still used by a recent run

    assert third.env_hash is not None
    (root / "envs" / third.env_hash / "stale-file").write_text("x")
    fresh = run_train(svc, worker, iid, rebuild_env=True)
    assert fresh.state is RunState.SUCCEEDED, fresh.error
    assert fresh.env_hash == third.env_hash and built(sandbox, iid) == 3
    assert not (root / "envs" / third.env_hash / "stale-file").exists()


def test_broken_requirement_fails_before_training_with_pips_error(
    svc: Services, worker: InlineWorker, fleet_seed: SeedInfo, sandbox: Sandbox, deps_repo: Path, slack: FakeSlack
) -> None:
    commit(deps_repo, {"requirements.txt": "./pkgs/tinylib-0.1-py3-none-any.whl\n./pkgs/missing\n"})
    iid = fleet_seed.instances["gpu-box-1"]
    run = run_train(svc, worker, iid)

    assert run.state is RunState.FAILED and run.started_at is None
    assert run.error is not None and run.error.kind == "EnvSetupError"
    assert "`./pkgs/missing`" in run.error.what and "training was not started" in run.error.what
    assert "train.py" in run.error.fix and "--no-deps" in run.error.fix
    replies = [m.text for m in slack.thread("C0ENV", run.message_ts or "")]
    assert any("<@U0ALICE>" in t and "./pkgs/missing" in t and "ERROR:" in t for t in replies)
    assert train_lock(svc.redis, iid).holder() is None
    root = sandbox.instance_dir(iid)
    assert not (root / "runs" / run.run_id / "training.log").exists()
    assert not any("setsid sh" in s for s in sandbox.sent_scripts(iid))
    assert [p.name for p in (root / "envs").iterdir()] == []  # half-built env and lock removed
    assert "./pkgs/missing" in (root / "runs" / run.run_id / "setup.log").read_text()


def test_no_deps_and_no_requirements_use_system_python(
    svc: Services, worker: InlineWorker, fleet_seed: SeedInfo, sandbox: Sandbox, deps_repo: Path
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    commit(deps_repo, {"plain.py": "print('plain ok', flush=True)\n"})
    skipped = run_train(svc, worker, iid, script="plain.py", deps=False)
    assert skipped.state is RunState.SUCCEEDED and skipped.env_hash is None
    assert any("--no-deps" in n for n in skipped.notes)

    git(deps_repo, "rm", "-q", "requirements.txt")
    git(deps_repo, "commit", "-q", "-m", "no requirements")
    none = run_train(svc, worker, iid, script="plain.py")
    assert none.state is RunState.SUCCEEDED and none.env_hash is None
    assert any("No `requirements.txt`" in n for n in none.notes)
    assert not any("setup.log" in s for s in sandbox.sent_scripts(iid))


def test_interpreter_from_the_instance_tag_builds_an_env_that_sees_its_packages(
    svc: Services, worker: InlineWorker, fleet_seed: SeedInfo, sandbox: Sandbox, deps_repo: Path
) -> None:
    """A Deep Learning AMI's torch lives in its own interpreter (here: the one running the
    tests, whose `moto` the agent's python3 lacks); requirements go on top, torch stays."""
    iid = fleet_seed.instances["gpu-box-1"]
    image_python = str(Path(sys.base_prefix, "bin", "python3"))
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:python", "Value": image_python}])
    commit(deps_repo, {"image.py": "import moto, tinylib\nprint('moto', bool(moto), 'tinylib', tinylib.VERSION)\n"})
    run = run_train(svc, worker, iid, script="image.py")
    assert run.state is RunState.SUCCEEDED, (run.error, run.log_tail)
    assert run.python == image_python and run.env_hash is not None
    log = (sandbox.instance_dir(iid) / "runs" / run.run_id / "training.log").read_text()
    assert "moto True tinylib 0.1" in log
    cfg = (sandbox.instance_dir(iid) / "envs" / run.env_hash / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg and f"home = {Path(image_python).parent}" in cfg
    # the agent's python3 gets an environment of its own, not this one
    svc.fleet.ec2.delete_tags(Resources=[iid], Tags=[{"Key": "runctl:python"}])
    plain = run_train(svc, worker, iid, script="train.py")
    assert (
        plain.state is RunState.SUCCEEDED
        and plain.python == svc.settings.RUNCTL_PYTHON
        and plain.env_hash != run.env_hash
    )

    from workers.jobs.status import describe

    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:python", "Value": image_python}])
    commit(deps_repo, {"slow.py": "import time, tinylib\ntime.sleep(30)\n"})
    cmd = TrainCommand(instance_id=iid, script="slow.py")
    train(cmd.model_dump(mode="json"), ALICE.model_dump(mode="json"), "r-env-status")
    text = describe(iid)
    assert f"Interpreter `{image_python}`" in text, text
    assert "Environment `envs/" in text and f"(built from `{image_python}`)" in text, text
    from workers import remote

    svc.fleet.run(iid, remote.stop_run(svc.settings.RUNCTL_REMOTE_ROOT, "r-env-status", 5), 60)


def test_a_bad_python_tag_is_refused_with_the_command_that_fixes_it(
    svc: Services, worker: InlineWorker, fleet_seed: SeedInfo
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    svc.fleet.ec2.create_tags(Resources=[iid], Tags=[{"Key": "runctl:python", "Value": "python3; reboot"}])
    run = run_train(svc, worker, iid, script="train.py")
    assert run.state is RunState.REFUSED and run.error is not None
    assert "runctl:python" in run.error.what and "create-tags" in run.error.fix


def test_requirements_with_only_comments_skip_the_environment_step(
    svc: Services, worker: InlineWorker, fleet_seed: SeedInfo, sandbox: Sandbox, deps_repo: Path
) -> None:
    iid = fleet_seed.instances["cpu-box"]
    commit(
        deps_repo,
        {"requirements.txt": "# pinned later\n\n   # torch comes with the AMI\n", "plain.py": "print('ok')\n"},
    )
    run = run_train(svc, worker, iid, script="plain.py")
    assert run.state is RunState.SUCCEEDED and run.env_hash is None
    assert any("names no packages" in n for n in run.notes)
    assert not any("setup.log" in s for s in sandbox.sent_scripts(iid))
    assert not (sandbox.instance_dir(iid) / "envs").exists()


# --- finding requirements (real git repository, no instance) -------------------------


def repo_at(deps_repo: Path, tmp_path: Path, files: dict[str, str | bytes]) -> tuple[CodeRepo, str]:
    sha = commit(deps_repo, files)
    repo = CodeRepo(str(deps_repo), tmp_path / "mirror")
    repo.sync()
    return repo, sha


def test_nearest_requirements_win_then_pyproject_then_root(deps_repo: Path, tmp_path: Path) -> None:
    repo, sha = repo_at(
        deps_repo,
        tmp_path,
        {
            "projects/a/requirements.txt": "numpy\n",
            "projects/a/train.py": "",
            "projects/b/pyproject.toml": '[project]\nname = "b"\ndependencies = ["rich>=13", "tqdm"]\n',
            "projects/b/deep/train.py": "",
            "projects/c/pyproject.toml": '[project]\nname = "c"\n',
            "projects/c/train.py": "",
        },
    )
    a = envs.find(repo, sha, "projects/a/train.py")
    assert a is not None and (a.source, a.workdir, a.text) == ("projects/a/requirements.txt", "projects/a", "numpy\n")
    b = envs.find(repo, sha, "projects/b/deep/train.py")
    assert b is not None and b.source == "projects/b/pyproject.toml" and b.text == "rich>=13\ntqdm\n"
    c = envs.find(repo, sha, "projects/c/train.py")  # no dependencies there: the root file
    assert c is not None and c.source == "requirements.txt" and c.workdir == ""


def test_digest_follows_local_packages_and_includes(deps_repo: Path, tmp_path: Path) -> None:
    files: dict[str, str | bytes] = {
        "requirements.txt": "-r base.txt\n./vendor/lib  # vendored\n",
        "base.txt": "tqdm\n",
        "vendor/lib/pyproject.toml": "[project]\nname='lib'\n",
        "vendor/lib/lib.py": "A = 1\n",
    }
    repo, sha1 = repo_at(deps_repo, tmp_path, files)
    d1 = envs.find(repo, sha1, "train.py")
    _, sha2 = repo_at(deps_repo, tmp_path, {"README.md": "unrelated\n"})
    repo.sync()
    _, sha3 = repo_at(deps_repo, tmp_path, {"vendor/lib/lib.py": "A = 2\n"})
    repo.sync()
    _, sha4 = repo_at(deps_repo, tmp_path, {"base.txt": "tqdm==4.66\n"})
    repo.sync()
    digests = [getattr(envs.find(repo, s, "train.py"), "digest", None) for s in (sha2, sha3, sha4)]
    assert d1 is not None and digests[0] == d1.digest  # unrelated change: same env
    assert len({d1.digest, digests[1], digests[2]}) == 3  # package or include changed: new env
    assert d1.env_name("3.11") == f"{d1.digest[:16]}-py3.11"


def test_invalid_pyproject_is_a_code_error(deps_repo: Path, tmp_path: Path) -> None:
    git(deps_repo, "rm", "-q", "requirements.txt")
    repo, sha = repo_at(deps_repo, tmp_path, {"pyproject.toml": "[project\n"})
    with pytest.raises(CodeError) as err:
        envs.find(repo, sha, "train.py")
    assert "pyproject.toml" in err.value.what and "--no-deps" in err.value.fix


def test_culprit_names_the_requirement_pip_or_uv_complains_about() -> None:
    assert culprit("ERROR: No matching distribution found for torch==9.9") == "torch==9.9"
    assert culprit("ERROR: Invalid requirement: './pkgs/x' (from line 2 of r.txt)") == "./pkgs/x"
    assert culprit("  ╰─▶ Because nosuchpkg was not found in the package registry") == "nosuchpkg"
    assert culprit("Successfully installed nothing") is None


@pytest.mark.skipif(shutil.which("dash") is None, reason="dash is not installed")
@pytest.mark.parametrize("generated", [None, "rich\n"])
@pytest.mark.parametrize("rebuild", [False, True])
def test_env_script_is_valid_dash(generated: str | None, rebuild: bool) -> None:
    script = setup_env("/opt/runctl", "r-1", "ab" * 32, "sub dir", "sub dir/requirements.txt", generated, rebuild)
    assert subprocess.run(["dash", "-n"], input=script, text=True, capture_output=True).returncode == 0
    assert script.startswith("RUNCTL_ROOT=/opt/runctl\n")
    assert "/opt/runctl" not in script.split("\n", 1)[1]
