"""The embedded AWS: moto in server mode behind the executing-SSM shim.

moto keeps its state in process globals, so one process holds at most one live
Sandbox, and ``start()`` begins from an empty AWS.

    python -m runctl_sandbox.aws --root DIR [--port N]

runs one in the foreground until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socketserver
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, ClassVar, Self

import boto3
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

from runctl_sandbox.ec2 import Ec2, Ec2Instance
from runctl_sandbox.ec2_launch import ACCOUNT_CODES
from runctl_sandbox.imds import Imds
from runctl_sandbox.price_list import PriceList
from runctl_sandbox.s3_gate import S3Gate
from runctl_sandbox.shim import AwsShim
from runctl_sandbox.ssm_agent import Agent

if TYPE_CHECKING:
    from types_boto3_ec2.client import EC2Client
    from types_boto3_ec2.literals import InstanceTypeType
    from types_boto3_ec2.type_defs import TagTypeDef
    from types_boto3_s3.client import S3Client

HOST = "127.0.0.1"
ACCESS_KEY = SECRET_KEY = "testing"
# "Deep Learning AMI Ubuntu Linux - 2.4_Oct2017", one of moto's default AMIs in every region.
AMI_ID = "ami-dca37ea5"
# "Deep Learning AMI Amazon Linux - 3.3_Oct2017": its root is /dev/xvda, like AL2023 DLAMIs'.
AMAZON_LINUX_AMI_ID = "ami-999844e0"
MANAGED_TAG = "runctl:managed"


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class Sandbox(ThreadedMotoServer):
    _live: ClassVar[Sandbox | None] = None
    _live_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, root: Path, region: str = "us-east-1", port: int = 0) -> None:
        super().__init__(ip_address=HOST, port=port, verbose=False)
        self.root = Path(root)
        self.region = region
        self._agent = Agent(self.root, self.instance_dir)
        self._ec2 = Ec2()
        self.spot_requests = self._ec2.spot
        self.ec2 = self._ec2  # its `clock` is what LaunchTime is set from on a start
        self.s3 = S3Gate()
        self.prices = PriceList()
        self._imds: Imds | None = None
        self._startup_error: BaseException | None = None

    def _server_entry(self) -> None:
        moto = DomainDispatcherApplication(create_backend_app)
        app = AwsShim(moto, self._agent, self.region, self._ec2, self.s3, self.prices)
        try:
            self._server = make_server(self._ip_address, self._port, app, threaded=True, request_handler=_QuietHandler)
            # Closing does not wait for request threads (daemons): one a client left waiting must not hold a stop.
            if isinstance(self._server, socketserver.ThreadingMixIn):
                self._server.block_on_close = False
        except BaseException as exc:  # start() waits on the event: never leave it unset
            self._startup_error = exc
            self._server_ready_event.set()
            return
        self._server_ready_event.set()
        self._server.serve_forever()

    def start(self) -> None:
        with Sandbox._live_lock:
            if Sandbox._live is not None:
                raise RuntimeError("a Sandbox is already running in this process")
            Sandbox._live = self
        # AWS-managed policies (AmazonSSMManagedInstanceCore) exist in every real account.
        os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            super().start()
            if self._startup_error is not None:
                self._thread = None
                raise self._startup_error
            reset = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
            with urllib.request.urlopen(reset, timeout=10):
                pass
        except BaseException:
            with Sandbox._live_lock:
                Sandbox._live = None
            raise

    def stop(self) -> None:
        """Stop serving and kill every process the shim started, detached ones too."""
        if self._thread is None:
            return
        super().stop()
        if self._server is not None:
            self._server.server_close()
        self._thread = None
        self._agent.shutdown()
        self.spot_requests.shutdown()
        self._ec2.network.shutdown()
        with Sandbox._live_lock:
            if Sandbox._live is self:
                Sandbox._live = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": self.region,
        }

    def instance_dir(self, instance_id: str) -> Path:
        """The directory standing in for the instance's remote root."""
        path = self.root / "instances" / instance_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def agent_online_after(self) -> float:
        """Seconds after RunInstances before a fresh instance's SSM agent registers (Online)."""
        return Ec2Instance.online_after

    @agent_online_after.setter
    def agent_online_after(self, seconds: float) -> None:
        Ec2Instance.online_after = seconds

    def exhaust(self, instance_type: str, zone: str, full: bool = True) -> None:
        """Make RunInstances of ``instance_type`` in ``zone`` fail with InsufficientInstanceCapacity."""
        if full:
            self._ec2.exhausted.add((instance_type, zone))
        else:
            self._ec2.exhausted.discard((instance_type, zone))

    def unsupported(self, instance_type: str, zone: str, on: bool = True) -> None:
        """Make RunInstances of ``instance_type`` in ``zone`` answer Unsupported (a type the zone does not offer)."""
        if on:
            self._ec2.rules.unsupported.add((instance_type, zone))
        else:
            self._ec2.rules.unsupported.discard((instance_type, zone))

    def account_limit(self, code: str, on: bool = True) -> None:
        """Make RunInstances answer ``code`` as a new account does: VcpuLimitExceeded for on-demand
        launches; MaxSpotInstanceCountExceeded or AuthFailure.ServiceLinkedRoleCreationNotPermitted
        (no right to create AWSServiceRoleForEC2Spot) for spot launches."""
        if code not in ACCOUNT_CODES:
            raise ValueError(f"{code} is not one of {ACCOUNT_CODES}")
        if on:
            self._ec2.rules.account.add(code)
        else:
            self._ec2.rules.account.discard(code)

    def slow(self, instance_id: str, seconds: float, matching: str = "") -> None:
        """Every script sent to ``instance_id`` from now on (only those containing
        ``matching``, if given) waits ``seconds`` (InProgress) before it runs; 0 ends that."""
        if seconds:
            self._agent.delays[instance_id] = (seconds, matching)
        else:
            self._agent.delays.pop(instance_id, None)

    def private_ip(self, instance_id: str) -> str:
        """The instance's private IP: its own loopback address (runctl_sandbox/network.py)."""
        return self._ec2.network.address(instance_id)

    def block_port(self, instance_id: str, port: int, blocked: bool = True) -> None:
        """Drop TCP connections to the instance's private IP on ``port`` (no security-group rule
        allows it: connects time out); ``blocked=False`` adds the rule back."""
        if blocked:
            self._ec2.network.block(instance_id, port)
        else:
            self._ec2.network.unblock(instance_id, port)

    @contextlib.contextmanager
    def metadata(self) -> Iterator[Imds]:
        """A fake IMDS for every instance while the block runs (spot notices to raise)."""
        imds = Imds(HOST)
        imds.start()
        self._agent.metadata_endpoint = imds.endpoint
        self._imds = imds
        try:
            yield imds
        finally:
            self._imds = None
            self._agent.metadata_endpoint = None
            imds.stop()

    def interrupt(
        self, instance_id: str, action: str = "stop", after: float = 2.0, restart_after: float | None = None
    ) -> dict[str, str]:
        """A spot interruption: the notice in the IMDS (inside ``metadata()``), then, ``after``
        seconds later (the notice's two minutes, scaled), EC2 stops or terminates the instance;
        a stopped one with a persistent request EC2 restarts ``restart_after`` seconds later,
        unless the request was cancelled (which terminates it). ``spot_requests`` has the sources."""
        if self._imds is None:
            raise RuntimeError("interrupt() needs the metadata service: call it inside `with sandbox.metadata()`")
        imds = self._imds
        notice = imds.raise_notice(instance_id, action)
        self.spot_requests.interrupt(
            DEFAULT_ACCOUNT_ID,
            self.region,
            instance_id,
            action,
            after,
            restart_after,
            lambda: imds.clear_notice(instance_id),
        )
        return notice

    def sent_log(self, instance_id: str) -> list[tuple[float, str]]:
        """``sent_scripts`` with when each arrived (``time.monotonic()``)."""
        return self._agent.sent_log(instance_id)

    def sent_scripts(self, instance_id: str) -> list[str]:
        """The scripts the shim ran on ``instance_id``, oldest first, as run
        (that is, with ``RUNCTL_ROOT`` rewritten)."""
        return self._agent.sent_scripts(instance_id)


# --- seeding ------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedInfo:
    instances: dict[str, str]  # Name tag -> instance id
    bucket: str


# name, instance type, managed, running
SEED_INSTANCES: tuple[tuple[str, InstanceTypeType, bool, bool], ...] = (
    ("gpu-box-1", "g5.xlarge", True, True),
    ("gpu-box-2", "p3.2xlarge", True, True),
    ("cpu-box", "t3.medium", True, True),
    ("old-box", "g4dn.xlarge", True, False),
    ("not-managed", "t3.micro", False, True),
)


@functools.cache
def _clients(endpoint_url: str, region: str) -> tuple[S3Client, EC2Client]:
    """seed's S3 and EC2 clients, made once per sandbox and region (a client costs ~0.15 s)."""
    session = boto3.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=region)
    return session.client("s3", endpoint_url=endpoint_url), session.client("ec2", endpoint_url=endpoint_url)


def seed(endpoint_url: str, region: str, bucket: str) -> SeedInfo:
    """Create the demo fleet and bucket through the public API."""
    s3, ec2 = _clients(endpoint_url, region)
    if region == "us-east-1":
        s3.create_bucket(Bucket=bucket)
    else:
        s3.create_bucket(
            Bucket=bucket,
            CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
        )
    instances: dict[str, str] = {}
    for name, instance_type, managed, running in SEED_INSTANCES:
        tags: list[TagTypeDef] = [{"Key": "Name", "Value": name}]
        if managed:
            tags.append({"Key": MANAGED_TAG, "Value": "true"})
        reply = ec2.run_instances(
            ImageId=AMI_ID,
            InstanceType=instance_type,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
        instances[name] = reply["Instances"][0]["InstanceId"]
        if not running:
            ec2.stop_instances(InstanceIds=[instances[name]])
    return SeedInfo(instances=instances, bucket=bucket)


@dataclass(frozen=True)
class LaunchSeed:
    ami: str
    subnets: tuple[str, ...]  # the default VPC's, one per zone, in zone order
    zones: tuple[str, ...]
    security_group: str
    instance_profile: str  # its role has AmazonSSMManagedInstanceCore
    bare_profile: str  # its role has no policy: an agent with it never registers


def seed_launch(endpoint_url: str, region: str) -> LaunchSeed:
    """What an admin's launch template names: network, security group and instance profiles."""
    session = boto3.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=region)
    ec2 = session.client("ec2", endpoint_url=endpoint_url)
    iam = session.client("iam", endpoint_url=endpoint_url)
    subnets = sorted(
        (s["AvailabilityZone"], s["SubnetId"])
        for s in ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    )
    suffix = os.urandom(3).hex()
    group = ec2.create_security_group(GroupName=f"runctl-{suffix}", Description="runctl instances")["GroupId"]
    trust = (
        '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},'
        '"Action":"sts:AssumeRole"}]}'
    )
    names = []
    for kind, policy in (("ssm", "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"), ("bare", None)):
        name = f"runctl-{kind}-{suffix}"
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust)
        if policy:
            iam.attach_role_policy(RoleName=name, PolicyArn=policy)
        iam.create_instance_profile(InstanceProfileName=name)
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        names.append(name)
    return LaunchSeed(AMI_ID, tuple(s for _, s in subnets), tuple(z for z, _ in subnets), group, names[0], names[1])


# --- CLI ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runctl_sandbox.aws", description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="directory for instance roots")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    parser.add_argument("--region", default="us-east-1", help="default region")
    args = parser.parse_args(argv)

    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with Sandbox(args.root, region=args.region, port=args.port) as sandbox:
        print(f"sandbox listening on {sandbox.endpoint_url}", flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is stopped; skip the interpreter's teardown of moto's module
    # state, which takes seconds.
    os._exit(code)
