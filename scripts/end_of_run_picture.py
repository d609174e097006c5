"""Draw docs/end-of-run-chart.png the way a run's end does: run the sandbox's `plain_train.py`
(a script that knows nothing of runctl) in a scratch run directory, run the summary script on it
under /bin/sh as SSM would, and chart what comes back. Usage: python scripts/end_of_run_picture.py"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from runctl_sandbox.example_repo import PLAIN_SCRIPT
from workers.remote import summary
from workers.slack import chart
from workers.slack.messages.summary import files_text, metrics_text

OUT = Path(__file__).resolve().parents[1] / "docs" / "end-of-run-chart.png"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "runs" / "r-demo" / "work"
        work.mkdir(parents=True)
        (work / "plain_train.py").write_text(PLAIN_SCRIPT)
        with (work.parent / "training.log").open("wb") as log:
            subprocess.run([sys.executable, "-u", "plain_train.py", "12"], cwd=work, stdout=log, stderr=log, check=True)
        script = summary.summary_script(tmp, "r-demo", "r-demo")
        out = subprocess.run(
            [shutil.which("dash") or "/bin/sh", "-c", script], capture_output=True, text=True, check=True
        )
        found = summary.parse(out.stdout)
    series = found.chartable()
    png = chart.run_chart(
        "run r-demo · plain_train.py", series, found.kinds, {n: summary.metric_kind(n) for n in series}
    )
    assert png is not None, "matplotlib is needed"
    OUT.write_bytes(png)
    print(files_text(found.listing, found.total_bytes, None))
    print(metrics_text(found))
    print(f"wrote {OUT} ({len(png):,} bytes)")


if __name__ == "__main__":
    main()
