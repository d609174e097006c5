"""The AWS sandbox: moto plus the shim that really runs SSM scripts with dash.

Uses the session-wide ``sandbox`` from conftest (moto's state is per process),
so other tests' instances may be around: assertions stick to our own.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from runctl_sandbox.aws import AMI_ID, MANAGED_TAG, Sandbox, SeedInfo, seed

if TYPE_CHECKING:
    from types_boto3_ec2 import EC2Client
    from types_boto3_s3 import S3Client
    from types_boto3_ssm import SSMClient
    from types_boto3_ssm.type_defs import GetCommandInvocationResultTypeDef

REGION = "us-east-1"
BUCKET = "runctl-test-artifacts"


@pytest.fixture(scope="module")
def fleet(sandbox: Sandbox) -> Iterator[SeedInfo]:
    info = seed(sandbox.endpoint_url, REGION, BUCKET)
    yield info
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=sandbox.endpoint_url)
    ec2.terminate_instances(InstanceIds=list(info.instances.values()))


@pytest.fixture(scope="module")
def aws() -> boto3.Session:
    return boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)


@pytest.fixture(scope="module")
def ssm(sandbox: Sandbox, aws: boto3.Session) -> SSMClient:
    return aws.client("ssm", endpoint_url=sandbox.endpoint_url)


@pytest.fixture(scope="module")
def ec2(sandbox: Sandbox, aws: boto3.Session) -> EC2Client:
    return aws.client("ec2", endpoint_url=sandbox.endpoint_url)


@pytest.fixture(scope="module")
def s3(sandbox: Sandbox, aws: boto3.Session) -> S3Client:
    return aws.client("s3", endpoint_url=sandbox.endpoint_url, config=Config(signature_version="s3v4"))


def _launch(ec2: EC2Client, **tags: str) -> str:
    reply = ec2.run_instances(
        ImageId=AMI_ID,
        InstanceType="t3.micro",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )
    return reply["Instances"][0]["InstanceId"]


def _send(ssm: SSMClient, instance_ids: list[str], *lines: str, **extra: Any) -> str:
    reply = ssm.send_command(
        InstanceIds=instance_ids,
        DocumentName="AWS-RunShellScript",
        Parameters={"commands": list(lines), **extra},
    )
    return reply["Command"]["CommandId"]


def _wait(
    ssm: SSMClient, command_id: str, instance_id: str, timeout: float = 10.0
) -> GetCommandInvocationResultTypeDef:
    deadline = time.monotonic() + timeout
    while True:
        inv = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
        if inv["Status"] not in ("Pending", "InProgress"):
            return inv
        assert time.monotonic() < deadline, f"still {inv['Status']}"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_failed_script_reports_exit_code_and_real_output(sandbox: Sandbox, fleet: SeedInfo, ssm: SSMClient) -> None:
    box = fleet.instances["gpu-box-1"]
    command_id = _send(ssm, [box], "echo hello from $AWS_SSM_INSTANCE_ID", "echo oops >&2", "exit 3")

    inv = _wait(ssm, command_id, box)

    assert inv["Status"] == "Failed"
    assert inv["ResponseCode"] == 3
    assert inv["StandardOutputContent"] == f"hello from {box}\n"
    assert inv["StandardErrorContent"] == "oops\n"
    assert inv["ExecutionEndDateTime"] >= inv["ExecutionStartDateTime"] != ""
    assert command_id in [c["CommandId"] for c in ssm.list_commands()["Commands"]]


def test_success_and_in_progress(fleet: SeedInfo, ssm: SSMClient) -> None:
    box = fleet.instances["gpu-box-1"]
    command_id = _send(ssm, [box], "sleep 0.5", "echo done")

    running = ssm.get_command_invocation(CommandId=command_id, InstanceId=box)
    done = _wait(ssm, command_id, box)

    assert (running["Status"], running["ResponseCode"]) == ("InProgress", -1)
    assert (done["Status"], done["ResponseCode"], done["StandardOutputContent"]) == (
        "Success",
        0,
        "done\n",
    )


def test_runctl_root_is_rewritten_to_the_instance_dir(sandbox: Sandbox, fleet: SeedInfo, ssm: SSMClient) -> None:
    box = fleet.instances["gpu-box-2"]
    command_id = _send(
        ssm,
        [box],
        "RUNCTL_ROOT=/home/ubuntu/runctl",
        'mkdir -p "$RUNCTL_ROOT/runs/r1"',
        'echo 42 > "$RUNCTL_ROOT/runs/r1/exit_code"',
        'echo "$RUNCTL_ROOT"',
    )

    inv = _wait(ssm, command_id, box)

    root = sandbox.instance_dir(box)
    assert inv["StandardOutputContent"] == f"{root}\n"
    assert (root / "runs" / "r1" / "exit_code").read_text() == "42\n"
    assert sandbox.sent_scripts(box)[-1].startswith(f"RUNCTL_ROOT={shlex.quote(str(root))}\n")


def test_scripts_get_exactly_the_agents_environment(sandbox: Sandbox, fleet: SeedInfo, ssm: SSMClient) -> None:
    """amazon-ssm-agent (executers.go, runshellscript.go): the commands in a `_script.sh`
    run by `sh -c`, with the agent's own environment plus AWS_SSM_*: under systemd
    that is PATH and nothing else, no HOME; in the agent's working directory."""
    box = fleet.instances["cpu-box"]
    os.environ["RUNCTL_LEAK_CHECK"] = "from the developer"
    try:
        command_id = _send(ssm, [box], "env", 'echo "cwd=$(pwd) script=$0"', 'echo "home=${HOME-unset}"')
        inv = _wait(ssm, command_id, box)
    finally:
        del os.environ["RUNCTL_LEAK_CHECK"]

    lines = inv["StandardOutputContent"].splitlines()
    env = dict(line.split("=", 1) for line in lines[:-2])
    env.pop("PWD", None)  # set by the shell itself
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "AWS_SSM_INSTANCE_ID": box,
        "AWS_SSM_REGION_NAME": "us-east-1",
        "AWS_SSM_PLATFORM_NAME": "ubuntu",
        "AWS_SSM_PLATFORM_VERSION": "22.04",
    }
    cwd, script = (part.split("=", 1)[1] for part in lines[-2].split())
    assert Path(script).name == "_script.sh" and not script.startswith(str(sandbox.instance_dir(box)))
    assert not cwd.startswith(str(sandbox.instance_dir(box)))
    assert lines[-1] == "home=unset"


def test_scripts_run_under_dash_not_bash(fleet: SeedInfo, ssm: SSMClient) -> None:
    box = fleet.instances["cpu-box"]
    command_id = _send(ssm, [box], "echo {a,b}", "[[ 1 == 1 ]] && echo bash", 'echo "rc=$?"')

    inv = _wait(ssm, command_id, box)

    assert inv["StandardOutputContent"] == "{a,b}\nrc=127\n"
    assert "[[: not found" in inv["StandardErrorContent"]


def test_only_detached_processes_outlive_the_command_until_the_instance_stops(
    sandbox: Sandbox, ec2: EC2Client, ssm: SSMClient
) -> None:
    box = _launch(ec2, Name="detach-box")
    command_id = _send(
        ssm,
        [box],
        "RUNCTL_ROOT=/opt/runctl",
        'cd "$RUNCTL_ROOT"',
        "setsid sh -c 'echo $$ > detached.pid; exec sleep 300' </dev/null >/dev/null 2>&1 &",
        "sleep 300 & echo $! > plain.pid",
        "while [ ! -s detached.pid ]; do sleep 0.01; done",
    )
    assert _wait(ssm, command_id, box)["Status"] == "Success"
    root = sandbox.instance_dir(box)
    detached = int((root / "detached.pid").read_text())
    plain = int((root / "plain.pid").read_text())

    assert _wait_dead(plain)
    assert _alive(detached)

    ec2.stop_instances(InstanceIds=[box])

    assert _wait_dead(detached)
    assert (root / "detached.pid").exists()  # the root volume survives a stop


def test_execution_timeout_kills_the_script(fleet: SeedInfo, ssm: SSMClient) -> None:
    box = fleet.instances["cpu-box"]
    started = time.monotonic()
    command_id = _send(ssm, [box], "echo start", "sleep 30", executionTimeout=["1"])

    inv = _wait(ssm, command_id, box)

    assert (inv["Status"], inv["StatusDetails"]) == ("TimedOut", "ExecutionTimedOut")
    assert inv["StandardOutputContent"] == "start\n"
    assert time.monotonic() - started < 5


def test_cancel_command_kills_the_script(fleet: SeedInfo, ssm: SSMClient) -> None:
    box = fleet.instances["gpu-box-2"]
    command_id = _send(ssm, [box], "sleep 30")

    ssm.cancel_command(CommandId=command_id)

    assert _wait(ssm, command_id, box)["Status"] == "Cancelled"


def test_output_is_truncated_like_ssm(fleet: SeedInfo, ssm: SSMClient) -> None:
    box = fleet.instances["gpu-box-1"]
    command_id = _send(ssm, [box], "yes x | head -c 60000", "yes e | head -c 20000 >&2")

    inv = _wait(ssm, command_id, box)

    assert len(inv["StandardOutputContent"]) == 24_000
    assert len(inv["StandardErrorContent"]) == 8_000


def test_describe_instance_information_follows_state_and_tags(fleet: SeedInfo, ec2: EC2Client, ssm: SSMClient) -> None:
    offline = _launch(ec2, **{"sandbox:ssm": "offline"})
    unmanaged = _launch(ec2, **{"sandbox:ssm": "none"})
    _launch(ec2, Name="one-more")  # so that the running ones need two pages of 5

    pages = list(ssm.get_paginator("describe_instance_information").paginate(PaginationConfig={"PageSize": 5}))
    ping = {i["InstanceId"]: i["PingStatus"] for p in pages for i in p["InstanceInformationList"]}

    assert len(pages) >= 2
    assert ping[fleet.instances["gpu-box-1"]] == "Online"
    assert ping[fleet.instances["not-managed"]] == "Online"
    assert ping[offline] == "ConnectionLost"
    assert fleet.instances["old-box"] not in ping
    assert unmanaged not in ping

    wanted = [fleet.instances["cpu-box"], offline, fleet.instances["old-box"]]
    filtered = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": wanted}])
    legacy = ssm.describe_instance_information(
        InstanceInformationFilterList=[{"key": "InstanceIds", "valueSet": wanted}]
    )
    for reply in (filtered, legacy):
        assert {i["InstanceId"] for i in reply["InstanceInformationList"]} == set(wanted[:2])


def test_command_to_an_offline_agent_stays_pending_until_cancelled(
    sandbox: Sandbox, ec2: EC2Client, ssm: SSMClient
) -> None:
    offline = _launch(ec2, **{"sandbox:ssm": "offline"})
    command_id = _send(ssm, [offline], "touch ran")

    pending = ssm.get_command_invocation(CommandId=command_id, InstanceId=offline)
    ssm.cancel_command(CommandId=command_id)
    cancelled = ssm.get_command_invocation(CommandId=command_id, InstanceId=offline)

    assert pending["Status"] == "Pending"
    assert cancelled["Status"] == "Cancelled"
    assert not (sandbox.instance_dir(offline) / "ran").exists()
    assert sandbox.sent_scripts(offline) == []


def test_commands_are_listed_for_their_instances_only(fleet: SeedInfo, ec2: EC2Client, ssm: SSMClient) -> None:
    lonely = _launch(ec2, Name="lonely")
    command_id = _send(ssm, [lonely], "true")

    mine = ssm.list_commands(InstanceId=lonely)["Commands"]
    others = ssm.list_commands(InstanceId=fleet.instances["cpu-box"])["Commands"]

    assert [c["CommandId"] for c in mine] == [command_id]
    assert mine[0]["InstanceIds"] == [lonely]
    assert command_id not in [c["CommandId"] for c in others]


def test_list_command_invocations_with_details(sandbox: Sandbox, fleet: SeedInfo, ssm: SSMClient) -> None:
    boxes = [fleet.instances[n] for n in ("gpu-box-1", "gpu-box-2", "cpu-box")]
    command_id = _send(ssm, boxes, "echo out $AWS_SSM_INSTANCE_ID", "echo err >&2", "exit 1")
    for box in boxes:
        _wait(ssm, command_id, box)

    reply = ssm.list_command_invocations(CommandId=command_id, Details=True)
    pages = ssm.get_paginator("list_command_invocations").paginate(
        CommandId=command_id, PaginationConfig={"PageSize": 1}
    )
    one = ssm.list_command_invocations(CommandId=command_id, InstanceId=boxes[1])

    invocations = reply["CommandInvocations"]
    assert [i["InstanceId"] for i in invocations] == boxes
    for inv in invocations:
        (plugin,) = inv["CommandPlugins"]
        assert inv["Status"] == plugin["Status"] == "Failed"
        assert plugin["Name"] == "aws:runShellScript"
        assert plugin["ResponseCode"] == 1
        assert plugin["Output"] == f"out {inv['InstanceId']}\n\n----------ERROR-------\nerr\n"
    assert [i["InstanceId"] for p in pages for i in p["CommandInvocations"]] == boxes
    assert [i["InstanceId"] for i in one["CommandInvocations"]] == [boxes[1]]
    assert one["CommandInvocations"][0]["CommandPlugins"] == []


def test_concurrent_commands_keep_their_own_results(fleet: SeedInfo, ssm: SSMClient) -> None:
    boxes = [fleet.instances[n] for n in ("gpu-box-1", "gpu-box-2", "cpu-box")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        sent = list(pool.map(lambda n: (n, _send(ssm, boxes, f"echo job-{n} $AWS_SSM_INSTANCE_ID")), range(12)))
        results = list(pool.map(lambda job: (job[0], [_wait(ssm, job[1], box) for box in boxes]), sent))

    for n, invocations in results:
        assert [i["StandardOutputContent"] for i in invocations] == [f"job-{n} {box}\n" for box in boxes]


def test_send_command_to_a_stopped_instance_is_rejected(fleet: SeedInfo, ssm: SSMClient) -> None:
    with pytest.raises(ClientError) as err:
        _send(ssm, [fleet.instances["old-box"]], "echo never")

    assert err.value.response["Error"]["Code"] == "InvalidInstanceId"


def test_a_fresh_instances_agent_registers_only_after_the_configured_delay(
    sandbox: Sandbox, fleet: SeedInfo, ec2: EC2Client, ssm: SSMClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox, "agent_online_after", 600.0)
    fresh = _launch(ec2, Name="fresh")
    listed = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [fresh]}])
    assert listed["InstanceInformationList"] == []  # not registered yet
    with pytest.raises(ClientError) as err:
        _send(ssm, [fresh], "echo too early")
    assert err.value.response["Error"]["Code"] == "InvalidInstanceId"
    sandbox.agent_online_after = 0.0  # the delay has passed
    listed = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [fresh]}])
    assert [i["PingStatus"] for i in listed["InstanceInformationList"]] == ["Online"]
    ec2.terminate_instances(InstanceIds=[fresh])


def test_unknown_invocation_does_not_exist(fleet: SeedInfo, ssm: SSMClient) -> None:
    with pytest.raises(ClientError) as err:
        ssm.get_command_invocation(
            CommandId="00000000-0000-0000-0000-000000000000",
            InstanceId=fleet.instances["gpu-box-1"],
        )

    assert err.value.response["Error"]["Code"] == "InvocationDoesNotExist"


def test_presigned_s3_url_downloads_from_a_script(
    sandbox: Sandbox, fleet: SeedInfo, s3: S3Client, ssm: SSMClient
) -> None:
    s3.put_object(Bucket=fleet.bucket, Key="bundles/b1.txt", Body=b"bundle bytes")
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": fleet.bucket, "Key": "bundles/b1.txt"}, ExpiresIn=60
    )
    box = fleet.instances["gpu-box-1"]
    command_id = _send(
        ssm,
        [box],
        "RUNCTL_ROOT=/opt/runctl",
        f'curl -sSf -o "$RUNCTL_ROOT/bundle.txt" {shlex.quote(url)}',
        'cat "$RUNCTL_ROOT/bundle.txt"',
    )

    inv = _wait(ssm, command_id, box)

    assert (inv["Status"], inv["StandardOutputContent"]) == ("Success", "bundle bytes")
    assert (sandbox.instance_dir(box) / "bundle.txt").read_bytes() == b"bundle bytes"


def test_presigned_download_refuses_sigv2_and_can_redirect_once(
    sandbox: Sandbox, fleet: SeedInfo, aws: boto3.Session, s3: S3Client, ssm: SSMClient
) -> None:
    s3.put_object(Bucket=fleet.bucket, Key="bundles/b2.txt", Body=b"v4 only")
    params = {"Bucket": fleet.bucket, "Key": "bundles/b2.txt"}
    v2 = aws.client("s3", endpoint_url=sandbox.endpoint_url, config=Config(signature_version="s3"))
    v2_url = v2.generate_presigned_url("get_object", Params=params, ExpiresIn=60)
    v4_url = s3.generate_presigned_url("get_object", Params=params, ExpiresIn=60)
    assert "X-Amz-Algorithm" not in v2_url and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in v4_url
    sandbox.s3.redirect_next()
    box = fleet.instances["cpu-box"]
    command_id = _send(
        ssm,
        [box],
        f"V2={shlex.quote(v2_url)}",
        f"V4={shlex.quote(v4_url)}",
        "curl -sS -o /dev/null -w 'v2 %{http_code}\\n' \"$V2\"",
        "curl -sS -o /dev/null -w 'redirect %{http_code}\\n' \"$V4\"",
        "curl -sS -w ' %{http_code}\\n' \"$V4\"",
    )

    inv = _wait(ssm, command_id, box)

    assert inv["StandardOutputContent"].splitlines() == ["v2 400", "redirect 307", "v4 only 200"]


def test_seeded_fleet_is_found_by_the_managed_tag(fleet: SeedInfo, ec2: EC2Client) -> None:
    # Paginated, as the fleet reads it: the session's sandbox holds more than one page.
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]}]
    )

    found = {
        i["InstanceId"]: (i["InstanceType"], i["State"]["Name"])
        for page in pages
        for r in page["Reservations"]
        for i in r["Instances"]
        if i["InstanceId"] in fleet.instances.values()
    }
    assert found == {
        fleet.instances["gpu-box-1"]: ("g5.xlarge", "running"),
        fleet.instances["gpu-box-2"]: ("p3.2xlarge", "running"),
        fleet.instances["cpu-box"]: ("t3.medium", "running"),
        fleet.instances["old-box"]: ("g4dn.xlarge", "stopped"),
    }
    assert fleet.instances.keys() == {"gpu-box-1", "gpu-box-2", "cpu-box", "old-box", "not-managed"}


def test_a_second_sandbox_in_the_process_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        Sandbox(tmp_path).start()


@pytest.mark.slow
def test_cli_serves_until_sigterm(tmp_path: Path, aws: boto3.Session) -> None:
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl_sandbox.aws", "--root", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "sandbox")])},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("sandbox listening on http://127.0.0.1:")
        ssm = aws.client("ssm", endpoint_url=line.split()[-1])
        # moto alone has no DescribeInstanceInformation: this answer comes from the shim.
        assert ssm.describe_instance_information()["InstanceInformationList"] == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_terminated_instance_stays_visible_for_a_while_then_ec2_forgets_it(sandbox: Sandbox, ec2: EC2Client) -> None:
    """AWS: "Terminated instances remain visible after termination (for approximately one
    hour)" (API_TerminateInstances); moto kept them forever."""
    old, new = _launch(ec2, Name="soon-gone"), _launch(ec2, Name="just-gone")
    ec2.terminate_instances(InstanceIds=[old])
    state = ec2.describe_instances(InstanceIds=[old])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "terminated"  # visible within the window
    window = sandbox.ec2.terminated_visible_seconds
    sandbox.ec2.terminated_visible_seconds = 0.0
    try:
        ec2.terminate_instances(InstanceIds=[new])  # the window has passed for the first
    finally:
        sandbox.ec2.terminated_visible_seconds = window
    with pytest.raises(ClientError) as gone:
        ec2.describe_instances(InstanceIds=[old])
    assert gone.value.response["Error"]["Code"] == "InvalidInstanceID.NotFound"
    named = ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": ["soon-gone", "just-gone"]}])
    assert [i["InstanceId"] for r in named["Reservations"] for i in r["Instances"]] == [new]  # just terminated
