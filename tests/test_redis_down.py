"""The front door when Redis does not answer: down (connection refused) or hanging (a
socket that accepts and never replies). Slack gives up on an ack after 3 s; `help`
needs no Redis; everything else gets a plain answer and nothing starts. Also Socket
Mode, which needs no signing secret."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from slack_bolt import App
from slack_bolt.request import BoltRequest
from werkzeug.test import Client

from bot import socket as socket_entry
from bot import web

from . import slack as s
from .conftest import TOKEN

IID = "i-0123456789abcdef0"
UNREACHABLE = "runctl cannot reach its queue; nothing was started."


@pytest.fixture
def down_url() -> str:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def hanging_url() -> Iterator[str]:
    with socket.socket() as sock:  # the kernel accepts connections into the backlog; nobody reads
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def post(app: Any, text: str) -> tuple[int, str, float]:
    """POST a signed /runctl through the WSGI app; (status, text, seconds), or (0, "", s) past 10 s."""
    body = s.command_body(text)
    out: list[tuple[int, str]] = []

    def call() -> None:
        resp = Client(app).post("/slack/events", data=body, headers=s.sign(body))
        data = resp.get_data(as_text=True)
        out.append((resp.status_code, json.loads(data)["text"] if data.startswith("{") else data))

    started = time.monotonic()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(10)
    took = time.monotonic() - started
    return (*out[0], took) if out else (0, "", took)


@pytest.mark.parametrize("kind", ["down", "hanging"])
def test_redis_not_answering_gets_a_clear_answer_within_3_s_and_help_still_works(
    kind: str, down_url: str, hanging_url: str, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", s.SECRET)
    monkeypatch.setenv("SLACK_API_URL", str(settings.SLACK_API_URL))
    monkeypatch.setenv("REDIS_URL", down_url if kind == "down" else hanging_url)
    app = web.create()  # the gunicorn entry point

    for text in (f"train {IID} train.py -- --epochs 1", f"status {IID}", "resources"):
        status, said, took = post(app, text)
        assert took < 3, (text, status, said, took)
        assert status == 200 and said.startswith(f":warning: {UNREACHABLE}"), said
        assert "REDIS_URL" in said and "redis://" not in said  # the admin's fix, no URL (it may hold a password)
    status, said, took = post(app, "help")
    assert status == 200 and "/runctl train <instance-id>" in said and took < 3


def test_socket_mode_starts_with_only_the_bot_and_app_tokens(
    monkeypatch: pytest.MonkeyPatch, settings: Any, down_url: str
) -> None:
    started: list[App] = []

    class Handler:
        def __init__(self, app: App, app_token: str) -> None:
            assert app_token == "xapp-1-test"
            started.append(app)

        def start(self) -> None:
            pass

    monkeypatch.delenv("SLACK_SIGNING_SECRET", raising=False)
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("SLACK_APP_TOKEN", "xapp-1-test")
    monkeypatch.setenv("SLACK_API_URL", str(settings.SLACK_API_URL))
    monkeypatch.setenv("REDIS_URL", down_url)
    monkeypatch.setattr(socket_entry, "SocketModeHandler", Handler)

    assert socket_entry.main() == 0

    [app] = started
    # A Socket Mode delivery: unsigned, over the websocket.
    resp = app.dispatch(BoltRequest(body=s.command_body("help"), mode="socket_mode"))
    assert resp.status == 200 and "/runctl train <instance-id>" in json.loads(resp.body)["text"]
