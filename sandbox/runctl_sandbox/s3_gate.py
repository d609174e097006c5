"""S3's checks of presigned requests, which moto lets through."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment


class S3Gate:
    """What S3 does to presigned requests that moto lets through: buckets created since June
    2020 refuse SigV2 (400 InvalidRequest); a URL past its X-Amz-Date + X-Amz-Expires is
    refused (403 AccessDenied, "Request has expired"); a PUT needs a Content-Length (411
    MissingContentLength: no chunked uploads) and holds at most 5 GB (400 EntityTooLarge);
    and a new bucket outside us-east-1 answers 307 Temporary Redirect until DNS settles
    (``redirect_next``, GETs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._redirects = 0
        self._expired = False
        self.seen: list[str] = []  # the query strings of presigned GETs and PUTs, oldest first
        self.puts: list[str] = []  # those of presigned PUTs

    def redirect_next(self, count: int = 1) -> None:
        with self._lock:
            self._redirects += count

    def expire_next(self) -> None:
        """The next presigned request arrives after its URL expired."""
        with self._lock:
            self._expired = True

    def check(self, environ: WSGIEnvironment) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """An answer instead of moto's, or None to pass the request on."""
        query = environ.get("QUERY_STRING", "")
        params = parse_qs(query)
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD", "PUT") or environ.get("HTTP_AUTHORIZATION"):
            return None
        if not ({"X-Amz-Signature", "Signature", "AWSAccessKeyId"} & params.keys()):
            return None
        with self._lock:
            self.seen.append(query)
            if method == "PUT":
                self.puts.append(query)
        if params.get("X-Amz-Algorithm") != ["AWS4-HMAC-SHA256"]:
            return (
                400,
                [],
                _s3_error(
                    "InvalidRequest",
                    "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256.",
                ),
            )
        with self._lock:
            expired, self._expired = self._expired, False
        if expired or _past_expiry(params):
            return 403, [], _s3_error("AccessDenied", "Request has expired")
        if method == "PUT":
            length = str(environ.get("CONTENT_LENGTH") or "")
            if not length.isdigit():
                return 411, [], _s3_error("MissingContentLength", "You must provide the Content-Length HTTP header.")
            if int(length) > MAX_PUT_BYTES:
                return 400, [], _s3_error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
            return None
        with self._lock:
            redirect = self._redirects > 0
            self._redirects -= redirect
        if redirect:
            location = f"http://{environ.get('HTTP_HOST', '')}{environ.get('PATH_INFO', '')}?{query}"
            body = _s3_error(
                "TemporaryRedirect",
                "Please re-send this request to the specified temporary endpoint. "
                "Continue to use the original request endpoint for future requests.",
            )
            return 307, [("Location", location)], body
        return None


MAX_PUT_BYTES = 5 * 1024**3  # one PUT; larger objects go up in parts


def _past_expiry(params: dict[str, list[str]]) -> bool:
    """SigV4 query auth: valid from X-Amz-Date for X-Amz-Expires seconds."""
    try:
        signed = datetime.strptime(params["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        seconds = int(params["X-Amz-Expires"][0])
    except (KeyError, ValueError):
        return False
    return datetime.now(UTC) > signed + timedelta(seconds=seconds)


def _s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    ).encode()
