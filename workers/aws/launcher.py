"""Launching instances from the admins' launch file, never from ids typed in chat.

``RUNCTL_LAUNCH_FILE`` (TOML or YAML, re-read when it changes)::

    [template]                       # AMI, network and profile for every launch
    ami = "ami-0123456789abcdef0"
    subnets = ["subnet-aaa", "subnet-bbb"]   # tried in order; a full zone moves on to the next
    security_groups = ["sg-0123"]
    instance_profile = "runctl-instance"     # with AmazonSSMManagedInstanceCore
    disk_gb = 100
    [presets.gpu]
    instance_type = "g5.xlarge"
    disk_gb = 200                    # optional, else the template's
    users = ["U0ALICE", "S0MLTEAM"]  # optional: who may use it; empty = whoever may launch
    [limits]
    instance_types = ["t3.medium"]   # launchable by type name; admins may launch any priced type
    user_instances = 2               # concurrent launched instances per person
    user_usd_per_hour = 5
    team_instances = 10
    team_usd_per_hour = 40
    disk_gb = 500                    # the largest `--disk` anyone may ask (a preset's own size always goes)
    admin_disk_gb = 2000             # the largest an admin may ask
"""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, WaiterError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.aws.boundary import BOTO_CONFIG, translate
from workers.aws.fleet import Fleet
from workers.aws.instance import Instance
from workers.aws.quotas import launch_refusal
from workers.errors import AwsError, ConfigError, RunctlError

log = logging.getLogger(__name__)

OWNER_TAG = "runctl:user"
PRESET_TAG = "runctl:preset"
CAPACITY_CODES = ("InsufficientInstanceCapacity", "InsufficientCapacity", "UnfulfillableCapacity")
# A full zone stays full for minutes: retrying it in place only delays the next zone.
RUN_CONFIG = BOTO_CONFIG.merge(Config(retries={"mode": "adaptive", "max_attempts": 1}))

_AMI = r"^ami-[0-9a-f]{8,17}$"


class Template(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    ami: str = Field(pattern=_AMI)
    subnets: tuple[str, ...] = Field(min_length=1)
    security_groups: tuple[str, ...] = ()
    instance_profile: str = Field(min_length=1)
    disk_gb: int = Field(100, ge=8, le=16384)


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    instance_type: str = Field(pattern=r"^[a-z0-9-]+\.[a-z0-9-]+$")
    disk_gb: int | None = Field(None, ge=8, le=16384)
    spot: bool = False
    users: tuple[str, ...] = ()


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    instance_types: tuple[str, ...] = ()
    user_instances: int = Field(2, ge=0)
    user_usd_per_hour: Decimal = Field(Decimal(10), ge=0)
    team_instances: int = Field(10, ge=0)
    team_usd_per_hour: Decimal = Field(Decimal(50), ge=0)
    disk_gb: int = Field(500, ge=8, le=16384)
    admin_disk_gb: int = Field(2000, ge=8, le=16384)


class LaunchFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    template: Template
    presets: dict[str, Preset] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)


_cache: dict[Path, tuple[tuple[int, int], LaunchFile]] = {}
_lock = threading.Lock()


def load(path: Path | None) -> LaunchFile:
    if path is None:
        raise ConfigError(
            "Launching is not set up here.",
            why="runctl launches only from an admin-defined template, and RUNCTL_LAUNCH_FILE is not set.",
            fix="An admin writes the launch file (docs/lifecycle.md, Launch) and sets RUNCTL_LAUNCH_FILE.",
        )
    try:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        with _lock:
            if path in _cache and _cache[path][0] == stamp:
                return _cache[path][1]
        text = path.read_text(encoding="utf-8")
        data: Any = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else tomllib.loads(text)
        parsed = LaunchFile.model_validate(data or {})
    except OSError as exc:
        raise _invalid(path, f"it cannot be read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise _invalid(path, f"it does not parse: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise _invalid(path, f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    with _lock:
        _cache[path] = (stamp, parsed)
    return parsed


def _invalid(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"The launch file {path} is invalid, so nothing can be launched.",
        why=why,
        fix=f"Fix {path} (docs/lifecycle.md, Launch); the change takes effect on the next launch.",
    )


@dataclass(frozen=True)
class Spec:
    """One launch, fully resolved: what the confirmation shows and the click launches."""

    preset: str  # the preset's name, or the instance type when launched by type
    instance_type: str
    spot: bool
    disk_gb: int
    name: str
    region: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Spec:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Held:
    """What the requester and the team already run from launches."""

    user_instances: int
    user_usd_per_hour: Decimal
    team_instances: int
    team_usd_per_hour: Decimal
    unpriced: int  # launched instances whose price is unknown, left out of the sums


def launched(instances: Iterable[Instance]) -> list[Instance]:
    """Instances runctl launched that cost compute now (pending or running)."""
    return [i for i in instances if PRESET_TAG in i.tags and i.state in ("pending", "running")]


class CapacityError(AwsError):
    pass


_roots: dict[tuple[str, str], str] = {}  # (region, AMI) -> its RootDeviceName; an AMI never changes it
_roots_lock = threading.Lock()


# AWS managed policies that let the SSM agent register (the second is the deprecated one).
SSM_POLICIES = ("AmazonSSMManagedInstanceCore", "AmazonEC2RoleforSSM")


def _ssm_notes(iam: Any, profile: str, role: str) -> list[str]:
    """The role's policies: an SSM managed policy is enough; none at all is refused; others
    (customer policies may grant what the agent needs) make a note, not a refusal."""
    attached = [p["PolicyName"] for p in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]]
    if any(p in SSM_POLICIES for p in attached):
        return []
    inline = iam.list_role_policies(RoleName=role)["PolicyNames"]
    if not attached and not inline:
        raise RunctlError(
            f"The instance profile `{profile}`'s role `{role}` has no policies, so no SSM agent would "
            "register on what it launches: runctl could not train there while it bills.",
            why="The agent needs AmazonSSMManagedInstanceCore (or the same permissions) on the instance's role.",
            fix=f"An admin runs `aws iam attach-role-policy --role-name {role} "
            "--policy-arn arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore`.",
        )
    return [
        f":warning: The instance profile's role `{role}` does not have AmazonSSMManagedInstanceCore; "
        "runctl could not confirm its other policies let the SSM agent register (without it nothing "
        "can train on the instance)."
    ]


class Launcher:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.ec2: Any = fleet.session.client("ec2", config=RUN_CONFIG)

    def check_template(self, template: Template, launch_file: Path | None) -> list[str]:
        """Before anyone is asked to click [Launch]: the template's subnets and its instance
        profile exist (RunInstances would refuse them only after the click), and the profile's
        role lets the SSM agent register (else the instance bills and nothing can train on it).
        Returns notes for the confirmation (what could not be confirmed). A worker without the
        IAM read permissions skips those checks; RunInstances still checks the profile."""
        where = f"`{launch_file}`" if launch_file else "the launch file"
        for subnet in template.subnets:
            try:
                self.fleet.ec2.describe_subnets(SubnetIds=[subnet])
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code", "").startswith("InvalidSubnetID"):
                    raise RunctlError(
                        f"The launch template's subnet `{subnet}` does not exist in {self.fleet.region}.",
                        why=f"{where} names subnets that RunInstances would refuse (InvalidSubnetID.NotFound).",
                        fix=f"An admin sets `[template] subnets` in {where} to subnets of this account and region "
                        "(`aws ec2 describe-subnets`).",
                    ) from exc
                raise translate(exc, f"describe subnet {subnet} of the launch template") from exc
            except BotoCoreError as exc:
                raise translate(exc, f"describe subnet {subnet} of the launch template") from exc
        iam = self.fleet.session.client("iam", config=BOTO_CONFIG)
        name = template.instance_profile
        try:
            roles = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"].get("Roles", [])
            if not roles:
                raise RunctlError(
                    f"The launch template's instance profile `{name}` has no role, so no SSM agent would "
                    "register on what it launches: runctl could not train there while it bills.",
                    why=f"{where} names it; the agent's permissions come from the profile's role.",
                    fix=f"An admin adds a role with AmazonSSMManagedInstanceCore: `aws iam "
                    f"add-role-to-instance-profile --instance-profile-name {name} --role-name ROLE`.",
                )
            return _ssm_notes(iam, name, str(roles[0]["RoleName"]))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "NoSuchEntity":
                raise RunctlError(
                    f"The launch template's instance profile `{name}` does not exist.",
                    why=f"{where} names it; RunInstances would refuse it, and without it no SSM agent registers.",
                    fix=f"An admin creates it (its role with AmazonSSMManagedInstanceCore) or names another "
                    f"in {where}.",
                ) from exc
            log.warning("instance profile %s not checked: %s", name, code)
        except BotoCoreError as exc:
            log.warning("instance profile %s not checked: %s", name, exc)
        return []

    def zone_of(self, subnet: str) -> str:
        try:
            found = self.fleet.ec2.describe_subnets(SubnetIds=[subnet])["Subnets"]
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"describe subnet {subnet} of the launch template") from exc
        return str(found[0]["AvailabilityZone"]) if found else ""

    def run(self, template: Template, spec: Spec, user_id: str, token: str, scope: tuple[str, str] | None) -> str:
        """RunInstances in the template's subnets in turn; returns the instance id.

        ``token`` makes each attempt idempotent (ClientToken): a retried job launches nothing twice."""
        tags = [
            {"Key": "Name", "Value": spec.name},
            {"Key": OWNER_TAG, "Value": user_id},
            {"Key": PRESET_TAG, "Value": spec.preset},
        ]
        if scope is not None:
            tags.append({"Key": scope[0], "Value": scope[1]})
        root = self.root_device(template.ami)
        full: list[str] = []
        unsupported: list[str] = []
        for index, subnet in enumerate(template.subnets):
            kwargs: dict[str, Any] = {
                "ImageId": template.ami,
                "InstanceType": spec.instance_type,
                "MinCount": 1,
                "MaxCount": 1,
                "ClientToken": f"{token}-{index}",
                "SubnetId": subnet,
                "IamInstanceProfile": {"Name": template.instance_profile},
                "BlockDeviceMappings": [
                    {
                        "DeviceName": root,
                        "Ebs": {"VolumeSize": spec.disk_gb, "VolumeType": "gp3", "DeleteOnTermination": True},
                    }
                ],
                "TagSpecifications": [
                    {"ResourceType": "instance", "Tags": tags},
                    {"ResourceType": "volume", "Tags": tags},
                ],
                "MetadataOptions": {"HttpTokens": "required"},
            }
            if template.security_groups:
                kwargs["SecurityGroupIds"] = list(template.security_groups)
            if spec.spot:
                # Persistent with stop: a one-time spot instance cannot be stopped, and stopping is
                # what autostop and `--then stop` do.
                kwargs["InstanceMarketOptions"] = {
                    "MarketType": "spot",
                    "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"},
                }
            try:
                reply = self.ec2.run_instances(**kwargs)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in CAPACITY_CODES:
                    full.append(self.zone_of(subnet) or subnet)
                    continue
                if code == "Unsupported" and "Availability Zone" in str(exc.response.get("Error", {}).get("Message")):
                    unsupported.append(self.zone_of(subnet) or subnet)
                    continue
                vcpus = self.vcpus(spec.instance_type) if code.endswith("Exceeded") else None
                raise launch_refusal(exc, spec.instance_type, spec.spot, self.fleet.region, vcpus) from exc
            except BotoCoreError as exc:
                raise translate(exc, f"launch a {spec.instance_type}") from exc
            return str(reply["Instances"][0]["InstanceId"])
        raise self.capacity_error(spec, full, unsupported)

    def root_device(self, ami: str) -> str:
        """The AMI's root device name (`/dev/xvda` on Amazon Linux, `/dev/sda1` on Ubuntu): a
        mapping for any other name adds a second volume and leaves the root at the AMI's size."""
        key = (self.fleet.region, ami)
        with _roots_lock:
            if key in _roots:
                return _roots[key]
        try:
            images = self.fleet.ec2.describe_images(ImageIds=[ami])["Images"]
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"describe the launch template's AMI {ami}") from exc
        if not images or not images[0].get("RootDeviceName"):
            raise ConfigError(
                f"The launch template's AMI {ami} is not available in {self.fleet.region}; nothing was launched.",
                why="DescribeImages does not list it (deregistered, private to another account, or another region's).",
                fix="An admin sets `ami` in the launch file to a current AMI of this region "
                "(docs/lifecycle.md, Launch).",
            )
        root = str(images[0]["RootDeviceName"])
        with _roots_lock:
            _roots[key] = root
        return root

    def vcpus(self, instance_type: str) -> int | None:
        try:
            found = self.fleet.ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
            return int(found[0]["VCpuInfo"]["DefaultVCpus"]) if found else None
        except (ClientError, BotoCoreError, KeyError, ValueError):
            return None

    def capacity_error(self, spec: Spec, full: list[str], unsupported: list[str] | None = None) -> CapacityError:
        unsupported = unsupported or []
        zones = [z for z in self.offered_zones(spec.instance_type) if z not in full + unsupported]
        kind = "spot " if spec.spot else ""
        where = (
            f"Offered in this region also in: {', '.join(zones)}."
            if zones
            else (f"No other zone of {self.fleet.region} offers {spec.instance_type}.")
        )
        regions = self.offered_regions(spec.instance_type)
        if regions:
            where += f" Other regions offering it: {', '.join(regions)}."
        if not full:
            return CapacityError(
                f"{spec.instance_type} is not offered in {', '.join(unsupported)}, the zones of the launch "
                "template's subnets; nothing was launched.",
                code="Unsupported",
                why=where,
                fix="Ask an admin to add a subnet in one of those zones to the launch template, or pick another "
                "preset.",
            )
        missing = f" ({spec.instance_type} is not offered in {', '.join(unsupported)})" if unsupported else ""
        return CapacityError(
            f"AWS has no {kind}capacity for {spec.instance_type} in {', '.join(full)} right now{missing}; "
            "nothing was launched.",
            code="InsufficientInstanceCapacity",
            why=where,
            fix="Ask an admin to add a subnet in one of those zones to the launch template, try again later, "
            + ("or launch without `--spot`." if spec.spot else "or try `--spot` or another preset."),
        )

    def offered_zones(self, instance_type: str) -> list[str]:
        try:
            pages = self.fleet.ec2.get_paginator("describe_instance_type_offerings").paginate(
                LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [instance_type]}]
            )
            return sorted({str(o["Location"]) for page in pages for o in page.get("InstanceTypeOfferings", [])})
        except (ClientError, BotoCoreError):
            return []

    def offered_regions(self, instance_type: str, limit: int = 6) -> list[str]:
        """Other regions whose offerings list the type (one call per region, a few regions)."""
        try:
            names = [r["RegionName"] for r in self.fleet.ec2.describe_regions()["Regions"]]
        except (ClientError, BotoCoreError):
            return []
        found: list[str] = []
        for name in sorted(n for n in names if n != self.fleet.region):
            if len(found) >= limit:
                break
            try:
                client = self.fleet.session.client("ec2", region_name=name, config=BOTO_CONFIG)
                offers = client.describe_instance_type_offerings(
                    LocationType="region", Filters=[{"Name": "instance-type", "Values": [instance_type]}]
                )["InstanceTypeOfferings"]
            except (ClientError, BotoCoreError):
                continue
            if offers:
                found.append(name)
        return found

    def wait_running(self, instance_id: str, delay: float, timeout: float) -> None:
        waiter = self.fleet.ec2.get_waiter("instance_running")
        try:
            waiter.wait(
                InstanceIds=[instance_id], WaiterConfig={"Delay": delay, "MaxAttempts": max(1, int(timeout / delay))}
            )
        except WaiterError as exc:
            raise AwsError(
                f"{instance_id} did not reach `running` within {int(timeout)} s.",
                why=str(exc),
                fix=f"/runctl status {instance_id}",
            ) from exc
