"""The Slack side of the workers: every post, update and upload goes through here."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.models.blocks import Block

from workers.settings import Settings

log = logging.getLogger(__name__)
MAX_TEXT = 3000  # per section text; Slack rejects more


def make_client(settings: Settings) -> WebClient:
    kwargs: dict[str, str] = {}
    if settings.SLACK_API_URL:
        kwargs["base_url"] = settings.SLACK_API_URL
    token = settings.SLACK_BOT_TOKEN.get_secret_value() if settings.SLACK_BOT_TOKEN else None
    client = WebClient(token=token, **kwargs)  # type: ignore[arg-type]
    client.retry_handlers = retry_handlers()
    return client


def retry_handlers(rate_limits: bool = True) -> list[RetryHandler]:
    """Slack's bad days: a dropped connection and a 500/503 are retried with backoff; a 429
    waits its Retry-After (except where the caller reschedules instead of sleeping)."""
    handlers: list[RetryHandler] = [
        ConnectionErrorRetryHandler(max_retry_count=2),
        ServerErrorRetryHandler(max_retry_count=2),
    ]
    if rate_limits:
        handlers.append(RateLimitErrorRetryHandler(max_retry_count=3))
    return handlers


def clamp(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 20].rstrip() + "\n… (truncated)"


class Notifier:
    def __init__(self, client: WebClient) -> None:
        self.client = client

    def post(
        self,
        channel: str,
        text: str,
        blocks: Sequence[Block] | None = None,
        thread_ts: str | None = None,
    ) -> str:
        resp = self.client.chat_postMessage(
            channel=channel, text=clamp(text, 3900), blocks=blocks, thread_ts=thread_ts
        )
        return str(resp["ts"])

    def update(
        self, channel: str, ts: str, text: str, blocks: Sequence[Block] | None = None
    ) -> None:
        self.client.chat_update(channel=channel, ts=ts, text=clamp(text, 3900), blocks=blocks or [])

    def ephemeral(
        self, channel: str, user: str, text: str, blocks: Sequence[Block] | None = None
    ) -> None:
        try:
            self.client.chat_postEphemeral(
                channel=channel, user=user, text=clamp(text, 3900), blocks=blocks
            )
        except SlackApiError as exc:
            # Ephemeral messages fail in channels the bot is not in; a DM still reaches the user.
            log.warning("ephemeral to %s failed (%s); sending a DM", user, exc.response.get("error"))
            self.client.chat_postMessage(channel=user, text=clamp(text, 3900), blocks=blocks)

    def upload(
        self,
        channel: str,
        filename: str,
        content: bytes,
        title: str,
        comment: str = "",
        thread_ts: str | None = None,
    ) -> None:
        self.client.files_upload_v2(
            channel=channel,
            filename=filename,
            content=content,
            title=title,
            initial_comment=comment or None,
            thread_ts=thread_ts,
        )
