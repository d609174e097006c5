"""Every shell script sent to an instance is built in this package, and only here.

Rules: POSIX sh (dash), the remote root only through ``$RUNCTL_ROOT`` (set on
the first line by ``header``), and every user-controlled value through ``shlex.quote``.
Records read back are framed (``frame``): whatever the instance wrote travels only encoded.

One module per area, each script beside the parser of its output: ``shell`` (what every
script shares: header, quoting, the record marker, the run dir, the interpreter), ``frame``
(encoding instance bytes into records, and back), ``bounds`` (numbers from instances), ``core``
(deliver, launch, the wrapper, the poll), ``status`` (the poll's parser), ``checkpoints``,
``lifecycle`` (stop), ``env`` (training environments), ``gpu``, ``logs``, ``backup``, ``events``
(the wrapper's run events), ``reconcile``, ``spot``.
"""

from workers.remote.core import (
    BUSY_EXIT,
    DOWNLOAD_FAILED,
    UNPACK_FAILED,
    deliver,
    fetch_code,
    launch_body,
    parse_sigterm,
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
    "parse_sigterm",
    "probe_live_runs",
    "q",
    "run_dir",
    "runs_status",
    "stop_run",
    "wrapper",
]
