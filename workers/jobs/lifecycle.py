"""The old job paths of stop, start, terminate, their clicks and [Resume training]: RQ stores a
job's import path, so jobs queued by the release before the split still find their entry here.
New jobs are queued at the flows' own modules (`queueing.JobPath`); drop this after one release."""

from workers.jobs.start import resume as resume
from workers.jobs.start import start as start
from workers.jobs.stop import stop as stop
from workers.jobs.terminate import confirm_click as confirm_click
from workers.jobs.terminate import terminate as terminate
