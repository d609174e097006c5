"""The `worker` process: rq's forking worker, started warm.

rq forks a work horse per job. Loading the job modules and botocore's service
models in the parent, once, means each fork starts in milliseconds instead of
re-importing (about 1.5 s for the EC2 client alone)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from botocore.exceptions import BotoCoreError
from rq import Worker

from workers import services
from workers.errors import ConfigError
from workers.queueing import JobPath


def warm() -> None:
    for module in {path.module for path in JobPath}:
        importlib.import_module(module)
    try:
        svc = services.current()
    except ConfigError as exc:
        print(exc.what, file=sys.stderr)
        raise SystemExit(2) from None
    try:
        _ = svc.fleet  # builds the boto3 clients; nothing connects before the fork
    except BotoCoreError as exc:
        print(f"runctl: the worker cannot set up AWS clients: {exc} (set AWS_DEFAULT_REGION / AWS_*)", file=sys.stderr)
        raise SystemExit(2) from None


class RunctlWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        warm()
