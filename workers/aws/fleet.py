"""The fleet: EC2, SSM and S3 through boto3. botocore errors stop here and
come out as our own typed errors (`boundary`)."""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from workers.aws import names
from workers.aws.boundary import BOTO_CONFIG, aws_call, translate
from workers.aws.instance import CommandStatus, Instance, ScriptResult
from workers.cost import pricelist
from workers.errors import (
    AgentOffline,
    InstanceNotFound,
    NotManaged,
    RemoteTimeout,
)
from workers.slack.escape import code

# Buckets created since June 2020 refuse SigV2, which botocore still presigns with in some
# regions; virtual addressing names the bucket's regional host (no 307 from the global one).
# A price is never worth holding up a sweep: two tries, short timeouts, then the table.
PRICING_CONFIG = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=3, read_timeout=10)
S3_CONFIG = BOTO_CONFIG.merge(Config(signature_version="s3v4", s3={"addressing_style": "virtual"}))
SSM_OUTPUT_LIMIT = 24_000
LIST_OUTPUT_LIMIT = 2_500  # ListCommandInvocations truncates each output here
PRESIGN_SECONDS = 300
PRESIGN_MARGIN_SECONDS = 60
AGENT_WAIT_SECONDS = 300  # for the SSM agent of an instance that just started or launched


class Fleet:
    """Every region in ``regions`` (RUNCTL_REGIONS; default: the session's own). An instance
    is found in whichever region holds it, and its EC2 and SSM calls go to that region.
    S3 is one bucket, called in its own region; instances anywhere fetch from it through
    presigned URLs on the bucket's regional host."""

    def __init__(
        self,
        scope: tuple[str, str] | None,
        bucket: str | None = None,
        session: boto3.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        regions: Sequence[str] = (),
    ) -> None:
        self.scope = scope
        self.bucket = bucket
        self.session = session or boto3.Session()
        self.sleep = sleep
        self.clock = clock
        self.ec2: Any = self.session.client("ec2", config=BOTO_CONFIG)
        self.ssm: Any = self.session.client("ssm", config=BOTO_CONFIG)
        self.s3: Any = self.session.client("s3", config=S3_CONFIG)
        self.region = str(self.ec2.meta.region_name)  # the worker's own: launches, S3 client
        self.regions: tuple[str, ...] = tuple(dict.fromkeys(regions)) or (self.region,)
        self._clients: dict[tuple[str, str], Any] = {("ec2", self.region): self.ec2, ("ssm", self.region): self.ssm}
        self._where: dict[str, str] = {}  # instance id -> its region (instances never move)
        self._presigner: Any = None
        self._pricing: Any = None

    # --- regions -------------------------------------------------------------
    def client(self, service: Literal["ec2", "ssm"], region: str) -> Any:
        key = (service, region)
        if key not in self._clients:
            self._clients[key] = self.session.client(service, region_name=region, config=BOTO_CONFIG)
        return self._clients[key]

    @property
    def regions_text(self) -> str:
        return " or ".join(self.regions)

    def _locate(self, instance_id: str) -> str | None:
        """The region holding the instance (managed or not); None when none of them does."""
        if instance_id in self._where:
            return self._where[instance_id]
        for region in self.regions:
            with aws_call("describe instances"):
                try:
                    pages = self.client("ec2", region).describe_instances(InstanceIds=[instance_id])
                except ClientError as exc:
                    if str(exc.response.get("Error", {}).get("Code", "")) == "InvalidInstanceID.NotFound":
                        continue
                    raise
            if any(r.get("Instances") for r in pages.get("Reservations", [])):
                self._where[instance_id] = region
                return region
        return None

    def region_of(self, instance_id: str) -> str:
        """Where the instance's calls go: its region, or the first one while it is unknown
        (whose answer, InvalidInstanceID, then says so)."""
        if len(self.regions) == 1:
            return self.regions[0]
        return self._locate(instance_id) or self.regions[0]

    def _by_region(self, instance_ids: Sequence[str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for iid in instance_ids:
            grouped.setdefault(self.region_of(iid), []).append(iid)
        return grouped

    def region_of_zone(self, availability_zone: str) -> str:
        return next((r for r in self.regions if availability_zone.startswith(r)), self.region)

    # --- EC2 ---------------------------------------------------------------
    def describe(self, instance_ids: list[str] | None = None) -> list[Instance]:
        return list(self.iter_instances(instance_ids))

    def iter_instances(self, instance_ids: list[str] | None = None, page_size: int = 1000) -> Iterator[Instance]:
        """Managed instances, region by region (in RUNCTL_REGIONS order)."""
        if instance_ids:
            for region, ids in self._by_region(instance_ids).items():
                yield from self._describe_in(region, {"InstanceIds": ids})
            return
        for region in self.regions:
            yield from self._describe_in(region, {"PaginationConfig": {"PageSize": page_size}})

    def _describe_in(self, region: str, kwargs: dict[str, Any]) -> Iterator[Instance]:
        filters = []
        if self.scope:
            filters.append({"Name": f"tag:{self.scope[0]}", "Values": [self.scope[1]]})
        with aws_call("describe instances"):
            paginator = self.client("ec2", region).get_paginator("describe_instances")
            for page in paginator.paginate(Filters=filters, **kwargs):
                for reservation in page.get("Reservations", []):
                    for raw in reservation.get("Instances", []):
                        inst = self._instance(raw, region)
                        self._where[inst.id] = region
                        yield inst

    def _instance(self, raw: Mapping[str, Any], region: str) -> Instance:
        tags = {t["Key"]: t["Value"] for t in raw.get("Tags", []) or []}
        return Instance(
            id=raw["InstanceId"],
            type=raw.get("InstanceType", ""),
            state=raw.get("State", {}).get("Name", "unknown"),
            region=region,
            name=tags.get("Name", ""),
            launch_time=raw.get("LaunchTime"),
            availability_zone=raw.get("Placement", {}).get("AvailabilityZone", ""),
            lifecycle=raw.get("InstanceLifecycle", "on-demand"),
            tags=tags,
            private_ip=raw.get("PrivateIpAddress", "") or "",
            vpc_id=raw.get("VpcId", "") or "",
        )

    def get(self, instance_id: str) -> Instance:
        """One managed instance; an instance outside the scope is refused. Both refusals
        carry the same public answer, so non-admins never learn which instance ids exist."""
        try:
            found = self.describe([instance_id])
        except InstanceNotFound:
            found = []
        if found:
            return found[0]
        where = self.regions_text
        public = InstanceNotFound(
            f"runctl manages no instance {instance_id} in {where}.",
            why="It does not exist there, or runctl may not touch it; an admin can tell which.",
            fix="`/runctl resources` lists the instances runctl manages.",
        )
        elsewhere = "another region" if len(self.regions) == 1 else "a region not in RUNCTL_REGIONS"
        with aws_call("describe instances"):
            try:
                pages = self.client("ec2", self.region_of(instance_id)).describe_instances(InstanceIds=[instance_id])
            except ClientError as exc:
                if "InvalidInstanceID" in str(exc.response.get("Error", {}).get("Code", "")):
                    raise InstanceNotFound(
                        f"Instance {instance_id} does not exist in {where}.",
                        why=f"It may have been terminated long ago, or live in {elsewhere}.",
                        fix="/runctl resources",
                        public=public,
                    ) from None
                raise
        if not any(r.get("Instances") for r in pages.get("Reservations", [])):
            raise InstanceNotFound(f"Instance {instance_id} does not exist in {where}.", public=public)
        assert self.scope is not None
        key, value = self.scope
        raise NotManaged(
            f"Instance {instance_id} is not managed by runctl.",
            why=f"runctl only touches instances tagged `{key}={value}`.",
            fix=f"aws ec2 create-tags --resources {instance_id} --tags Key={key},Value={value}",
            public=public,
        )

    def named(self, name: str) -> Instance:
        """The managed instance whose `Name` tag is `name` after case and Unicode folding
        (terminated ones aside); none, or several, are refused with what to type instead (the
        nearest names, the candidates). An exact match wins nothing over a folded one: either
        could be the one meant, so both are candidates."""
        live = [i for i in self.iter_instances() if i.state not in names.GONE]
        found = names.answering(name, live)
        if len(found) == 1:
            return found[0]
        if found:
            listed = ", ".join(f"{i.label} `{i.state}`" for i in found[:10])
            raise InstanceNotFound(
                f"{len(found)} instances runctl manages are named {code(name)}: {listed}.",
                why=f"A name picks one instance only when it is unique ({names.HOW}).",
                fix="Use the instance id.",
            )
        close = difflib.get_close_matches(name, sorted({i.name for i in live if i.name}), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(code(n) for n in close)}?" if close else ""
        raise InstanceNotFound(
            f"runctl manages no instance named {code(name)} in {self.region}.{hint}",
            why="A name is an instance's `Name` tag, among the instances runctl manages.",
            fix="`/runctl resources` lists them with their names.",
        )

    def start(self, instance_id: str) -> None:
        with aws_call(f"start {instance_id}"):
            self.client("ec2", self.region_of(instance_id)).start_instances(InstanceIds=[instance_id])

    def stop(self, instance_id: str) -> None:
        with aws_call(f"stop {instance_id}"):
            self.client("ec2", self.region_of(instance_id)).stop_instances(InstanceIds=[instance_id])

    def spot_request_type(self, instance_id: str) -> str:
        """``one-time`` or ``persistent``: only a persistent spot request's instance can be
        stopped. An instance with no request on record counts as one-time (RunInstances'
        default)."""
        with aws_call(f"describe the spot request of {instance_id}"):
            reply = self.client("ec2", self.region_of(instance_id)).describe_spot_instance_requests(
                Filters=[{"Name": "instance-id", "Values": [instance_id]}]
            )
        types = {str(r.get("Type", "")) for r in reply.get("SpotInstanceRequests", [])}
        return "persistent" if types == {"persistent"} else "one-time"

    def live_spot_requests(self, instance_id: str) -> list[str]:
        """The ids of the instance's spot requests still ``open``, ``active`` or ``disabled``: a
        persistent one outlives its instance, and EC2 launches another instance for it."""
        with aws_call(f"describe the spot request of {instance_id}"):
            reply = self.client("ec2", self.region_of(instance_id)).describe_spot_instance_requests(
                Filters=[
                    {"Name": "instance-id", "Values": [instance_id]},
                    {"Name": "state", "Values": ["open", "active", "disabled"]},
                ]
            )
        return [str(r["SpotInstanceRequestId"]) for r in reply.get("SpotInstanceRequests", [])]

    def cancel_spot_requests(self, instance_id: str, request_ids: list[str]) -> None:
        """Cancelling leaves the instance alone (it must be terminated on its own)."""
        with aws_call(f"cancel the spot request {', '.join(request_ids)} of {instance_id}"):
            self.client("ec2", self.region_of(instance_id)).cancel_spot_instance_requests(
                SpotInstanceRequestIds=request_ids
            )

    def terminate(self, instance_id: str) -> None:
        with aws_call(f"terminate {instance_id}"):
            self.client("ec2", self.region_of(instance_id)).terminate_instances(InstanceIds=[instance_id])

    def wait_for_state(self, instance_id: str, wanted: tuple[str, ...], timeout: float, poll: float = 5.0) -> Instance:
        deadline = self.clock() + timeout
        delay = min(1.0, poll)
        while True:
            inst = self.get(instance_id)
            if inst.state in wanted:
                return inst
            if self.clock() >= deadline:
                raise RemoteTimeout(
                    f"{inst.label} is still `{inst.state}` after {int(timeout)} s (waiting for {' or '.join(wanted)}).",
                    fix=f"/runctl status {instance_id}",
                )
            self.sleep(delay)
            delay = min(delay * 2, poll)

    # --- SSM ---------------------------------------------------------------
    def require_agent(self, inst: Instance, purpose: str) -> None:
        """The one preflight for "its SSM agent is online": AgentOffline, with the fix, if not."""
        ping = self.agent_status([inst.id]).get(inst.id)
        if ping != "Online":
            raise AgentOffline(
                f"The SSM agent on {inst.label} is {ping or 'not registered'}.",
                why=f"runctl {purpose} through SSM Run Command.",
                fix="Attach an instance profile with the AmazonSSMManagedInstanceCore policy and "
                "make sure amazon-ssm-agent is running (`sudo systemctl status amazon-ssm-agent`).",
            )

    def wait_for_agent(self, inst: Instance, timeout: float = AGENT_WAIT_SECONDS) -> None:
        """Until the SSM agent of an instance that just started is Online: AgentOffline after `timeout`."""
        deadline = self.clock() + timeout
        delay = 0.5
        while True:
            ping = self.agent_status([inst.id]).get(inst.id)
            if ping == "Online":
                return
            if self.clock() >= deadline:
                raise AgentOffline(
                    f"{inst.label} is running, but its SSM agent is {ping or 'not registered'} after {int(timeout)} s.",
                    why="runctl reaches instances through SSM Run Command; training can't start without it.",
                    fix="Check `sudo systemctl status amazon-ssm-agent` on the instance and its instance profile "
                    f"(AmazonSSMManagedInstanceCore), then `/runctl status {inst.id}`.",
                )
            self.sleep(delay)
            delay = min(delay * 2, 10.0)

    def agent_status(self, instance_ids: list[str]) -> dict[str, str]:
        status: dict[str, str] = {}
        with aws_call("check the SSM agent"):
            for region, ids in self._by_region(instance_ids).items():
                paginator = self.client("ssm", region).get_paginator("describe_instance_information")
                for page in paginator.paginate(Filters=[{"Key": "InstanceIds", "Values": ids}]):
                    for info in page.get("InstanceInformationList", []):
                        status[info["InstanceId"]] = info.get("PingStatus", "Unknown")
        return status

    def send(self, instance_ids: list[str], script: str, timeout: int = 600) -> str:
        """One SendCommand, to the first instance's region: pass instances of one region."""
        with aws_call("send a command through SSM"):
            resp = self.client("ssm", self.region_of(instance_ids[0])).send_command(
                InstanceIds=instance_ids,
                DocumentName="AWS-RunShellScript",
                Parameters={"commands": [script], "executionTimeout": [str(timeout)]},
                TimeoutSeconds=max(30, min(timeout, 2_592_000)),
                Comment="runctl",
            )
        return str(resp["Command"]["CommandId"])

    def result(self, command_id: str, instance_id: str) -> ScriptResult | None:
        """The finished result, or None while the command still runs."""
        try:
            ssm = self.client("ssm", self.region_of(instance_id))
            inv = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvocationDoesNotExist":
                return None  # not registered yet: SSM is eventually consistent
            raise translate(exc, "read a command result") from exc
        except BotoCoreError as exc:
            raise translate(exc, "read a command result") from exc
        if inv["Status"] in ("Pending", "InProgress", "Delayed"):
            return None
        return ScriptResult(
            instance_id=instance_id,
            status=cast("CommandStatus", inv["Status"]),
            exit_code=int(inv.get("ResponseCode", -1)),
            stdout=inv.get("StandardOutputContent", ""),
            stderr=inv.get("StandardErrorContent", ""),
            details=str(inv.get("StatusDetails", "")),
        )

    def run(self, instance_id: str, script: str, timeout: int = 120, first_poll: float = 0.1) -> ScriptResult:
        return self.run_many([instance_id], script, timeout, first_poll)[instance_id]

    def results(self, command_id: str, instance_ids: list[str]) -> dict[str, ScriptResult]:
        """Finished results of one command; one ListCommandInvocations call serves up to 50
        instances, and an output SSM truncated there is fetched whole."""
        if len(instance_ids) == 1:
            one = self.result(command_id, instance_ids[0])
            return {instance_ids[0]: one} if one else {}
        done: dict[str, ScriptResult] = {}
        wanted = set(instance_ids)
        with aws_call("read command results"):
            ssm = self.client("ssm", self.region_of(instance_ids[0]))
            pages = ssm.get_paginator("list_command_invocations").paginate(CommandId=command_id, Details=True)
            for page in pages:
                for inv in page.get("CommandInvocations", []):
                    iid = inv.get("InstanceId", "")
                    if iid not in wanted or inv.get("Status") in ("Pending", "InProgress", "Delayed"):
                        continue
                    plugins = inv.get("CommandPlugins") or [{}]
                    output = str(plugins[0].get("Output", ""))
                    if len(output) >= LIST_OUTPUT_LIMIT - 100:
                        full = self.result(command_id, iid)
                        if full is not None:
                            done[iid] = full
                        continue
                    done[iid] = ScriptResult(
                        instance_id=iid,
                        status=cast("CommandStatus", str(inv["Status"])),
                        exit_code=int(plugins[0].get("ResponseCode", -1)),
                        stdout=output,
                        stderr="",
                        details=str(inv.get("StatusDetails", "")),
                    )
        return done

    def run_many(
        self, instance_ids: list[str], script: str, timeout: int = 120, first_poll: float = 0.1
    ) -> dict[str, ScriptResult]:
        """Send one script to many instances (≤ 50 per SendCommand) and wait for all results,
        polling after first_poll seconds, then 1.5 times longer each time, up to 2 s. Someone waits on the short
        default (a train is 4 commands); the monitor, which no one waits on, passes more."""
        results: dict[str, ScriptResult] = {}
        by_region = self._by_region(instance_ids).values()
        batches = [ids[start : start + 50] for ids in by_region for start in range(0, len(ids), 50)]
        for batch in batches:
            command_id = self.send(batch, script, timeout)
            deadline = self.clock() + timeout + 30
            pending = list(batch)
            delay = first_poll
            while pending:
                self.sleep(delay)
                for iid, res in self.results(command_id, pending).items():
                    results[iid] = res
                    pending.remove(iid)
                if pending and self.clock() > deadline:
                    raise RemoteTimeout(
                        f"The SSM command {command_id} did not finish within {timeout} s.",
                        fix="Check the instance's SSM agent, then retry.",
                    )
                delay = min(delay * 1.5, 2.0)
        return results

    # --- prices -------------------------------------------------------------
    def spot_price_history(self, availability_zone: str, instance_type: str) -> list[Mapping[str, Any]]:
        """Today's Linux spot quotes for one type in one zone (pricing keeps the newest)."""
        with aws_call("look up spot prices"):
            response = self.client("ec2", self.region_of_zone(availability_zone)).describe_spot_price_history(
                AvailabilityZone=availability_zone,
                InstanceTypes=[instance_type],
                ProductDescriptions=["Linux/UNIX"],
                StartTime=datetime.now(UTC),
            )
        return list(response.get("SpotPriceHistory", []))

    def on_demand_products(self, region: str, instance_type: str) -> list[str]:
        """The Price List's entries (JSON text) for one type's Linux on-demand price in one
        region. The API is served from us-east-1 for every region."""
        with aws_call("look up on-demand prices"):
            if self._pricing is None:
                self._pricing = self.session.client("pricing", region_name="us-east-1", config=PRICING_CONFIG)
            pages = self._pricing.get_paginator("get_products").paginate(
                ServiceCode="AmazonEC2", Filters=pricelist.filters(region, instance_type)
            )
            return [str(raw) for page in pages for raw in page.get("PriceList", [])]

    # --- S3 ----------------------------------------------------------------
    def has_object(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise translate(exc, f"check s3://{self.bucket}/{key}") from exc
        return True

    def upload(self, key: str, data: bytes) -> None:
        with aws_call(f"upload the code bundle to s3://{self.bucket}"):
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def bucket_region(self) -> str:
        """The bucket's own region: S3 names it in ``x-amz-bucket-region`` on HeadBucket,
        on a 403 or 301 too; the worker's region when it does not."""
        headers: Mapping[str, str]
        try:
            headers = self.s3.head_bucket(Bucket=self.bucket)["ResponseMetadata"]["HTTPHeaders"]
        except ClientError as exc:
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        except BotoCoreError as exc:
            raise translate(exc, f"find the region of s3://{self.bucket}") from exc
        return str(headers.get("x-amz-bucket-region") or self.region)

    def presign(self, key: str, seconds: int = PRESIGN_SECONDS, method: str = "get_object") -> str:
        """A SigV4 URL (GET, or ``put_object``) on the bucket's regional endpoint, valid for ``seconds``."""
        with aws_call(f"presign s3://{self.bucket}/{key}"):
            if self._presigner is None:
                self._presigner = self.session.client("s3", region_name=self.bucket_region(), config=S3_CONFIG)
            return str(
                self._presigner.generate_presigned_url(
                    method, Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=seconds
                )
            )

    def object_size(self, key: str) -> int | None:
        """The object's size, or None when there is none."""
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise translate(exc, f"check s3://{self.bucket}/{key}") from exc
        return int(head.get("ContentLength", 0))

    def read_object(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            return bytes(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise translate(exc, f"read s3://{self.bucket}/{key}") from exc

    def put_object(self, key: str, data: bytes) -> None:
        with aws_call(f"write s3://{self.bucket}/{key}"):
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def download(self, key: str, path: Path) -> int:
        """Fetch an object into ``path`` (streamed, never whole in memory); its size."""
        with aws_call(f"download s3://{self.bucket}/{key}"):
            self.s3.download_file(self.bucket, key, str(path))
        return path.stat().st_size

    def keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix`` (ListObjectsV2, 1,000 a page)."""
        with aws_call(f"list s3://{self.bucket}/{prefix}"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [str(item["Key"]) for page in pages for item in page.get("Contents", [])]

    def delete(self, key: str) -> None:
        with aws_call(f"delete s3://{self.bucket}/{key}"):
            self.s3.delete_object(Bucket=self.bucket, Key=key)
