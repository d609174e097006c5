"""A launch is priced as `/runctl resources` prices a running instance: the Price List API
first (pricing:GetProducts, cached), the shipped table as the dated fallback. Signed
`/runctl launch` and [Launch] through the real Bolt app, real RQ, moto behind the shim, the
sandbox's Price List and the fake Slack."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from runctl_sandbox.aws import Sandbox
from runctl_sandbox.fake_slack import FakeSlack
from runctl_sandbox.inline import InlineWorker
from workers.cost.pricing import load_price_book
from workers.services import Services
from workers.slack.ids import ActionId

from .slack import click
from .test_launch import confirmation, launched_ids, slash, template  # noqa: F401 (template: a fixture)
from .test_lifecycle import as_dict, dispatch, text_of

NEW_TYPE = "gr6.4xlarge"  # a type the shipped table has no figure for


@pytest.fixture
def price_list(sandbox: Sandbox) -> Iterator[Sandbox]:
    sandbox.prices.reset()
    yield sandbox
    sandbox.prices.reset()


@pytest.fixture
def new_preset(svc: Services, template: Any) -> None:  # noqa: F811
    """The launch file with a preset for a type newer than the shipped table."""
    path = svc.settings.RUNCTL_LAUNCH_FILE
    assert path is not None
    path.write_text(path.read_text() + f'\n[presets.new]\ninstance_type = "{NEW_TYPE}"\n')


def quote_then_launch(svc: Services, slack: FakeSlack, worker: InlineWorker, text: str) -> tuple[str, str]:
    """`/runctl <text>`, then [Launch]: the quote it showed and the new instance's id."""
    before = set(launched_ids(svc))
    slash(svc, slack, worker, text)
    asked = confirmation(slack)
    dispatch(svc, slack, worker, click(as_dict(asked), ActionId.LAUNCH_CONFIRM, "U0ALICE"))
    (iid,) = set(launched_ids(svc)) - before
    return text_of(asked), iid


@pytest.mark.usefixtures("new_preset")
def test_a_preset_the_table_lacks_is_quoted_and_capped_at_the_price_lists_price(
    svc: Services, price_list: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    assert load_price_book().on_demand("us-east-1", NEW_TYPE) is None
    price_list.prices.set("us-east-1", NEW_TYPE, "1.5000000000")

    quoted, iid = quote_then_launch(svc, slack, worker, "launch new --name new-gpu")

    assert "*$1.50/h on-demand*" in quoted and "table" not in quoted, quoted
    assert "$36.00 a day" in quoted
    assert launched_ids(svc) == [iid]

    # The caps count it at that price: a second one would be $3.00/h against Alice's $2.00/h.
    price_list.prices.set("us-east-1", NEW_TYPE, "9.99")  # cached for a day: the caps keep $1.50
    slash(svc, slack, worker, "launch new --name third-gpu")
    refusal = slack.ephemerals("U0ALICE")[-1].text
    assert "you would burn $3.00/h ($1.50/h now + $1.50/h); the cap is $2.00/h per person" in refusal, refusal
    assert "price unknown" not in refusal


@pytest.mark.usefixtures("template")
def test_with_the_price_list_denied_the_quote_is_the_tables_and_says_its_date(
    svc: Services, price_list: Sandbox, slack: FakeSlack, worker: InlineWorker
) -> None:
    price_list.prices.set("us-east-1", "g5.xlarge", "0.913")
    price_list.prices.denied = True  # the worker's role lacks pricing:GetProducts

    quoted, iid = quote_then_launch(svc, slack, worker, "launch gpu --name table-gpu")

    table = load_price_book()
    rate = table.on_demand("us-east-1", "g5.xlarge")
    assert rate is not None
    assert f"${rate:f}/h on-demand (price from the table of {table.as_of:%Y-%m-%d})" in quoted, quoted
    assert price_list.prices.calls >= 1  # it asked the Price List first
    assert launched_ids(svc) == [iid]

    # Allowed again, the Price List answers once the short retry has passed.
    price_list.prices.denied = False
    svc.redis.delete("runctl:price:on-demand:us-east-1:g5.xlarge")
    svc.fleet.ec2.terminate_instances(InstanceIds=[iid])
    slash(svc, slack, worker, "launch gpu --name list-gpu")
    assert "*$0.913/h on-demand*" in text_of(confirmation(slack))
