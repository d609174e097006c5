"""Slack's request signature, checked without trusting a single byte of the request.

slack_sdk's verifier raises on a malformed `X-Slack-Request-Timestamp` (`abc`, or two
headers joined as `ts, 1`); here anything that is not exactly one fresh timestamp and
one `v0=<64 hex>` signature over the body is simply not signed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

MAX_SKEW_SECONDS = 300  # Slack's rule: refuse requests older (or newer) than five minutes
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"v0=[0-9a-f]{64}")


def plausible(timestamp: str | None, signature: str | None, now: float | None = None) -> bool:
    """The headers have the shape of a fresh signature (no body needed to decide)."""
    if timestamp is None or signature is None:
        return False
    if not _TIMESTAMP.fullmatch(timestamp) or not _SIGNATURE.fullmatch(signature):
        return False
    now = time.time() if now is None else now
    return abs(now - int(timestamp)) <= MAX_SKEW_SECONDS


def signed(secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float | None = None) -> bool:
    """The request was signed by Slack with `secret` within the last five minutes."""
    if not plausible(timestamp, signature, now):
        return False
    assert timestamp is not None and signature is not None
    base = b"v0:" + timestamp.encode() + b":" + body
    expected = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)
