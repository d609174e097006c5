"""Benchmark 6: what unsigned and oversized requests cost the real `web` process.

Starts gunicorn from the Procfile with one worker and sends, one after the other:
a 100 MB unsigned body, a 100 MB body with signature-shaped headers (declared and
chunked), 3 million form fields unsigned and signed with the real secret, and a body
trickled a byte at a time. For each it prints the answer, the seconds to it, and the
worker's resident memory after it and at its peak (VmRSS / VmHWM), then checks that a
signed request is still acked.

    python bench/front_door_abuse.py [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/front_door_abuse.py`

import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlencode

from slack_sdk.signature import SignatureVerifier

from bench import harness
from bench.ack_latency import web_process

MB = 1024 * 1024
ANSWER_TIMEOUT = 60.0


def worker_memory_mb(master: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of the single gunicorn worker."""
    (worker,) = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{worker}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def send(port: int, head: list[tuple[str, str]], chunks: Iterator[bytes], chunked: bool = False) -> tuple[str, float]:
    """Headers, then the body from another thread while this one waits for the status line."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT)
    lines = ["POST /slack/events HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in head)]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    started = time.monotonic()
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def pump() -> None:
        try:
            for chunk in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # answered and closed early

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    try:
        status = sock.makefile("rb").readline().split()[1].decode()
    except (OSError, IndexError):
        status = "no answer"
    took = time.monotonic() - started
    sock.close()
    sender.join(timeout=ANSWER_TIMEOUT)
    return status, took


def blocks(total: int, size: int = MB) -> Iterator[bytes]:
    block = b"a" * size
    for _ in range(total // size):
        yield block


def trickle(n: int, every: float) -> Iterator[bytes]:
    for _ in range(n):
        time.sleep(every)
        yield b"a"


def main(argv: list[str] | None = None) -> int:
    args = harness.arguments(__doc__ or "", "10 MB bodies, 300k fields, no trickle").parse_args(argv)
    big = (10 if args.smoke else 100) * MB
    fields = 300_000 if args.smoke else 3_000_000
    form = ("Content-Type", "application/x-www-form-urlencoded")
    shaped = [("X-Slack-Request-Timestamp", str(int(time.time()))), ("X-Slack-Signature", "v0=" + "ab" * 32)]
    many = b"a=1&" * fields
    real = str(SignatureVerifier(harness.SECRET).generate_signature(timestamp=shaped[0][1], body=many))
    attacks: list[tuple[str, list[tuple[str, str]], Iterator[bytes], bool]] = [
        ("unsigned_body", [form, ("Content-Length", str(big))], blocks(big), False),
        ("shaped_body", [form, ("Content-Length", str(big)), *shaped], blocks(big), False),
        ("shaped_chunked_body", [form, *shaped], blocks(big), True),
        ("fields_unsigned", [form, ("Content-Length", str(len(many)))], iter([many]), False),
        (
            "fields_signed",
            [form, ("Content-Length", str(len(many))), shaped[0], ("X-Slack-Signature", real)],
            iter([many]),
            False,
        ),
    ]
    if not args.smoke:
        attacks.append(("trickled_body", [form, ("Content-Length", "100"), *shaped], trickle(100, 0.5), False))
    figures: dict[str, harness.Figure] = {"body_mb": big // MB, "fields": fields}
    with harness.fake_slack() as slack, web_process(slack, workers=1, threads=None) as (port, master):
        rss, _ = worker_memory_mb(master)
        figures["rss_mb_at_start"] = round(rss, 1)
        for name, head, body, chunked in attacks:
            status, took = send(port, head, body, chunked)
            rss, peak = worker_memory_mb(master)
            figures[f"{name} answer"] = status
            figures[f"{name} seconds"] = round(took, 3)
            figures[f"{name} rss_mb"] = round(rss, 1)
            figures[f"{name} peak_rss_mb"] = round(peak, 1)
        text = urlencode(
            {
                "user_id": "U0ALICE",
                "channel_id": "C0TRAIN",
                "command": "/runctl",
                "text": "help",
                "trigger_id": f"bench.abuse.{time.time_ns()}",
            }
        )
        ts = str(int(time.time()))
        sig = str(SignatureVerifier(harness.SECRET).generate_signature(timestamp=ts, body=text))
        head = [form, ("Content-Length", str(len(text))), ("X-Slack-Request-Timestamp", ts), ("X-Slack-Signature", sig)]
        status, took = send(port, head, iter([text.encode()]))
        figures["signed_after answer"] = status
        figures["signed_after seconds"] = round(took, 3)
    harness.report("front_door_abuse", figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
