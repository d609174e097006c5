"""The environment step of a run: after the code is on the instance and before
training starts, reuse or build the virtualenv its requirements need."""

from __future__ import annotations

import hashlib
import re

from workers.aws.instance import PYTHON_TAG, ScriptResult
from workers.code import envs
from workers.errors import EnvSetupError
from workers.remote import SECTION, bounds, frame
from workers.remote import env as env_scripts
from workers.services import Services
from workers.slack.escape import code, escape
from workers.slack.format import duration
from workers.slack.thread import publish
from workers.state.runs import Run, RunState

TIMEOUT_SECONDS = 1800
DETAIL_CHARS = 2000

# What pip and uv print about the requirement they could not install, most specific first.
_CULPRIT = (
    re.compile(r"Invalid requirement: '([^']+)'"),
    re.compile(r"No matching distribution found for (\S+)"),
    re.compile(r"Could not find a version that satisfies the requirement (\S+)"),
    re.compile(r"Directory '([^']+)' is not installable"),
    re.compile(r"Failed (?:building wheel for|to build) `?([^\s`]+)"),
    re.compile(r"Because (\S+) was not found"),
    re.compile(r"Distribution not found at: (\S+)"),
    re.compile(r"No such file or directory: '([^']+)'"),
)


def requirements(svc: Services, run: Run) -> envs.Requirements | None:
    """The requirements this run needs an environment for, or None (noted on the run)."""
    if not run.deps:
        run.notes.append(f":package: `--no-deps`: no environment step; the run uses `{run.python}`.")
        return None
    if not run.sync_code:
        run.notes.append(
            ":package: `--no-sync-code`: no environment step (requirements are read at a commit); "
            f"the run uses `{run.python}`."
        )
        return None
    reqs = envs.find(svc.repo, run.sha, run.script)
    if reqs is None:
        run.notes.append(
            f":package: No `requirements.txt` or `pyproject.toml` dependencies for {code(run.script)} "
            f"at {code(run.ref)}; the run uses {code(run.python)}."
        )
    elif reqs.empty:
        run.notes.append(
            f":package: {code(reqs.source)} names no packages; no environment step, the run uses {code(run.python)}."
        )
        return None
    return reqs


def build(svc: Services, run: Run, reqs: envs.Requirements) -> str:
    """Reuse or build the environment on the instance; return its interpreter."""
    run.state = RunState.SETTING_UP
    publish(svc, run)
    # One environment per requirements *and* base interpreter: it sees that one's packages.
    digest = hashlib.sha256(f"{reqs.digest}\0{run.python}".encode()).hexdigest()
    script = env_scripts.setup_env(
        svc.settings.RUNCTL_REMOTE_ROOT,
        run.run_id,
        digest,
        reqs.workdir,
        reqs.source,
        reqs.text if reqs.from_pyproject else None,
        rebuild=run.rebuild_env,
        python=run.python,
    )
    began = svc.clock()
    result = svc.fleet.run(run.instance_id, script, timeout=TIMEOUT_SECONDS)
    run.setup_seconds = (svc.clock() - began).total_seconds()
    report = _parse(result.stdout)
    if not result.ok:
        raise setup_error(run, reqs, result, report)
    run.env_hash = report.get("env")
    built_at, _, installer = report.get("built", report.get("reused", "")).partition(" ")
    run.env_built_at = bounds.instant(built_at)
    took = duration(run.setup_seconds)
    if "built" in report:
        pruned = f"; pruned {report['pruned']} old one(s)" if "pruned" in report else ""
        run.notes.append(
            f":package: Built environment {code(run.env_hash)} from {code(reqs.source)} with {escape(installer)} "
            f"in {took}{pruned}. Later runs with the same requirements reuse it."
        )
    else:
        run.notes.append(f":package: Reused environment {code(run.env_hash)} ({took}).")
    publish(svc, run)
    return f"$RUNCTL_ROOT/envs/{run.env_hash}/bin/python"


def _parse(stdout: str) -> dict[str, str]:
    """The script's ``SECTION`` lines as key -> value; ``pruned`` becomes a count."""
    found: dict[str, str] = {}
    pruned = 0
    for line in stdout.splitlines():
        if not line.startswith(SECTION):
            continue
        key, _, value = line[len(SECTION) :].partition(" ")
        if key == "pruned":
            pruned += 1
        else:
            found[key] = value.strip()
    if pruned:
        found["pruned"] = str(pruned)
    return found


def _log_tail(stdout: str) -> str:
    """setup.log's last lines, as the script sent them (encoded: pip's output is the repo's)."""
    return (frame.text(_parse(stdout).get("tail", "")) or "").strip()[-DETAIL_CHARS:]


def culprit(log: str) -> str | None:
    """The requirement pip (or uv) says it could not install, if it says."""
    for pattern in _CULPRIT:
        match = pattern.search(log)
        if match:
            return match.group(1).rstrip(".,:;")
    return None


def setup_error(run: Run, reqs: envs.Requirements, result: ScriptResult, report: dict[str, str]) -> EnvSetupError:
    where = f"{code(reqs.source)} at {code(run.ref)}" + (f" ({run.sha[:10]})" if run.sha else "")
    log = _log_tail(result.stdout) or result.stderr.strip()[-DETAIL_CHARS:]
    retry = code(run.command_text)
    reason = report.get("failed", "")
    if result.status == "TimedOut":
        return EnvSetupError(
            f"Setting up the environment on {run.instance_id} took longer than "
            f"{TIMEOUT_SECONDS // 60} min; training was not started.",
            why=f"Installing {where} did not finish. The half-built environment is rebuilt next time.",
            fix=f"Look at `setup.log` in the run directory, then retry: {retry}.",
            detail=log,
        )
    if reason == "venv":
        return EnvSetupError(
            f"Could not create a virtualenv on {run.instance_id}; training was not started.",
            why=f"`{run.python} -m venv` failed; on Debian/Ubuntu the venv module is a separate package.",
            fix=f"On the instance: `sudo apt-get install -y python3-venv`, then retry: {retry}. "
            f"Or add `--no-deps` to run with `{run.python}` itself.",
            detail=log,
        )
    if reason == "no-python":
        return EnvSetupError(
            f"{run.instance_id} has no `{run.python}` on the SSM agent's PATH; training was not started.",
            why="Scripts run with the agent's PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin).",
            fix=f"Tag the instance with its interpreter: `aws ec2 create-tags --resources {run.instance_id} "
            f"--tags Key={PYTHON_TAG},Value=/path/to/python` (or set RUNCTL_PYTHON), then retry: {retry}.",
        )
    if reason == "locked":
        return EnvSetupError(
            f"Another build of environment {code(report.get('env', '?'))} on {run.instance_id} "
            "held its lock too long; training was not started.",
            why="Two runs never build the same environment at once.",
            fix=f"`/runctl status {run.instance_id}`, then retry: {retry}.",
        )
    name = culprit(log)
    what = (
        f"Installing {code(name)} failed on {run.instance_id}; training was not started."
        if name
        else f"Installing the requirements failed on {run.instance_id} "
        f"(exit {result.exit_code}); training was not started."
    )
    return EnvSetupError(
        what,
        why=f"The run's environment comes from {where}. The half-built environment was removed.",
        fix=f"Fix {code(reqs.source)}, push, and run the same command again: {retry}. "
        "`--no-deps` skips the environment step.",
        detail=log,
    )
