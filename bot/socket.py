"""Socket Mode for development: `python -m bot.socket` (needs SLACK_BOT_TOKEN and
SLACK_APP_TOKEN; Socket Mode requests are not signed, so no SLACK_SIGNING_SECRET)."""

from __future__ import annotations

import logging
import sys

from slack_bolt import App
from slack_bolt.adapter.socket_mode import SocketModeHandler

from bot.app import build_app
from workers.errors import ConfigError
from workers.queueing import connect_front
from workers.settings import Settings, load


def build(settings: Settings) -> App:
    return build_app(settings, connect_front(settings.REDIS_URL), socket_mode=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    try:
        settings = load("socket")
        app = build(settings)
    except ConfigError as exc:
        print(exc.what, file=sys.stderr)
        return 2
    SocketModeHandler(app, settings.secret("SLACK_APP_TOKEN")).start()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
