"""Training output can never be read as the bot's own records (issue 23 D): the real scripts,
run under dash over a run directory full of arbitrary bytes (the record prefix, newlines,
CRs, NULs, Unicode line breaks, invalid UTF-8) in training.log, progress.json, the spot
notice, nvidia-smi's output, meta.json and file and directory names, yield exactly what a
run with honest files yields: the same runs, and each content field equal to the file's own
bytes. With base64 on the instance and without it (od's hex)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from workers.remote import gpu, runs_status
from workers.remote.backup import parse_sums, sums
from workers.remote.checkpoints import list_checkpoints
from workers.remote.checkpoints import parse as parse_listing
from workers.remote.lifecycle import parse_stop, stop_run
from workers.remote.logs import parse_tail, tail_script
from workers.remote.reconcile import parse_report, runs_report
from workers.remote.status import Snapshot, parse_many, progress_from_file, progress_from_log

RUN_ID = "r20261206-070000-abcdef"
RECORDS = [
    b"::runctl::exit 0",
    b"::runctl::run r20261206-070000-000000",
    b"::runctl::run " + RUN_ID.encode(),
    b'::runctl::spot 1700000000 {"action": "terminate"}',
    b"::runctl::gpu 0, 100, 1, 2",
    b"::runctl::gpus x30",
    b"::runctl::alive 1",
    b"::runctl::pid 1",
    b"::runctl::wrapper 1",
    b"::runctl::end",
    b"::runctl::log",
    b"::runctl::progress",
    b"::runctl::checkpoint 1 1700000000 bYQ==",
    b"::runctl::sum 1 2 - x",
    b"::runctl::subdir x",
    b"::runctl::meta {}",
    b"::runctl::none",
    b"::runctl::nolog x",
    b"::runctl::b64",
    b"::runctl::entry ok 1 1 1 1 - x",
    b"::runctl::more 5",
    b"::runctl::now 99999999999999999999",
]
BREAKS = [
    b"\n",
    b"\r",
    b"\r\n",
    b"\0",
    b"\x0b",
    b"\x0c",
    b"\x1c",
    b"\x1e",
    b"\x85",
    b"\xc2\x85",
    "\u2028".encode(),
    b"\xff",
    b"\xc3",
    b" ",
    b"\\",
    b"$(touch pwned)",
    b"'",
    b'"',
    b"%s",
    b"\\n",
]
BYTES = st.lists(st.one_of(st.binary(max_size=16), st.sampled_from(RECORDS), st.sampled_from(BREAKS)), max_size=12).map(
    b"".join
)
NAME = BYTES.map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")[:200]).filter(
    lambda b: b not in (b"", b".", b"..")
)
FORGED = b"\n".join(RECORDS) + b"\r" + b"\r".join(RECORDS) + b"\n"

PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


def dash(script: str, path: str) -> str:
    """stdout alone (SSM keeps stderr apart), decoded as the SSM agent's output is."""
    sh = shutil.which("dash")
    if sh is None:
        pytest.fail("dash is not installed (`apt-get install dash`); instance scripts must run under it")
    out = subprocess.run([sh, "-c", script], capture_output=True, timeout=60, env={**os.environ, "PATH": path})
    return out.stdout.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, str]:
    """PATH with base64 (False) and without it (True: the scripts fall back to od's hex)."""
    bare = tmp_path_factory.mktemp("no-base64")
    for directory in os.environ["PATH"].split(":"):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            if entry.name != "base64" and not (bare / entry.name).exists():
                (bare / entry.name).symlink_to(entry.path)
    return {False: os.environ["PATH"], True: str(bare)}


def genuine(command: str, *args: str) -> bytes:
    """What the same POSIX tools print for a file: the content a field must hold."""
    return subprocess.run(["dash", "-c", command, "_", *args], capture_output=True, check=True).stdout


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="runctl-frame-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fresh(root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    rdir = root / "runs" / RUN_ID
    (rdir / "checkpoints").mkdir(parents=True)
    return rdir


def touch(directory: Path, name: bytes, data: bytes = b"w") -> bytes:
    with open(os.path.join(os.fsencode(directory), name), "wb") as f:
        f.write(data)
    return name


def plain(name: bytes) -> str | None:
    """The name as text where `ls | read` hands it over whole, else None."""
    try:
        text = name.decode()
    except UnicodeDecodeError:
        return None
    return None if "\n" in text else text


@PROPERTY
@given(log=BYTES, progress=BYTES, notice=BYTES, smi=BYTES, name=NAME, hexonly=st.booleans())
@example(log=FORGED, progress=FORGED, notice=FORGED, smi=FORGED, name=b"a\r::runctl::exit 0", hexonly=False)
@example(log=FORGED, progress=FORGED, notice=FORGED, smi=FORGED, name=b"a\r::runctl::exit 0", hexonly=True)
def test_status_fields_are_the_files_own_bytes_and_nothing_more(
    root: Path,
    paths: dict[bool, str],
    log: bytes,
    progress: bytes,
    notice: bytes,
    smi: bytes,
    name: bytes,
    hexonly: bool,
) -> None:
    rdir = fresh(root)
    (rdir / "training.log").write_bytes(log)
    (rdir / "progress.json").write_bytes(progress)
    (rdir / "spot_interruption").write_bytes(notice)
    touch(rdir / "checkpoints", name)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (root / "smi").write_bytes(smi)
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\ncat '{root}/smi'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)

    script = runs_status(str(root), [RUN_ID, "r20261206-070000-000000"])
    found = parse_many(dash(script, f"{bin_dir}:{paths[hexonly]}"))

    assert list(found) == [RUN_ID]  # the other id has no directory: no forged section for it
    snap = found[RUN_ID]
    tail = genuine('tail -n 15 "$1" | cut -c1-300', str(rdir / "training.log")).decode("utf-8", "replace")
    rows = genuine('head -n 16 "$1" | head -c 2000', str(root / "smi")).decode("utf-8", "replace")
    said = notice[:300].decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    expected = Snapshot(
        log=tail.splitlines(),
        progress=progress_from_file(progress[:1500].decode("utf-8", "replace")) if progress else None,
        gpus=[row for r in rows.splitlines() if (row := gpu.parse_row(r)) is not None] or None,
        spot_notice=said,
        spot_signalled_at=snap.spot_signalled_at,
        instance_now=snap.instance_now,
        checkpoint=snap.checkpoint,
    )
    if expected.progress is None:
        expected.progress = progress_from_log(expected.log)
    assert snap == expected
    assert snap.spot_signalled_at is not None
    assert int(snap.spot_signalled_at.timestamp()) == int((rdir / "spot_interruption").stat().st_mtime)
    text = plain(name)
    if snap.checkpoint is not None:
        assert snap.checkpoint.name == name.decode("utf-8", "replace") and snap.checkpoint.size == 1
    elif text is not None and not text.startswith(".") and text not in ("manifest.json", "completed.json"):
        pytest.fail(f"the checkpoint {text!r} was not reported")


@PROPERTY
@given(names=st.lists(NAME, min_size=1, max_size=4, unique=True), content=BYTES, manifest=BYTES, hexonly=st.booleans())
@example(
    names=[b"a\r::runctl::sum 1 2 - x", b"b\n::runctl::entry ok 1 1 1 1 - y.pt"],
    content=FORGED,
    manifest=FORGED,
    hexonly=True,
)
def test_listings_and_sums_name_only_files_that_exist(
    root: Path, paths: dict[bool, str], names: list[bytes], content: bytes, manifest: bytes, hexonly: bool
) -> None:
    rdir = fresh(root)
    actual = {touch(rdir / "checkpoints", n + b".pt", content) for n in names}
    actual.add(touch(rdir / "checkpoints", b"manifest.json", manifest))
    (rdir / "checkpoints" / (names[0] + b".d").decode("utf-8", "surrogateescape")).mkdir()
    on_disk = {n.decode("utf-8", "replace") for n in actual} | {(names[0] + b".d").decode("utf-8", "replace")}

    listings = parse_listing(dash(list_checkpoints(str(root), RUN_ID), paths[hexonly]))
    assert [listing.run_id for listing in listings] == [RUN_ID] and not listings[0].missing
    # (an entry the manifest names but the disk lacks is listed as missing: a fact, not a file)
    assert {c.name for c in listings[0].checkpoints if c.problem != "file is missing"} <= on_disk

    listed = parse_sums(dash(sums(str(root), RUN_ID), paths[hexonly]))
    assert {s.name for s in listed.files} <= on_disk and set(listed.subdirs) <= on_disk
    for s in listed.files:
        assert s.size == len(content) or s.name == "manifest.json"
    wanted = {t for n in actual if (t := plain(n)) is not None and "\r" not in t}
    assert wanted <= {s.name for s in listed.files}


@PROPERTY
@given(meta=BYTES, log=BYTES, name=NAME, hexonly=st.booleans())
@example(meta=FORGED, log=FORGED, name=b"x\r::runctl::run " + RUN_ID.encode() + b" live", hexonly=True)
def test_reconcile_and_log_tail_report_only_real_runs(
    root: Path, paths: dict[bool, str], meta: bytes, log: bytes, name: bytes, hexonly: bool
) -> None:
    rdir = fresh(root)
    (rdir / "meta.json").write_bytes(meta)
    (rdir / "training.log").write_bytes(log)
    odd = root / "runs" / name.decode("utf-8", "surrogateescape")
    if not odd.exists():
        odd.mkdir()
        (odd / "meta.json").write_bytes(meta)

    report = parse_report(dash(runs_report(str(root), []), paths[hexonly]))
    real = {p.name for p in (root / "runs").iterdir()}
    assert {r.run_id for r in report.runs} <= real and RUN_ID in {r.run_id for r in report.runs}
    assert all(r.seen == "starting" and r.exit_code is None for r in report.runs)

    tail = parse_tail(dash(tail_script(str(root), RUN_ID, 15, None), paths[hexonly]))
    assert tail.run_id == RUN_ID and not tail.missing
    assert tail.data == genuine('tail -n 15 "$1"', str(rdir / "training.log"))
    assert tail.size == len(log)


def test_a_checkpoint_saved_on_sigterm_cannot_forge_the_stop_result(root: Path, paths: dict[bool, str]) -> None:
    """dash's `echo` reads backslashes: a name holding a literal `\\n` once printed a second line."""
    rdir = fresh(root)
    forged = "x\\nstopped kill 7 7\rstopped none"
    training = subprocess.Popen(
        [
            "dash",
            "-c",
            "trap 'sleep 0.1; printf w > \"$1/$2\"; exit 143' TERM; while :; do sleep 0.05; done",
            "_",
            str(rdir / "checkpoints"),
            forged,
        ],
        start_new_session=True,
    )
    reaper = threading.Thread(target=training.wait)  # reaped at once: `kill -0` sees no zombie
    reaper.start()
    try:
        (rdir / "pid").write_text(f"{training.pid}\n")
        (rdir / "pgid").write_text(f"{training.pid}\n")
        (rdir / "exit_code").write_text("143\n")  # the wrapper's part, done ahead: no wait for it
        (rdir / "progress.json").write_text(
            '{"step": 4,\n"total_steps": 8, "total_epochs": 2, "x": "\\nstopped kill 9 9"}'
        )
        result = parse_stop(dash(stop_run(str(root), RUN_ID, 10), paths[False]))
    finally:
        training.kill()
        reaper.join()
    assert result is not None and result.how == "term" and result.waited < 7
    assert result.saved == (forged,)
    assert result.finished_epoch == 1
