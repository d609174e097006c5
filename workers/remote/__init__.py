"""Every shell script sent to an instance is built in this package, and only here.

Rules: POSIX sh (dash), the remote root only through ``$RUNCTL_ROOT`` (set on
the first line by ``header``), and every user-controlled value through ``shlex.quote``.
One module per area: ``core`` (runs), ``checkpoints``, ``lifecycle``, ``env``.
"""

from workers.remote.core import (
    BUSY_EXIT,
    DOWNLOAD_FAILED,
    UNPACK_FAILED,
    deliver,
    fetch_code,
    launch_body,
    probe_live_runs,
    runs_status,
    wrapper,
)
from workers.remote.lifecycle import stop_run
from workers.remote.shell import SECTION, header, q, run_dir

__all__ = [
    "BUSY_EXIT",
    "DOWNLOAD_FAILED",
    "SECTION",
    "UNPACK_FAILED",
    "deliver",
    "fetch_code",
    "header",
    "launch_body",
    "probe_live_runs",
    "q",
    "run_dir",
    "runs_status",
    "stop_run",
    "wrapper",
]
