"""The digest's chart and untrusted display names (issue 32, finding F3): a name matplotlib
would parse as mathtext (`$\\x$`, `$x^$`) or leave out of a legend (`_x`) is drawn as written,
and a chart that cannot be drawn never holds up the digest's text."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from matplotlib.figure import Figure

from runctl_sandbox.aws import SeedInfo
from runctl_sandbox.fake_slack import FakeSlack
from workers import audit
from workers.jobs.digest import digest
from workers.services import Services
from workers.state.runs import Run, RunState

from .test_digest import morning, posted, text_of  # noqa: F401 (morning: a fixture)

ZERO_WIDTH = "\u200b"  # what the chart may put before a leading `_`: nothing shows
HOSTILE = {
    "U0DOLLARX": r"$\x$",  # mathtext: ValueError (unknown symbol)
    "U0CARET": "$x^$",  # mathtext: ValueError (missing superscript)
    "U0UNDER": "_hidden",  # matplotlib leaves `_` labels out of a legend
    "U0SLASH": r"a\$b$ \\ c",  # escapes of its own
    "U0PLAIN": "Plain Person",
}


@pytest.fixture
def legends(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """The legend of every figure saved, as matplotlib draws each label (after its mathtext
    preprocessing), read from the figure as it is saved."""
    seen: list[list[str]] = []
    save = Figure.savefig

    def spy(self: Figure, *args: Any, **kwargs: Any) -> None:
        legends = [legend for legend in (ax.get_legend() for ax in self.axes) if legend is not None]
        shown = [
            t._preprocess_math(t.get_text())  # type: ignore[attr-defined]
            for legend in legends
            for t in legend.get_texts()
        ]
        assert all(math is False for _, math in shown), shown  # nothing is parsed as mathtext
        seen.append([text for text, _ in shown])
        save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    yield seen


def spent_yesterday(svc: Services, fleet_seed: SeedInfo, people: list[str]) -> None:
    gpu = fleet_seed.instances["gpu-box-1"]
    yesterday = svc.clock().replace(hour=0) - timedelta(days=1)
    for n, user in enumerate(people):
        began = yesterday + timedelta(hours=2 * n)
        svc.runs.create(
            Run(
                run_id=f"r-spent-{n}",
                instance_id=gpu,
                user_id=user,
                channel_id="C0TRAIN",
                script="train.py",
                state=RunState.SUCCEEDED,
                created_at=began,
                started_at=began,
                ended_at=began + timedelta(hours=1),
            )
        )


@pytest.mark.usefixtures("morning")  # the clock at 09:00, two days after the fleet's launch
def test_hostile_display_names_are_drawn_as_written_in_the_legend(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, legends: list[list[str]]
) -> None:
    for user, name in HOSTILE.items():
        slack.add_user(user, user.lower(), name)
    spent_yesterday(svc, fleet_seed, list(HOSTILE))

    digest()

    [message] = posted(slack)
    assert svc.redis.exists(f"runctl:digest:{svc.clock():%Y-%m-%d}")  # the day is done
    [chart] = slack.files
    assert chart.thread_ts == message.ts and chart.content.startswith(b"\x89PNG")
    [legend] = legends
    shown = [label.replace(ZERO_WIDTH, "") for label in legend]
    assert set(HOSTILE.values()) <= set(shown), shown  # every person, as written
    assert "*_hidden* — yesterday" in text_of(message)


@pytest.mark.usefixtures("morning")
def test_a_chart_that_fails_never_holds_up_the_digest(
    svc: Services, fleet_seed: SeedInfo, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    slack.add_user("U0ALICE", "alice", "Alice")
    spent_yesterday(svc, fleet_seed, ["U0ALICE"])

    def broken(self: Figure, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the renderer broke")

    monkeypatch.setattr(Figure, "savefig", broken)

    digest()

    [message] = posted(slack)
    assert "*Alice* — yesterday" in text_of(message)
    assert slack.files == []
    assert svc.redis.exists(f"runctl:digest:{svc.clock():%Y-%m-%d}")
    failed = [r for r in audit.newest(svc.redis, 20) if r.text == "digest chart"]
    assert failed and failed[0].decision == "failed" and "RuntimeError" in failed[0].outcome
