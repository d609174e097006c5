"""Every shell script sent to an instance is built in this package, and only here.

Rules: POSIX sh (dash), the remote root only through ``$RUNCTL_ROOT`` (set on
the first line by ``header``), and every user-controlled value through ``shlex.quote``.
One module per area: ``core`` (runs), ``checkpoints``, ``lifecycle``, ``env``.
"""

from workers.scripts.core import (
    SECTION,
    fetch_code,
    header,
    launch,
    probe_live_runs,
    q,
    run_dir,
    run_status,
    stop_run,
    wrapper,
)

__all__ = [
    "SECTION",
    "fetch_code",
    "header",
    "launch",
    "probe_live_runs",
    "q",
    "run_dir",
    "run_status",
    "stop_run",
    "wrapper",
]
