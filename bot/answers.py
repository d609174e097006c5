"""Plain-text WSGI answers, and the Content-Length check both endpoints make before reading."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

StartResponse = Callable[..., Any]


def plain(start_response: StartResponse, status: str, body: bytes) -> list[bytes]:
    # A length, so keep-alive clients (load balancers' health checks) need not parse chunked bodies.
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def declared_length(environ: dict[str, Any], limit: int, start_response: StartResponse) -> int | list[bytes]:
    """The request's declared Content-Length (-1 when it has none), or the answer refusing it:
    400 when it is not a number, 413 above `limit`."""
    try:
        declared = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        return plain(start_response, "400 Bad Request", b"bad Content-Length\n")
    if declared > limit:
        return plain(start_response, "413 Content Too Large", b"request body too large\n")
    return declared
