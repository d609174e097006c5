"""The wire protocols the sandbox's fakes answer in: AWS's JSON errors, the caller's region
and account from the SigV4 credential scope, WSGI plumbing in front of moto, and pagination."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from moto.core.models import DEFAULT_ACCOUNT_ID
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_input_stream

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

PAGE_MAX = 50

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/[^/]*/([^/]*)/([^/]*)/")


class ApiError(Exception):
    def __init__(self, code: str, message: str = "", status: int = 400) -> None:
        super().__init__(message or code)
        self.code, self.message, self.status = code, message, status


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class RequestContext:
    """Who asked, where: parsed from the SigV4 credential scope, like moto does."""

    region: str
    service: str
    access_key: str
    account_header: str

    @property
    def account_id(self) -> str:
        if os.environ.get("MOTO_ACCOUNT_ID"):
            return os.environ["MOTO_ACCOUNT_ID"]
        if self.account_header:
            return self.account_header
        if self.access_key:
            from moto.iam.models import get_account_id_from

            return str(get_account_id_from(self.access_key))
        return str(DEFAULT_ACCOUNT_ID)


def context(environ: WSGIEnvironment, default_region: str) -> RequestContext:
    match = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
    return RequestContext(
        region=match.group(2) if match else default_region,
        service=match.group(3) if match else "",
        access_key=match.group(1) if match else "",
        account_header=environ.get("HTTP_X_MOTO_ACCOUNT_ID", ""),
    )


def read_body(environ: WSGIEnvironment) -> bytes:
    body: bytes = get_input_stream(environ).read()
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return body


def call_app(app: WSGIApplication, environ: WSGIEnvironment) -> tuple[str, list[tuple[str, str]], bytes]:
    captured: list[Any] = []
    chunks: list[bytes] = []

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured[:] = [status, headers]
        return chunks.append

    result = app(environ, start)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return captured[0], captured[1], b"".join(chunks)


def reply(start_response: StartResponse, status: str, headers: list[tuple[str, str]], body: bytes) -> Iterable[bytes]:
    start_response(status, headers)
    return [body]


def json_reply(start_response: StartResponse, payload: Any, code: int = 200) -> Iterable[bytes]:
    body = json.dumps(payload).encode()
    headers = [
        ("Content-Type", "application/x-amz-json-1.1"),
        ("Content-Length", str(len(body))),
        ("x-amzn-RequestId", str(uuid.uuid4())),
    ]
    return reply(start_response, f"{code} {HTTP_STATUS_CODES[code]}", headers, body)


def page(items: list[Any], payload: dict[str, Any], low: int) -> tuple[list[Any], str | None]:
    size = payload.get("MaxResults", PAGE_MAX)
    if not isinstance(size, int) or not low <= size <= PAGE_MAX:
        raise ApiError("ValidationException", f"MaxResults must be between {low} and {PAGE_MAX}")
    start = 0
    if payload.get("NextToken"):
        try:
            start = int(base64.urlsafe_b64decode(str(payload["NextToken"])).decode())
        except (ValueError, binascii.Error) as exc:
            raise ApiError("InvalidNextToken", "The specified token is not valid") from exc
    end = start + size
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else None
    return items[start:end], token
