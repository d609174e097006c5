"""SSM Run Command, answered from what the sandbox's agent really did (runctl_sandbox/ssm_agent.py):
moto records ``SendCommand`` but executes nothing and lacks ``DescribeInstanceInformation``
and ``ListCommandInvocations``."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from moto.ssm.models import ssm_backends

from runctl_sandbox import wire
from runctl_sandbox.ec2 import ec2_instances
from runctl_sandbox.ssm_agent import PLUGIN, Agent, Invocation
from runctl_sandbox.wire import ApiError, RequestContext

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication, WSGIEnvironment

DOCUMENT = "AWS-RunShellScript"
DEFAULT_TIMEOUT = 3_600
# SSM quotas: a document's content, with the parameters given at run time, is at most 64 KB;
# SendCommand answers MaxDocumentSizeExceeded (botocore's SSM model). AWS-RunShellScript's own
# content is about 1 KB; the sandbox counts that much plus the parameters as JSON.
MAX_DOCUMENT_BYTES = 64 * 1024
DOCUMENT_BYTES = 1_024
AGENT_VERSION = "3.3.987.0"


class Ssm:
    """The SSM API calls moto lacks or gets wrong; ``app`` is moto, which records the commands."""

    def __init__(self, app: WSGIApplication, agent: Agent) -> None:
        self._app = app
        self._agent = agent

    def send_command(
        self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        document = str(payload.get("DocumentName", ""))
        if document != DOCUMENT:
            raise ApiError("InvalidDocument", f"the sandbox only runs {DOCUMENT}, not {document!r}")
        parameters = payload.get("Parameters") or {}
        commands = parameters.get("commands")
        if not isinstance(commands, list) or not commands:
            raise ApiError("InvalidParameters", "Parameters.commands is required")
        if DOCUMENT_BYTES + len(json.dumps(parameters).encode()) > MAX_DOCUMENT_BYTES:
            raise ApiError("MaxDocumentSizeExceeded", "The size limit of a document is 64 KB.")
        timeout = _int_param(parameters.get("executionTimeout", [DEFAULT_TIMEOUT])[0], "executionTimeout")
        delivery = DEFAULT_TIMEOUT
        if payload.get("TimeoutSeconds") is not None:
            # Stricter than AWS, where TimeoutSeconds only bounds delivery.
            delivery = _int_param(payload["TimeoutSeconds"], "TimeoutSeconds")
            timeout = min(timeout, delivery)

        known = ec2_instances(ctx.account_id, ctx.region)
        requested = list(dict.fromkeys(str(i) for i in payload.get("InstanceIds") or []))
        bad = [iid for iid in requested if iid not in known or known[iid].ssm == "none"]
        if bad:
            raise ApiError(
                "InvalidInstanceId",
                f"Instances {bad} not in a valid state for account {ctx.account_id}",
            )

        status, headers, body = wire.call_app(self._app, environ)
        if not status.startswith("200"):
            return status, headers, body
        command = json.loads(body)["Command"]
        targeted: list[str] = []
        if payload.get("Targets"):
            # moto resolved the Targets into InstanceIds (unordered).
            targeted = [
                iid
                for iid in command.get("InstanceIds", [])
                if iid not in requested and iid in known and known[iid].ssm != "none"
            ]
        else:
            # Without Targets moto adds every EC2 instance to the command, which
            # breaks ListCommands(InstanceId=...): keep only the ones asked for.
            _pin_moto_command(ctx, str(command["CommandId"]), requested)
            command.update(InstanceIds=requested, TargetCount=len(requested), CompletedCount=len(requested))
            body = json.dumps({"Command": command}).encode()
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        script = "\n".join(str(line) for line in commands)
        requested_at = wire.now()
        for iid in requested + targeted:
            inv = Invocation(
                command_id=str(command["CommandId"]),
                instance_id=iid,
                document_name=document,
                comment=str(payload.get("Comment", "")),
                requested=requested_at,
            )
            if known[iid].ssm == "offline":
                self._agent.hold(inv, delivery)
            elif known[iid].ssm == "undeliverable":
                self._agent.undeliverable(inv)
            else:
                self._agent.run(inv, script, timeout, ctx.region)
        return status, headers, body

    def get_command_invocation(
        self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        plugin = payload.get("PluginName")
        if plugin not in (None, PLUGIN):
            raise ApiError("InvalidPluginName", f"no plugin {plugin!r} in this invocation")
        inv = self._agent.invocation(str(payload.get("CommandId")), str(payload.get("InstanceId")))
        if inv is None:
            raise ApiError("InvocationDoesNotExist")
        return inv.get_result()

    def list_command_invocations(
        self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        command_id = payload.get("CommandId")
        invocations = self._agent.invocations(str(command_id) if command_id else None)
        if command_id and not invocations:
            raise ApiError("InvalidCommandId")
        if payload.get("InstanceId"):
            invocations = [i for i in invocations if i.instance_id == payload["InstanceId"]]
        for flt in payload.get("Filters") or []:
            field = {"Status": "status", "DocumentName": "document_name"}.get(flt.get("key"))
            if field is None:
                raise ApiError("InvalidFilterKey", f"the sandbox cannot filter on {flt.get('key')!r}")
            invocations = [i for i in invocations if getattr(i, field) == flt.get("value")]
        # Newest command first, like AWS; within a command the instances keep their order.
        invocations.sort(key=lambda i: i.requested, reverse=True)
        page, token = wire.page(invocations, payload, low=1)
        result: dict[str, Any] = {"CommandInvocations": [i.list_entry(bool(payload.get("Details"))) for i in page]}
        if token:
            result["NextToken"] = token
        return result

    def describe_instance_information(
        self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        now = wire.now()
        infos = [
            {
                "InstanceId": inst.id,
                "PingStatus": "ConnectionLost" if inst.ssm == "offline" else "Online",
                "LastPingDateTime": (now - timedelta(minutes=30) if inst.ssm == "offline" else now).timestamp(),
                "AgentVersion": AGENT_VERSION,
                "IsLatestVersion": True,
                "PlatformType": "Linux",
                "PlatformName": "Ubuntu",
                "PlatformVersion": "22.04",
                "ResourceType": "EC2Instance",
                "IPAddress": inst.private_ip,
                "ComputerName": f"ip-{inst.private_ip.replace('.', '-')}.ec2.internal",
                "SourceId": inst.id,
                "SourceType": "AWS::EC2::Instance",
            }
            for inst in ec2_instances(ctx.account_id, ctx.region).values()
            if inst.ssm != "none"
        ]
        wanted: list[tuple[str, list[str]]] = [
            (str(f.get("Key")), list(f.get("Values") or [])) for f in payload.get("Filters") or []
        ] + [
            (str(f.get("key")), list(f.get("valueSet") or []))
            for f in payload.get("InstanceInformationFilterList") or []
        ]
        fields = {
            "InstanceIds": "InstanceId",
            "PingStatus": "PingStatus",
            "PlatformTypes": "PlatformType",
            "ResourceType": "ResourceType",
        }
        for key, values in wanted:
            if key not in fields:
                raise ApiError("InvalidFilterKey", f"the sandbox cannot filter on {key!r}")
            infos = [info for info in infos if info[fields[key]] in values]
        page, token = wire.page(infos, payload, low=5)
        result: dict[str, Any] = {"InstanceInformationList": page}
        if token:
            result["NextToken"] = token
        return result

    def cancel_command(self, environ: WSGIEnvironment, ctx: RequestContext, payload: dict[str, Any]) -> dict[str, Any]:
        command_id = str(payload.get("CommandId"))
        if not self._agent.invocations(command_id):
            raise ApiError("InvalidCommandId")
        self._agent.cancel(command_id, [str(i) for i in payload.get("InstanceIds") or []])
        return {}


def _pin_moto_command(ctx: RequestContext, command_id: str, instance_ids: list[str]) -> None:
    command = ssm_backends[ctx.account_id][ctx.region].get_command_by_id(command_id)
    command.instance_ids = list(instance_ids)
    command.target_count = command.completed_count = len(instance_ids)
    command.invocations = [command.invocation_response(iid, PLUGIN) for iid in instance_ids]


def _int_param(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ApiError("InvalidParameters", f"{name} must be a whole number of seconds") from exc
