"""WSGI middleware in front of moto: each request goes to the sandbox's fake that answers it
(SSM Run Command really runs scripts; EC2 capacity, spot and power; S3's presigned-request
checks; the Price List API), everything else to moto."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from werkzeug.http import HTTP_STATUS_CODES

from runctl_sandbox import wire
from runctl_sandbox.ec2 import Ec2
from runctl_sandbox.price_list import PriceList
from runctl_sandbox.s3_gate import S3Gate
from runctl_sandbox.ssm import Ssm
from runctl_sandbox.ssm_agent import Agent
from runctl_sandbox.wire import ApiError, RequestContext

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


class AwsShim:
    """The WSGI middleware; ``app`` is moto's dispatcher."""

    def __init__(
        self,
        app: WSGIApplication,
        agent: Agent,
        default_region: str,
        ec2: Ec2 | None = None,
        s3: S3Gate | None = None,
        prices: PriceList | None = None,
    ) -> None:
        self._app = app
        self._default_region = default_region
        self._ec2 = ec2 or Ec2()
        self._s3 = s3 or S3Gate()
        self._prices = prices or PriceList()
        ssm = Ssm(app, agent)
        self._handlers: dict[str, Callable[[WSGIEnvironment, RequestContext, dict[str, Any]], Any]] = {
            "AmazonSSM.SendCommand": ssm.send_command,
            "AmazonSSM.GetCommandInvocation": ssm.get_command_invocation,
            "AmazonSSM.ListCommandInvocations": ssm.list_command_invocations,
            "AmazonSSM.DescribeInstanceInformation": ssm.describe_instance_information,
            "AmazonSSM.CancelCommand": ssm.cancel_command,
            "AWSPriceListService.GetProducts": lambda environ, ctx, payload: self._prices.get_products(payload),
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        handler = self._handlers.get(environ.get("HTTP_X_AMZ_TARGET", ""))
        ctx = wire.context(environ, self._default_region)
        s3_answer = self._s3.check(environ) if handler is None else None
        if s3_answer is not None:
            code, headers, body = s3_answer
            headers = [*headers, ("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
            return wire.reply(start_response, f"{code} {HTTP_STATUS_CODES[code]}", headers, body)
        try:
            if handler is not None:
                try:
                    payload = json.loads(wire.read_body(environ) or b"{}")
                except ValueError as exc:
                    raise ApiError("SerializationException", "the body is not JSON") from exc
                result = handler(environ, ctx, payload)
                if isinstance(result, tuple):  # moto's own response, passed on
                    return wire.reply(start_response, *result)
                return wire.json_reply(start_response, result)
            if ctx.service == "ec2":
                return self._ec2.handle(self._app, environ, ctx, start_response)
        except ApiError as err:
            return wire.json_reply(start_response, {"__type": err.code, "message": err.message}, err.status)
        return self._app(environ, start_response)
