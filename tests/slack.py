"""Signed Slack requests, as Slack sends them."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from slack_bolt.request import BoltRequest
from slack_sdk.signature import SignatureVerifier

if TYPE_CHECKING:
    from slack_bolt import App, BoltResponse

    from runctl_sandbox.inline import InlineWorker

SECRET = "test-signing-secret"


def trigger_id() -> str:
    """In Slack's format ("132456.7890123.abcdef"), unique per request."""
    return f"{time.monotonic_ns()}.{int(time.time())}.{secrets.token_hex(8)}"


def signature(body: str, timestamp: str, secret: str = SECRET) -> str:
    sig = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    assert sig is not None  # None only without a timestamp
    return sig


def sign(body: str, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "content-type": "application/x-www-form-urlencoded",
        "x-slack-request-timestamp": ts,
        "x-slack-signature": signature(body, ts, secret),
    }


def request(body: str, headers: Mapping[str, str]) -> BoltRequest:
    """Bolt's request of this body with these headers."""
    bolt_headers: dict[str, str | Sequence[str]] = dict(headers)
    return BoltRequest(body=body, headers=bolt_headers)


def command_body(text: str, user: str = "U0ALICE", channel: str = "C0TRAIN", **extra: str) -> str:
    fields = {
        "token": "legacy",
        "team_id": "T0TEAM",
        "team_domain": "example",
        "channel_id": channel,
        "channel_name": "training",
        "user_id": user,
        "user_name": user.lower(),
        "command": "/runctl",
        "text": text,
        "api_app_id": "A0RUNCTL",
        "response_url": extra.pop("response_url", "https://hooks.slack.invalid/commands/1"),
        "trigger_id": extra.pop("trigger_id", trigger_id()),
        **extra,
    }
    return urlencode(fields)


def command(
    text: str, user: str = "U0ALICE", channel: str = "C0TRAIN", secret: str = SECRET, **extra: str
) -> BoltRequest:
    body = command_body(text, user, channel, **extra)
    return request(body, sign(body, secret))


def action_body(payload: dict[str, Any]) -> str:
    return urlencode({"payload": json.dumps(payload)})


def action(payload: dict[str, Any], secret: str = SECRET) -> BoltRequest:
    body = action_body(payload)
    return request(body, sign(body, secret))


def click(
    message: dict[str, Any], action_id: str, user: str, channel: str = "C0TRAIN", value: str | None = None
) -> dict[str, Any]:
    """A block_actions payload for clicking the button `action_id` in a posted message
    (the one whose value is `value`, where one message has several)."""
    for block in message.get("blocks", []):
        for element in block.get("elements", []) if block.get("type") == "actions" else []:
            if element.get("action_id") == action_id and value in (None, element.get("value")):
                return {
                    "type": "block_actions",
                    "team": {"id": "T0TEAM", "domain": "example"},
                    "user": {"id": user, "username": user.lower(), "team_id": "T0TEAM"},
                    "api_app_id": "A0RUNCTL",
                    "token": "legacy",
                    "container": {"type": "message", "message_ts": message["ts"], "channel_id": channel},
                    "trigger_id": trigger_id(),
                    "channel": {"id": channel, "name": "training"},
                    "message": message,
                    "response_url": "https://hooks.slack.invalid/actions/1",
                    "actions": [
                        {
                            "type": "button",
                            "action_id": action_id,
                            "block_id": block.get("block_id", ""),
                            "text": element.get("text"),
                            "value": element.get("value", ""),
                            "action_ts": f"{time.time():.6f}",
                        }
                    ],
                }
    raise AssertionError(f"no button {action_id} in message {message.get('ts')}")


def dispatched(app: App, worker: InlineWorker, request: BoltRequest, timeout: float = 120) -> BoltResponse:
    """`request` through the Bolt app, then every job it queued, run (Bolt queues after the ack:
    a command that queues nothing is waited for 5 s)."""
    response = app.dispatch(request)
    deadline = time.monotonic() + 5
    while not worker.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.drain(timeout)
    return response
