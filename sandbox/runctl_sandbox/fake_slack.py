"""A small local fake of the Slack Web API, for tests and the console.

Point ``slack_sdk.WebClient(base_url=fake.base_url)`` at it. It answers the
methods the bot uses, enforces Slack's message limits, records every call and
keeps the messages as Slack would show them (updates applied, deletes removed).

It refuses what Slack refuses (see /work/shared/real-services.md, "Slack Web API"):
- channel membership: the bot is in the channels it was given (``member_of``, ``join``).
  ``chat.postMessage`` still posts in a *public* channel it is not in (``chat:write.public``);
  a private channel (``G…``, or one marked private) or a DM between people (``D…``) answers
  ``channel_not_found``; ephemerals and file shares need membership (``not_in_channel``);
- rate limits: a token bucket per method (per channel for ``chat.postMessage``) answers
  HTTP 429 with ``Retry-After`` when empty (``chat.update`` Tier 3, about 50 a minute);
- bad days: ``fail(method)`` answers HTTP 500;
- a ``response_url`` takes at most 5 messages within 30 minutes.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import quote

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)
T = TypeVar("T")

HOST = "127.0.0.1"
TEAM_ID, BOT_USER_ID, BOT_ID = "T0FAKE", "U0BOT", "B0BOT"
MAX_BLOCKS = 50
MAX_TEXT = 40_000
MAX_SECTION_TEXT = 3_000
MAX_FIELD_TEXT = 2_000
MAX_FIELDS = 10
MAX_CONTEXT_ELEMENTS = 10
MAX_HEADER_TEXT = 150
MAX_ACTIONS = 25
MAX_BUTTON_TEXT = 75
MAX_BUTTON_VALUE = 2_000
MAX_ID = 255
MAX_VIEW_BYTES = 250_000
MAX_FILE_BYTES = 1024**3  # Slack takes files up to 1 GB
# files.getUploadURLExternal: alt_txt_too_large, "longer than the limit of 1000 character"
MAX_ALT_TXT = 1000
# Slack's format for trigger_id ("132456.7890123.abcdef"); each is exchanged once.
TRIGGER_ID = re.compile(r"^\d+\.\d+\.[0-9a-f]+$")
RESPONSE_URL_USES = 5
RESPONSE_URL_SECONDS = 30 * 60
CHANNEL_ERRORS = frozenset({"not_in_channel", "channel_not_found", "is_archived"})


@dataclass(frozen=True)
class Budget:
    """A token bucket: ``burst`` calls at once, refilled at ``per_minute``."""

    per_minute: float
    burst: int
    per_channel: bool = False


# Slack's published limits (api.slack.com/docs/rate-limits): chat.update is Tier 3 (50+/min),
# chat.postMessage about 1 a second per channel with short bursts, users.info Tier 4 (100+/min),
# usergroups.users.list Tier 2 (20+/min). The burst sizes are not published; these are modest.
DEFAULT_BUDGETS: dict[str, Budget] = {
    "chat.update": Budget(50, 50),
    "chat.postMessage": Budget(60, 10, per_channel=True),
    "users.info": Budget(100, 100),
    "usergroups.users.list": Budget(20, 20),
    "files.getUploadURLExternal": Budget(100, 100),  # Tier 4
    "files.completeUploadExternal": Budget(100, 100),  # Tier 4
}


@dataclass(frozen=True)
class User:
    id: str
    name: str
    display_name: str = ""
    real_name: str = ""
    deleted: bool = False


@dataclass(frozen=True)
class Call:
    method: str
    params: dict[str, Any]
    at: float  # time.monotonic()
    error: str | None = None  # the error Slack answered with, None when ok
    response_url: str | None = None  # the name, for calls to a response_url


@dataclass(frozen=True)
class OpenedView:
    """A modal opened with views.open, as Slack holds it (with its id)."""

    id: str
    trigger_id: str
    view: dict[str, Any]


@dataclass(frozen=True)
class Message:
    channel: str  # for "response_url" events: the response_url's name
    ts: str
    text: str
    blocks: list[dict[str, Any]] = field(default_factory=list)
    thread_ts: str | None = None
    user: str | None = None  # who sees an ephemeral message

    @property
    def ephemeral(self) -> bool:
        return self.user is not None


@dataclass(frozen=True)
class UploadedFile:
    id: str
    filename: str
    title: str
    content: bytes
    channel: str | None
    initial_comment: str | None
    thread_ts: str | None
    alt_txt: str | None = None  # an image's description for screen readers


EventCallback = Callable[[str, Message | UploadedFile], None]


class SlackError(Exception):
    def __init__(self, error: str, details: list[str] | None = None) -> None:
        super().__init__(error)
        self.error, self.details = error, details or []


# --- Slack's limits ---------------------------------------------------------------


def _text_of(obj: Any) -> str | None:
    return obj.get("text") if isinstance(obj, dict) and isinstance(obj.get("text"), str) else None


def _check_text(obj: Any, limit: int, where: str, problems: list[str]) -> None:
    text = _text_of(obj)
    if text is None:
        problems.append(f"{where}: a text object is required")
    elif not 1 <= len(text) <= limit:
        problems.append(f"{where}: text must be 1 to {limit} characters, not {len(text)}")


def _check_element(element: Any, where: str, problems: list[str]) -> None:
    if not isinstance(element, dict):
        problems.append(f"{where}: an element must be an object")
        return
    if len(str(element.get("action_id", ""))) > MAX_ID:
        problems.append(f"{where}: action_id longer than {MAX_ID}")
    if element.get("type") == "button":
        _check_text(element.get("text"), MAX_BUTTON_TEXT, f"{where}/text", problems)
        if len(str(element.get("value", ""))) > MAX_BUTTON_VALUE:
            problems.append(f"{where}/value: longer than {MAX_BUTTON_VALUE}")


def block_problems(blocks: Any) -> list[str]:
    """What Slack would reject in ``blocks``, as readable lines (empty when valid)."""
    if not isinstance(blocks, list):
        return ["blocks must be a list"]
    problems: list[str] = []
    if len(blocks) > MAX_BLOCKS:
        problems.append(f"no more than {MAX_BLOCKS} blocks allowed, got {len(blocks)}")
    for i, block in enumerate(blocks):
        where = f"/blocks/{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            problems.append(f"{where}: a block must be an object with a type")
            continue
        if len(str(block.get("block_id", ""))) > MAX_ID:
            problems.append(f"{where}/block_id: longer than {MAX_ID}")
        kind = block["type"]
        if kind == "section":
            fields = block.get("fields")
            if "text" in block or not fields:
                _check_text(block.get("text"), MAX_SECTION_TEXT, f"{where}/text", problems)
            if fields is not None:
                if not isinstance(fields, list) or len(fields) > MAX_FIELDS:
                    problems.append(f"{where}/fields: at most {MAX_FIELDS} fields")
                else:
                    for j, item in enumerate(fields):
                        _check_text(item, MAX_FIELD_TEXT, f"{where}/fields/{j}", problems)
            if "accessory" in block:
                _check_element(block["accessory"], f"{where}/accessory", problems)
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= MAX_CONTEXT_ELEMENTS:
                problems.append(f"{where}/elements: 1 to {MAX_CONTEXT_ELEMENTS} elements")
                continue
            for j, element in enumerate(elements):
                if isinstance(element, dict) and element.get("type") in ("mrkdwn", "plain_text"):
                    _check_text(element, MAX_SECTION_TEXT, f"{where}/elements/{j}", problems)
        elif kind == "header":
            _check_text(block.get("text"), MAX_HEADER_TEXT, f"{where}/text", problems)
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= MAX_ACTIONS:
                problems.append(f"{where}/elements: 1 to {MAX_ACTIONS} elements")
                continue
            for j, element in enumerate(elements):
                _check_element(element, f"{where}/elements/{j}", problems)
    return problems


def _parse_blocks(raw: Any) -> list[dict[str, Any]] | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise SlackError("invalid_blocks_format") from exc
    problems = block_problems(raw)
    if problems:
        raise SlackError("invalid_blocks", problems)
    blocks: list[dict[str, Any]] = raw
    return blocks


def _content(params: dict[str, Any], required: bool) -> tuple[str | None, list[dict[str, Any]] | None]:
    """The message's text and blocks, checked against Slack's limits."""
    text = params.get("text")
    if text is not None and not isinstance(text, str):
        text = str(text)
    blocks = _parse_blocks(params.get("blocks"))
    if text is not None and len(text) > MAX_TEXT:
        raise SlackError("msg_too_long")
    if required and not text and not blocks and not params.get("attachments"):
        raise SlackError("no_text")
    return text, blocks


def _require(params: dict[str, Any], name: str, error: str = "invalid_arguments") -> str:
    value = params.get(name)
    if not value:
        raise SlackError(error)
    return str(value)


def _member(person: User) -> dict[str, Any]:
    """A user object as users.info and users.list return it."""
    return {
        "id": person.id,
        "team_id": TEAM_ID,
        "name": person.name,
        "real_name": person.real_name,
        "tz": "UTC",
        "is_bot": False,
        "deleted": person.deleted,
        "profile": {"display_name": person.display_name, "real_name": person.real_name},
    }


# --- the fake ---------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class FakeSlack:
    def __init__(self, member_of: Iterable[str] = (), budgets: dict[str, Budget] | None = None) -> None:
        self._lock = threading.Lock()
        self._default_members = frozenset(member_of)
        self._default_budgets = dict(DEFAULT_BUDGETS if budgets is None else budgets)
        self._callbacks: list[EventCallback] = []
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        # Never reset: a ts or file id from before a reset must not come back.
        self._ts = itertools.count(1_700_000_000_000_100, 100)  # microseconds
        self._ids = itertools.count(1)
        self._urls = Map(
            [
                Rule("/api/<method>", endpoint="api", methods=["GET", "POST"]),
                Rule("/upload/<file_id>", endpoint="upload", methods=["POST"]),
                Rule("/response_url/<name>", endpoint="response_url", methods=["POST"]),
            ]
        )
        self._methods: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "auth.test": self._auth_test,
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.postEphemeral": self._post_ephemeral,
            "chat.delete": self._delete,
            "chat.getPermalink": self._permalink,
            "users.info": self._users_info,
            "users.list": self._users_list,
            "conversations.info": self._conversations_info,
            "files.getUploadURLExternal": self._get_upload_url,
            "files.completeUploadExternal": self._complete_upload,
            "views.open": self._views_open,
            "usergroups.users.list": self._usergroup_users,
        }
        self.reset()

    # --- lifecycle ---
    def start(self) -> None:
        self._server = make_server(HOST, 0, self._app, threaded=True, request_handler=_QuietHandler)
        if isinstance(self._server, socketserver.ThreadingMixIn):  # a stop does not wait for request threads (daemons)
            self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-slack", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def root_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeSlack is not started")
        return f"http://{HOST}:{self._server.server_port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/api/"

    def response_url(self, name: str) -> str:
        """A URL to hand out as a slash command's ``response_url``; its 30 minutes start now."""
        with self._lock:
            self._hooks.setdefault(name, (time.monotonic(), 0))
        return f"{self.root_url}/response_url/{quote(name, safe='')}"

    # --- configuration ---
    def reset(self) -> None:
        """Forget every call, message, file and pending rate limit (callbacks stay)."""
        with self._lock:
            self._calls: list[Call] = []
            self._messages: dict[tuple[str, str], Message] = {}
            self._ephemerals: list[Message] = []
            self._files: list[UploadedFile] = []
            self._uploads: dict[str, dict[str, Any]] = {}
            self._rate_limits: dict[str, tuple[int, int]] = {}
            self._views: list[OpenedView] = []
            self._exchanged: set[str] = set()
            self._usergroups: dict[str, tuple[str, ...]] = {}
            self._failures: dict[str, tuple[int, int]] = {}
            self._members: set[str] = set(self._default_members)
            self._private: set[str] = set()
            self._users: dict[str, User] = {}
            self._budgets: dict[str, Budget] = dict(self._default_budgets)
            self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
            self._hooks: dict[str, tuple[float, int]] = {}  # response_url name -> (handed out, uses)
            self._responses: list[Message] = []

    def add_usergroup(self, group_id: str, members: Iterable[str]) -> None:
        """A user group (`S…`) that usergroups.users.list answers with `members`."""
        with self._lock:
            self._usergroups[group_id] = tuple(members)

    def views(self) -> list[OpenedView]:
        """The modals opened with views.open, oldest first."""
        with self._lock:
            return list(self._views)

    # --- the workspace ---
    def join(self, *channels: str) -> None:
        """The bot is now a member of these channels (``/invite @runctl``)."""
        with self._lock:
            self._members.update(channels)

    def leave(self, *channels: str) -> None:
        with self._lock:
            self._members.difference_update(channels)

    def make_private(self, *channels: str) -> None:
        """Mark ``C…`` channels private (``G…`` and ``D…`` ids already are)."""
        with self._lock:
            self._private.update(channels)

    def add_user(
        self, user_id: str, name: str, display_name: str = "", real_name: str = "", deleted: bool = False
    ) -> None:
        """A member that users.info describes and users.list lists (users.info answers any
        other id too, named after itself; users.list lists only these)."""
        with self._lock:
            self._users[user_id] = User(user_id, name, display_name, real_name or name, deleted)

    def budget(self, method: str, budget: Budget | None) -> None:
        """Set (or with None remove) the rate limit of ``method`` until the next reset."""
        with self._lock:
            if budget is None:
                self._budgets.pop(method, None)
            else:
                self._budgets[method] = budget
            self._buckets = {k: v for k, v in self._buckets.items() if k.split(" ")[0] != method}

    def fail(self, method: str, times: int = 1, status: int = 500) -> None:
        """The next ``times`` calls of ``method`` get HTTP ``status`` (Slack's bad days)."""
        with self._lock:
            self._failures[method] = (times, status)

    def is_member(self, channel: str) -> bool:
        with self._lock:
            return channel in self._members

    def _visible(self, channel: str) -> str | None:
        """None when the bot may post in ``channel``; else the error Slack answers."""
        with self._lock:
            member = channel in self._members
            private = channel in self._private or channel[:1] in ("G", "D")
        if member or channel[:1] in ("U", "W"):  # a user id: the bot's own DM with them
            return None
        return "channel_not_found" if private else None  # chat:write.public covers public ones

    def _need_member(self, channel: str) -> None:
        with self._lock:
            member = channel in self._members
            private = channel in self._private or channel[:1] in ("G", "D")
        if member or channel[:1] in ("U", "W"):
            return
        raise SlackError("channel_not_found" if private else "not_in_channel")

    def _take(self, method: str, params: dict[str, Any]) -> int:
        """0 when the call fits the method's budget, else the Retry-After seconds."""
        now = time.monotonic()
        with self._lock:
            budget = self._budgets.get(method)
            if budget is None:
                return 0
            key = f"{method} {params.get('channel', '')}" if budget.per_channel else method
            rate = budget.per_minute / 60.0
            tokens, at = self._buckets.get(key, (float(budget.burst), now))
            tokens = min(float(budget.burst), tokens + (now - at) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return max(1, math.ceil((1.0 - tokens) / rate))
            self._buckets[key] = (tokens - 1.0, now)
            return 0

    def rate_limit(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """The next ``times`` calls of ``method`` get HTTP 429 ``ratelimited``."""
        with self._lock:
            self._rate_limits[method] = (times, retry_after)

    def on_event(self, callback: EventCallback) -> None:
        """Call ``callback(kind, item)`` on every post, update, ephemeral, delete,
        file and response_url message. Kinds: "post", "update", "ephemeral",
        "delete", "file", "response_url"."""
        with self._lock:
            self._callbacks.append(callback)

    # --- reading ---
    @property
    def calls(self) -> list[Call]:
        """Every request, oldest first, rejected ones included (see ``Call.error``)."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if c.method == method]

    def messages(self, channel: str) -> list[Message]:
        """The channel's messages, thread replies included, oldest first."""
        with self._lock:
            return [m for m in self._messages.values() if m.channel == channel]

    def thread(self, channel: str, ts: str) -> list[Message]:
        """The replies in the thread under message ``ts``, oldest first."""
        return [m for m in self.messages(channel) if m.thread_ts == ts]

    def ephemerals(self, user: str | None = None) -> list[Message]:
        with self._lock:
            return [m for m in self._ephemerals if user is None or m.user == user]

    def responses(self, name: str | None = None) -> list[Message]:
        """Messages sent to response_urls (``channel`` is the url's name), oldest first."""
        with self._lock:
            return [m for m in self._responses if name is None or m.channel == name]

    @property
    def files(self) -> list[UploadedFile]:
        with self._lock:
            return list(self._files)

    def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Poll ``predicate`` until it returns something truthy, and return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(0.02)

    # --- HTTP ---
    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            endpoint, args = self._urls.bind_to_environ(environ).match()
        except HTTPException as exc:
            return exc(environ, start_response)
        if endpoint == "api":
            response = self._api(request, str(args["method"]))
        elif endpoint == "upload":
            response = self._upload(request, str(args["file_id"]))
        else:
            response = self._response_url(request, str(args["name"]))
        return response(environ, start_response)

    def _api(self, request: Request, method: str) -> Response:
        params = _params(request)
        token = params.pop("token", None)
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth.removeprefix("Bearer ")
        with self._lock:
            times, retry_after = self._rate_limits.get(method, (0, 0))
            if times > 0:
                self._rate_limits[method] = (times - 1, retry_after)
            fails, status = self._failures.get(method, (0, 0))
            if fails > 0:
                self._failures[method] = (fails - 1, status)
        if times > 0:
            self._record(Call(method, params, time.monotonic(), "ratelimited"))
            return _json({"ok": False, "error": "ratelimited"}, 429, {"Retry-After": str(retry_after)})
        if fails > 0:
            self._record(Call(method, params, time.monotonic(), f"http_{status}"))
            return Response("Internal Server Error", status=status, mimetype="text/plain")
        wait = self._take(method, params)
        if wait:
            self._record(Call(method, params, time.monotonic(), "ratelimited"))
            return _json({"ok": False, "error": "ratelimited"}, 429, {"Retry-After": str(wait)})
        handler = self._methods.get(method)
        try:
            if not token:
                raise SlackError("not_authed")
            if not str(token).startswith("xoxb-"):
                raise SlackError("invalid_auth")
            if handler is None:
                raise SlackError("unknown_method")
            body = {"ok": True, **handler(params)}
        except SlackError as err:
            self._record(Call(method, params, time.monotonic(), err.error))
            reply: dict[str, Any] = {"ok": False, "error": err.error}
            if err.details:
                reply["errors"] = err.details
            return _json(reply)
        self._record(Call(method, params, time.monotonic()))
        return _json(body)

    def _record(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    def _emit(self, kind: str, item: Message | UploadedFile) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(kind, item)
            except Exception:  # a broken printer must not turn into a Slack error
                log.exception("fake Slack event callback failed")

    def _next_ts(self) -> str:
        with self._lock:
            micros = next(self._ts)
        return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}{next(self._ids):08d}"

    def _find(self, channel: str, ts: str) -> Message:
        with self._lock:
            message = self._messages.get((channel, ts))
        if message is None:
            raise SlackError("message_not_found")
        return message

    # --- methods ---
    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "https://fake.slack.com/",
            "team": "Fake Team",
            "user": "runctl",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
        }

    def _post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _require(params, "channel", "channel_not_found")
        refused = self._visible(channel)
        if refused:
            raise SlackError(refused)
        text, blocks = _content(params, required=True)
        thread_ts = params.get("thread_ts") or None
        message = Message(channel, self._next_ts(), text or "", blocks or [], thread_ts)
        with self._lock:
            self._messages[(channel, message.ts)] = message
        self._emit("post", message)
        return {"channel": channel, "ts": message.ts, "message": _as_slack(message)}

    def _update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _require(params, "channel", "channel_not_found")
        ts = _require(params, "ts", "message_not_found")
        refused = self._visible(channel)
        if refused:
            raise SlackError(refused)
        text, blocks = _content(params, required=False)
        with self._lock:
            old = self._messages.get((channel, ts))
            if old is None:
                raise SlackError("message_not_found")
            # Omitted fields keep their old value, as in Slack.
            message = replace(
                old,
                text=old.text if text is None else text,
                blocks=old.blocks if blocks is None else blocks,
            )
            self._messages[(channel, ts)] = message
        self._emit("update", message)
        return {"channel": channel, "ts": ts, "text": message.text, "message": _as_slack(message)}

    def _post_ephemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _require(params, "channel", "channel_not_found")
        user = _require(params, "user", "user_not_found")
        self._need_member(channel)
        text, blocks = _content(params, required=True)
        thread_ts = params.get("thread_ts") or None
        message = Message(channel, self._next_ts(), text or "", blocks or [], thread_ts, user)
        with self._lock:
            self._ephemerals.append(message)
        self._emit("ephemeral", message)
        return {"message_ts": message.ts}

    def _delete(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _require(params, "channel", "channel_not_found")
        ts = _require(params, "ts", "message_not_found")
        message = self._find(channel, ts)
        with self._lock:
            self._messages.pop((channel, ts), None)
        self._emit("delete", message)
        return {"channel": channel, "ts": ts}

    def _permalink(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _require(params, "channel", "channel_not_found")
        ts = _require(params, "message_ts", "message_not_found")
        self._find(channel, ts)
        link = f"https://fake.slack.com/archives/{channel}/p{ts.replace('.', '')}"
        return {"channel": channel, "permalink": link}

    def _users_info(self, params: dict[str, Any]) -> dict[str, Any]:
        user = _require(params, "user", "user_not_found")
        with self._lock:
            known = self._users.get(user)
        return {"user": _member(known or User(user, user.lower(), user.lower(), user.lower()))}

    def _users_list(self, params: dict[str, Any]) -> dict[str, Any]:
        """Paginated as Slack's: `limit` a page (none: all), an opaque `next_cursor`, "" on the
        last page; a cursor it did not hand out is `invalid_cursor`."""
        cursor = str(params.get("cursor") or "")
        if cursor and not cursor.startswith("dXNlcjo"):
            raise SlackError("invalid_cursor")
        start = int(cursor.removeprefix("dXNlcjo") or 0)
        limit = int(params.get("limit") or 0)
        with self._lock:
            people = list(self._users.values())
        end = start + limit if limit else len(people)
        more = f"dXNlcjo{end}" if end < len(people) else ""
        return {"members": [_member(p) for p in people[start:end]], "response_metadata": {"next_cursor": more}}

    def _conversations_info(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _require(params, "channel", "channel_not_found")
        refused = self._visible(channel)
        if refused:
            raise SlackError(refused)
        with self._lock:
            private, member = channel in self._private or channel[:1] == "G", channel in self._members
        return {
            "channel": {
                "id": channel,
                "name": channel.lower().lstrip("#"),
                "is_channel": True,
                "is_private": private,
                "is_archived": False,
                "is_member": member,
            }
        }

    def _views_open(self, params: dict[str, Any]) -> dict[str, Any]:
        raw = params.get("view")  # JSON text in a form body, an object in a JSON body
        if not raw:
            raise SlackError("invalid_arguments")
        trigger = str(params.get("trigger_id") or "")
        if not TRIGGER_ID.match(trigger):
            raise SlackError("invalid_trigger_id")
        text = raw if isinstance(raw, str) else json.dumps(raw)
        if len(text.encode()) > MAX_VIEW_BYTES:
            raise SlackError("view_too_large")
        try:
            view = json.loads(text)
        except ValueError:
            raise SlackError("invalid_arguments") from None
        if not isinstance(view, dict):
            raise SlackError("invalid_arguments")
        if view.get("type") != "modal" or not view.get("title") or not isinstance(view.get("blocks"), list):
            raise SlackError("invalid_arguments", ["[ERROR] a modal needs a type, a title and blocks"])
        with self._lock:
            if trigger in self._exchanged:
                raise SlackError("exchanged_trigger_id")
            self._exchanged.add(trigger)
        opened = OpenedView(self._next_id("V"), trigger, view)
        with self._lock:
            self._views.append(opened)
        return {"view": {**view, "id": opened.id, "team_id": TEAM_ID, "state": {"values": {}}}}

    def _usergroup_users(self, params: dict[str, Any]) -> dict[str, Any]:
        group = _require(params, "usergroup", "no_such_subteam")
        with self._lock:
            members = self._usergroups.get(group)
        if members is None:
            raise SlackError("no_such_subteam")
        return {"users": list(members)}

    def _get_upload_url(self, params: dict[str, Any]) -> dict[str, Any]:
        filename = _require(params, "filename")
        length = str(_require(params, "length"))
        if not length.isdigit():
            raise SlackError("invalid_arguments", ["[ERROR] length must be an integer (bytes)"])
        if int(length) == 0:  # Slack's docs: missing_argument "typically only occurs when the length is 0"
            raise SlackError("missing_argument")
        if int(length) > MAX_FILE_BYTES:
            raise SlackError("file_upload_size_restricted")
        alt = params.get("alt_txt") or None
        if alt is not None and len(str(alt)) > MAX_ALT_TXT:
            raise SlackError("alt_txt_too_large")
        file_id = self._next_id("F")
        with self._lock:
            self._uploads[file_id] = {"filename": filename, "content": None, "alt_txt": alt}
        return {"upload_url": f"{self.root_url}/upload/{file_id}", "file_id": file_id}

    def _upload(self, request: Request, file_id: str) -> Response:
        content = request.get_data(cache=False, parse_form_data=False)
        with self._lock:
            upload = self._uploads.get(file_id)
            if upload is not None:
                upload["content"] = content
        if upload is None:
            return Response("unknown upload", status=404)
        return Response(f"OK - {len(content)}", mimetype="text/plain")

    def _complete_upload(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            entries = json.loads(_require(params, "files"))
        except ValueError as exc:
            raise SlackError("invalid_arguments") from exc
        channel = params.get("channel_id") or params.get("channels") or None
        if params.get("thread_ts") and (not channel or "," in str(channel)):
            # "make sure to provide only one channel when using thread_ts"
            raise SlackError("invalid_arguments", ["[ERROR] thread_ts needs exactly one channel"])
        if channel:  # sharing a file needs real membership, chat:write.public aside
            for one in str(channel).split(","):
                self._need_member(one)
        done: list[UploadedFile] = []
        with self._lock:
            for entry in entries:
                upload = self._uploads.get(str(entry.get("id")))
                if upload is None or upload["content"] is None:
                    raise SlackError("file_not_found")
                done.append(
                    UploadedFile(
                        id=str(entry["id"]),
                        filename=upload["filename"],
                        title=str(entry.get("title") or upload["filename"]),
                        content=upload["content"],
                        channel=channel,
                        initial_comment=params.get("initial_comment") or None,
                        thread_ts=params.get("thread_ts") or None,
                        alt_txt=upload["alt_txt"],
                    )
                )
            for item in done:
                del self._uploads[item.id]
            self._files.extend(done)
        for item in done:
            self._emit("file", item)
        return {"files": [{"id": f.id, "name": f.filename, "title": f.title, "size": len(f.content)} for f in done]}

    def _response_url(self, request: Request, name: str) -> Response:
        now = time.monotonic()
        with self._lock:
            first, uses = self._hooks.get(name, (now, 0))
            expired = uses >= RESPONSE_URL_USES or now - first > RESPONSE_URL_SECONDS
            if not expired:
                self._hooks[name] = (first, uses + 1)
        if expired:
            self._record(Call("response_url", {}, now, "expired_url", name))
            return Response("expired_url", status=404, mimetype="text/plain")
        try:
            body = json.loads(request.get_data(cache=False) or b"{}")
            if not isinstance(body, dict):
                raise SlackError("invalid_payload")
            text, blocks = _content(body, required=not body.get("delete_original"))
        except (ValueError, SlackError) as exc:
            error = exc.error if isinstance(exc, SlackError) else "invalid_payload"
            self._record(Call("response_url", {}, time.monotonic(), error, name))
            return Response(error, status=400, mimetype="text/plain")
        self._record(Call("response_url", body, time.monotonic(), None, name))
        message = Message(name, self._next_ts(), text or "", blocks or [])
        with self._lock:
            self._responses.append(message)
        self._emit("response_url", message)
        return Response("ok", mimetype="text/plain")


def _params(request: Request) -> dict[str, Any]:
    params: dict[str, Any] = request.args.to_dict()
    if request.mimetype == "application/json":
        body = request.get_json(silent=True)
        if isinstance(body, dict):
            params.update(body)
    else:
        params.update(request.form.to_dict())
    return params


def _as_slack(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "message",
        "text": message.text,
        "user": BOT_USER_ID,
        "bot_id": BOT_ID,
        "ts": message.ts,
        "team": TEAM_ID,
    }
    if message.blocks:
        out["blocks"] = message.blocks
    if message.thread_ts:
        out["thread_ts"] = message.thread_ts
    return out


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers, mimetype="application/json")
