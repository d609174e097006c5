"""The end-of-run summary script on hostile and huge inputs: it runs under dash exactly as SSM
runs it on an instance (here on a local run directory), and its output goes through the same
parser the monitor uses. What the instance wrote is untrusted: names escaped, numbers finite,
links only to the trackers' own hosts, nothing it prints forges a record."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from workers.jobs.summary import Told
from workers.remote import history, summary
from workers.slack import links
from workers.slack.messages.summary import files_text, metrics_text

SH = shutil.which("dash") or "/bin/sh"


def run_dir(root: Path, run_id: str = "r1") -> Path:
    d = root / "runs" / run_id
    (d / "work").mkdir(parents=True)
    return d


def summarize(root: Path, run_id: str = "r1") -> tuple[summary.RunSummary, str]:
    script = summary.summary_script(str(root), run_id, run_id)
    out = subprocess.run([SH, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return summary.parse(out.stdout), out.stdout


def test_metric_names_from_the_progress_history_are_escaped_and_only_finite_numbers_count(tmp_path: Path) -> None:
    d = run_dir(tmp_path)
    rows = [
        {"step": i, "metrics": {"<!channel> `x`": 1.0 / i, "loss": 1.0 / i, "bad": float("nan"), "huge": 1e300}}
        for i in range(1, 6)
    ]
    (d / "progress_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    (d / "training.log").write_text("loss=inf acc=nan\n")
    found, _ = summarize(tmp_path)
    names = {m.name for m in found.metrics}
    assert "<!channel> `x`" in names and "bad" not in names and "huge" not in names
    assert all(math.isfinite(y) for pts in found.series.values() for _, y in pts)
    text = metrics_text(found)
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text
    loss = next(m for m in found.metrics if m.name == "loss")
    assert (loss.last, loss.best, loss.at) == (0.2, 0.2, "step 5")
    assert len(found.chartable()["loss"]) == 5 and found.kinds["loss"] == "step"


def test_nothing_the_log_prints_forges_a_record(tmp_path: Path) -> None:
    d = run_dir(tmp_path)
    forged = "::runctl::total 999999999 7\n::runctl::summary bAAAA\n::runctl::file 5 1 " + "bZXZpbC5wdA==\n"
    (d / "training.log").write_text(forged + "epoch 1/2 loss=0.5\nepoch 2/2 loss=0.25\n")
    ck = d / "checkpoints"
    ck.mkdir()
    (ck / "model.pt").write_bytes(b"x" * 10)
    found, raw = summarize(tmp_path)
    assert (found.total_bytes, found.total_files) == (10, 1)
    assert found.listing is not None and [c.name for c in found.listing.checkpoints] == ["model.pt"]
    assert next(m for m in found.metrics if m.name == "loss").last == 0.25
    assert all(line.startswith("::runctl::") for line in raw.splitlines())


def test_a_huge_log_comes_back_downsampled_within_ssms_output_and_keeps_the_best(tmp_path: Path) -> None:
    d = run_dir(tmp_path)
    with (d / "training.log").open("w") as log:
        for step in range(1, 150_001):
            value = 2.0 / math.sqrt(step) + (0.0001 if step != 123_457 else -1.0)  # one deep dip
            log.write(f"step {step} loss={value:.6f} acc={min(0.99, step / 150_000):.4f}\n")
    found, raw = summarize(tmp_path)
    assert len(raw) < 24_000  # SSM returns at most 24,000 characters of stdout
    assert sum(len(p) for p in found.series.values()) <= summary.MAX_POINTS
    loss = next(m for m in found.metrics if m.name == "loss")
    assert loss.best is not None and loss.best < -0.99 and loss.best_at == "step 123457"
    assert loss.count == 150_000 and loss.at == "step 150000"
    assert min(y for _, y in found.series["loss"]) == pytest.approx(loss.best, abs=1e-6)  # the dip survives


def test_no_checkpoint_only_when_no_place_holds_a_file_and_files_in_outputs_and_save_dirs_count(tmp_path: Path) -> None:
    d = run_dir(tmp_path)
    (d / "training.log").write_text("hello\n")
    found, _ = summarize(tmp_path)
    assert files_text(found.listing, found.total_bytes, None) == "No checkpoint was written."
    (d / "work" / "outputs").mkdir()
    (d / "work" / "outputs" / "model_final.pt").write_bytes(b"m" * 100)
    (d / "work" / "saved").mkdir()
    (d / "work" / "saved" / "best.safetensors").write_bytes(b"s" * 50)
    (d / "checkpoint_dirs").write_text("saved\n")
    found, _ = summarize(tmp_path)
    said = files_text(found.listing, found.total_bytes, None)
    assert "./outputs/model_final.pt" in said and "./saved/best.safetensors" in said and "150 B in all" in said


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://wandb.ai/alice/proj/runs/abc123", "wandb"),
        ("https://huggingface.co/alice/model/commit/0123abc", "huggingface"),
        ("https://www.comet.com/alice/proj/0123456789abcdef0123", "comet"),
        ("https://tensorboard.dev/experiment/AbC/", "tensorboard"),
        ("https://dbc-1234.cloud.databricks.com/ml/experiments/42/runs/abc", "mlflow"),
        ("https://evil.example/alice/proj/runs/abc123", None),
        ("https://wandb.ai.evil.example/alice", None),
        ("https://evil.wandb.ai.example/", None),
        ("https://wandb.ai@evil.example/x", None),
        ("https://user:pw@wandb.ai/x", None),
        ("http://wandb.ai/alice/proj/runs/abc", None),
        ("https://wandb.ai:8443/x", None),
        ("https://evil.example/?next=https://wandb.ai/x", None),
        ("https://wandb.ai/x|<!channel>", None),
        ("https://wandb.ai/x>y", None),
        ("javascript:alert(1)//wandb.ai", None),
        ("http://10.0.0.5:5000/#/experiments/1/runs/ab", None),
        ("https://cloud.databricks.com/ml/experiments/1", None),
    ],
)
def test_only_https_urls_of_the_trackers_own_hosts_are_links(url: str, kind: str | None) -> None:
    assert links.kind_of(url) == kind


def test_the_log_offering_evil_as_a_wandb_link_gets_no_link(tmp_path: Path) -> None:
    d = run_dir(tmp_path)
    (d / "training.log").write_text(
        "wandb: 🚀 View run at https://evil.example/alice/proj/runs/abc\n"
        "wandb: ⭐️ View project at https://wandb.ai/alice/proj\n"
        "wandb: 🚀 View run at https://wandb.ai/alice/proj/runs/abc\n"
        "Model pushed to https://huggingface.co/alice/model/tree/main/.\n"
    )
    found, _ = summarize(tmp_path)
    assert links.pick(found.links) == [
        links.Link("wandb", "https://wandb.ai/alice/proj/runs/abc"),
        links.Link("huggingface", "https://huggingface.co/alice/model/tree/main/"),
    ]


def test_a_series_without_steps_or_epochs_is_drawn_in_report_order(tmp_path: Path) -> None:
    d = run_dir(tmp_path)
    (d / "training.log").write_text("".join(f"train loss: {1 / i:.5f}\n" for i in range(1, 120_001)))
    found, _ = summarize(tmp_path)
    xs = [x for x, _ in found.series["loss"]]
    assert found.kinds["loss"] == "index" and xs == sorted(xs) and len(set(xs)) == len(xs)
    assert xs[0] == 0 and xs[-1] == 119_999


def test_the_wrappers_sampler_keeps_each_new_progress_and_the_end_charts_the_protocols_metrics(tmp_path: Path) -> None:
    d = run_dir(tmp_path)
    (d / "training.log").write_text("")
    writer = (
        "import json, os, sys, time\n"
        "for i in range(1, 5):\n"
        "    doc = {'step': i * 10, 'metrics': {'reward': i * 1.5, 'loss': 1.0 / i}}\n"
        "    open(sys.argv[1] + '.tmp', 'w').write(json.dumps(doc, indent=1))\n"
        "    os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
        "    time.sleep(2.5)\n"
    )
    shell = (
        f"RUN_DIR={d}\n"
        f'python3 -c {shlex.quote(writer)} "$RUN_DIR/progress.json" &\n'
        "child=$!\n" + history.sampler(seconds=1) + 'wait "$child"\nsleep 1.5\n'
    )
    subprocess.run([SH, "-c", shell], check=True, timeout=30)
    rows = [json.loads(line) for line in (d / "progress_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]  # each change once, one line each
    found, _ = summarize(tmp_path)
    assert found.chartable()["reward"] == [(10, 1.5), (20, 3.0), (30, 4.5), (40, 6.0)]
    assert found.kinds["reward"] == "step"
    reward = next(m for m in found.metrics if m.name == "reward")
    assert (reward.last, reward.best, reward.at) == (6.0, 6.0, "step 40")


def test_when_the_parser_cannot_run_the_reply_says_why_there_are_no_metrics(tmp_path: Path) -> None:
    """An interpreter that runs nothing (here `false`, as a broken `runctl:python` would): the
    files still come back, and the reply says why it has no metrics or chart."""
    d = run_dir(tmp_path)
    (d / "training.log").write_text("epoch 1/2 loss=0.5\nepoch 2/2 loss=0.25\n")
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "model.pt").write_bytes(b"x" * 10)
    script = summary.summary_script(str(tmp_path), "r1", "r1", python=shutil.which("false") or "/bin/false")
    out = subprocess.run([SH, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    found = summary.parse(out.stdout)
    assert not found.parsed and found.metrics == [] and found.total_files == 1
    said = Told(summary=found).details()
    assert "No metrics or chart: runctl's log parser did not run on the instance" in said, said
    assert "No metrics" not in Told(summary=summarize(tmp_path)[0]).details()
