"""Each benchmark under bench/, smoke-sized, run exactly as documented
(`python bench/<name>.py --smoke`), so they keep working. No assertions on
time: only that the figures are printed and the correctness figures hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[1]
MARK = "BENCH-JSON "

pytestmark = pytest.mark.redis


def run_bench(name: str) -> tuple[str, dict[str, Any]]:
    # A benchmark flushes its Redis db: give it this test process's own db, not the
    # benchmarks' default (db 15), which someone may be benchmarking on right now.
    env = {**os.environ, "RUNCTL_BENCH_REDIS_URL": REDIS_URL}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert len(lines) == 1, proc.stdout
    return proc.stdout, json.loads(lines[0].removeprefix(MARK))


def printed(stdout: str, *names: str) -> None:
    for name in names:
        assert any(line.split() and line.split()[0] == name for line in stdout.splitlines()), f"{name} not printed"


def test_ack_latency_prints_percentiles_and_every_request_is_acked() -> None:
    out, fig = run_bench("ack_latency")
    printed(out, "p50_ms", "p95_ms", "p99_ms", "p99_of_slack_limit", "requests_per_s")
    assert fig["non_200"] == 0
    assert fig["jobs_queued"] == fig["requests"]  # every train and status ack queued its job
    assert fig["p50_ms"] <= fig["p95_ms"] <= fig["p99_ms"] <= fig["max_ms"]


def test_command_to_running_prints_median_and_p95() -> None:
    out, fig = run_bench("command_to_running")
    printed(out, "median_seconds", "p95_seconds")
    assert 0 < fig["median_seconds"] <= fig["p95_seconds"]


def test_lock_race_never_starts_two_runs() -> None:
    out, fig = run_bench("lock_race")
    printed(out, "double_starts", "acquire_p99_ms", "release_p99_ms")
    assert fig["double_starts"] == 0 and fig["trials_without_start"] == 0
    assert fig["e2e_double_starts"] == 0
    assert fig["e2e_second_runs_without_redis_lock"] == 0
    assert fig["e2e_refused_by_instance_check"] >= fig["e2e_trials"]


def test_sweep_makes_one_describe_per_page_and_resources_fits_slack() -> None:
    out, fig = run_bench("sweep_10k")
    printed(out, "sweep_seconds", "peak_rss_mb", "ec2_calls")
    assert fig["ec2_calls"] == fig["expected_calls"]
    assert fig["resources_problems"] == 0
    assert fig["resources_csv_rows"] == fig["instances"] * 9 // 10  # every running instance, in the CSV


def test_aws_calls_are_counted_and_shared_between_runs() -> None:
    out, fig = run_bench("aws_calls")
    printed(out, "runs=1", "runs=3")
    assert fig["runs=1 calls_per_run_hour"] > 0
    assert fig["runs=3 calls_per_run_hour"] < fig["runs=1 calls_per_run_hour"]  # one SendCommand serves all three


def test_reconcile_calls_are_counted_and_one_command_serves_a_batch() -> None:
    out, fig = run_bench("reconcile_calls")
    printed(out, "instances=1", "instances=3")
    assert fig["instances=1 ssm:SendCommand"] == fig["instances=1 passes"]
    assert fig["instances=3 ssm:SendCommand"] == fig["instances=3 passes"]  # one command for the three


def test_waste_counts_the_idle_cost_removed_and_interrupts_no_run() -> None:
    out, fig = run_bench("waste")
    printed(out, "baseline_idle_usd", "autostop_idle_removed_share", "then_stop_idle_removed_share")
    for policy in ("then_stop", "autostop", "both"):
        assert fig[f"{policy}_live_runs_interrupted"] == 0
        assert fig[f"{policy}_busy_usd_unchanged"] is True
        assert 0 < fig[f"{policy}_idle_removed_share"] <= 1
    assert fig["autostop_stops"] > 0 and fig["autostop_headsups"] >= fig["autostop_stops"]


def test_front_door_abuse_is_refused_before_the_body_is_read() -> None:
    out, fig = run_bench("front_door_abuse")
    printed(out, "rss_mb_at_start", "unsigned_body", "fields_unsigned", "signed_after")
    assert [fig[f"{name} answer"] for name in ("unsigned_body", "shaped_body", "shaped_chunked_body")] == [
        "401",
        "413",
        "413",
    ]
    assert (fig["fields_unsigned answer"], fig["fields_signed answer"]) == ("401", "413")
    assert fig["signed_after answer"] == "200"


def test_notify_lag_reports_every_run_with_events_on_and_blocked() -> None:
    out, fig = run_bench("notify_lag")
    printed(
        out, "events_lag_p95_s", "blocked_lag_p95_s", "events_parent_staleness_max_s", "events_aws_calls_per_run_hour"
    )
    assert fig["runs_per_pass"] == 2  # the bench exits non-zero unless every run was reported, in both passes
    assert 0 < fig["events_lag_p50_s"] <= fig["events_lag_p95_s"] <= fig["events_lag_max_s"]
    assert fig["events_aws_calls"] > 0 and fig["blocked_aws_calls"] > 0


def test_spot_relaunch_prices_the_relaunches_a_cancelled_request_prevents() -> None:
    out, fig = run_bench("spot_relaunch")
    printed(out, "before_relaunched_usd", "after_relaunched_usd")
    assert fig["before_relaunched_instances"] == fig["spot_terminates"] > 0
    assert fig["before_relaunched_usd"] > 0 and fig["after_relaunched_usd"] == 0


def test_queue_lag_reports_the_handovers_with_events_on_and_blocked() -> None:
    out, fig = run_bench("queue_lag")
    printed(out, "events_lag_p50_s", "events_lag_p95_s", "blocked_lag_p50_s", "blocked_lag_p95_s")
    for mode in ("events", "blocked"):
        assert fig[f"{mode}_handovers"] == 2 and fig[f"{mode}_started_once"] and fig[f"{mode}_in_order"]
        assert 0 < fig[f"{mode}_lag_p50_s"] <= fig[f"{mode}_lag_p95_s"] <= fig[f"{mode}_lag_max_s"]


def test_scale_runs_events_through_the_budgets_and_replies_to_every_end() -> None:
    out, fig = run_bench("scale")
    printed(out, "slack_429", "end_to_reply_p95_s", "parent_gap_p95_s", "parent_gap_floor_s", "events_accepted_per_s")
    assert fig["slack_429"] == 0  # the scheduler stays within the fake Slack's budgets
    assert fig["ends"] > 0 and fig["ends_not_replied"] == 0  # every end reached its thread
    assert fig["events_202"] > 0 and fig["events_other"] == 0
    # the digest, sweep and reconcile ran once each over every live run's instance
    printed(out, "sweep_seconds", "digest_seconds", "reconcile_seconds", "reconcile_aws_calls")
    assert fig["reconcile_outcome"].startswith(f"{fig['runs']} instance(s)")
    assert "ssm:SendCommand=1" in fig["reconcile_aws_calls"]  # 20 instances: one command
    assert "chat.postMessage=1" in fig["digest_slack_calls"]  # the digest was posted
