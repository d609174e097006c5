"""Code bundles reach the instance the way S3 really serves them: SigV4 only,
redirects followed, and a failed download or unpack says which, and why."""

from __future__ import annotations

from urllib.parse import parse_qs

from runctl_sandbox.aws import Sandbox, SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.jobs.train import DELIVER_SECONDS
from workers.services import Services
from workers.state.runs import RunState

from .test_train_flow import start, thread_texts

QUICK = ("--epochs", "1", "--steps-per-epoch", "1", "--step-seconds", "0")


def test_bundle_url_is_sigv4_and_outlives_the_commands_timeouts(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, worker: InlineWorker
) -> None:
    before = len(sandbox.s3.seen)
    run_id = start(fleet_seed.instances["cpu-box"], "train_with_checkpoints.py", *QUICK)
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.SUCCEEDED, run.error
    (query,) = sandbox.s3.seen[before:]
    params = parse_qs(query)
    assert params["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    # SSM may hold the command for its delivery timeout, then run it for its execution timeout.
    assert int(params["X-Amz-Expires"][0]) >= 2 * DELIVER_SECONDS


def test_a_307_from_s3_is_followed(svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, worker: InlineWorker) -> None:
    sandbox.s3.redirect_next()
    run_id = start(fleet_seed.instances["cpu-box"], "train_with_checkpoints.py", *QUICK)
    worker.drain()
    run = svc.runs.get(run_id)
    assert run is not None
    assert run.state is RunState.SUCCEEDED, run.error


def test_a_failed_download_names_the_http_status_and_the_body(
    svc: Services, fleet_seed: SeedInfo, sandbox: Sandbox, slack: FakeSlack
) -> None:
    sandbox.s3.expire_next()
    run = svc.runs.get(start(fleet_seed.instances["cpu-box"], "train_with_checkpoints.py", *QUICK))
    assert run is not None and run.state is RunState.REFUSED and run.error is not None
    assert "could not download the code bundle" in run.error.what
    assert (
        "HTTP 403" in run.error.why
        and "&lt;Code&gt;AccessDenied&lt;/Code&gt;&lt;Message&gt;Request has expired" in run.error.why
    )  # escaped for Slack
    assert "X-Amz-Signature" not in str(run.error)  # the URL itself never reaches Slack
    assert any("HTTP 403" in t and "<@U0ALICE>" in t for t in thread_texts(slack, "C0TRAIN", run.message_ts))


def test_a_bundle_that_does_not_unpack_says_what_arrived(svc: Services, fleet_seed: SeedInfo, slack: FakeSlack) -> None:
    svc.repo.sync()
    sha = svc.repo.resolve("main")
    key = f"runctl/bundles/{sha}.tar.gz"
    svc.fleet.upload(key, b"<html>captive portal</html>")
    try:
        run = svc.runs.get(start(fleet_seed.instances["cpu-box"], "train_with_checkpoints.py", *QUICK))
    finally:  # bundles are cached by sha in the session's bucket: later runs must get the real one
        svc.fleet.s3.delete_object(Bucket=svc.fleet.bucket, Key=key)
    assert run is not None and run.state is RunState.REFUSED and run.error is not None
    assert "could not unpack the code bundle" in run.error.what
    assert "HTTP 200, 27 bytes" in run.error.why and "&lt;html&gt;captive portal" in run.error.why
