"""Socket Mode for development: `python -m bot.socket` (needs SLACK_APP_TOKEN)."""

from __future__ import annotations

import logging
import sys

from redis import Redis
from slack_bolt.adapter.socket_mode import SocketModeHandler

from bot.app import build_app
from workers.errors import ConfigError
from workers.settings import load


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    try:
        settings = load("socket")
    except ConfigError as exc:
        print(exc.what, file=sys.stderr)
        return 2
    app = build_app(settings, Redis.from_url(settings.REDIS_URL))
    SocketModeHandler(app, settings.secret("SLACK_APP_TOKEN")).start()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
