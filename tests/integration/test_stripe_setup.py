"""``edgebill stripe setup`` and ``edgebill webhooks`` as an operator runs them (click, settings from the
environment) against the local Stripe and a SQLite ledger."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from infra.cli import cli
from infra.devkit.stripe_fake import StripeServerThread
from models.catalog import CATALOG, CATALOG_KEYS
from models.webhooks import WEBHOOK_EVENTS
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import make_client
from sinks.webhooks.store import WebhookStore

pytestmark = pytest.mark.integration

URL = "https://billing.example.test/webhooks/stripe"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with StripeServerThread() as srv:
        yield {
            "EDGEBILL_STRIPE_API_BASE": srv.base_url,
            "EDGEBILL_STRIPE_API_KEY": "sk_test_setup",
            "EDGEBILL_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
            "EDGEBILL_STRIPE_WEBHOOK_URL": URL,
        }


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def store(env: dict[str, str]) -> WebhookStore:
    engine = make_engine(env["EDGEBILL_DATABASE_URL"])
    migrate(engine)
    return WebhookStore(engine)


def stripe_counts(env: dict[str, str]) -> dict[str, int]:
    c = make_client("sk_test_setup", env["EDGEBILL_STRIPE_API_BASE"], timeout=10)
    return {
        "meters": len(c.v1.billing.meters.list({"limit": 100}).data),
        "products": len(c.v1.products.list({"limit": 100}).data),
        "prices": len(c.v1.prices.list({"limit": 100}).data),
        "endpoints": len(c.v1.webhook_endpoints.list({"limit": 100}).data),
    }


def test_setup_twice_creates_nothing_the_second_time_and_leaves_billing_prices_unchanged(env: dict[str, str]) -> None:
    dry = run(env, "stripe", "setup", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and len(plan["created"]) == 9 + 1 + len(CATALOG) + 1  # meters, product, prices, endpoint
    assert stripe_counts(env) == {"meters": 0, "products": 0, "prices": 0, "endpoints": 0}
    assert store(env).catalog() == {}

    first = run(env, "stripe", "setup")
    assert first.exit_code == 0, first.output
    assert "whsec_" in first.output and "EDGEBILL_STRIPE_WEBHOOK_SECRET" in first.output
    assert f"{len(CATALOG_KEYS)} key(s) written" in first.output
    counts = stripe_counts(env)
    assert counts == {"meters": 9, "products": 1, "prices": len(CATALOG), "endpoints": 1}
    rows = store(env).catalog_rows()
    assert [r["key"] for r in sorted(rows, key=lambda r: CATALOG_KEYS.index(r["key"]))] == list(CATALOG_KEYS)

    second = run(env, "stripe", "setup", "--json")
    assert second.exit_code == 0, second.output
    report = json.loads(second.stdout)
    assert report["created"] == [] and report["billing_prices_changed"] == [] and report["endpoint_secret"] is None
    assert stripe_counts(env) == counts
    assert store(env).catalog_rows() == rows  # same price ids, same updated_ms

    c = make_client("sk_test_setup", env["EDGEBILL_STRIPE_API_BASE"], timeout=10)
    (endpoint,) = c.v1.webhook_endpoints.list().data
    assert (endpoint.url, sorted(endpoint.enabled_events or [])) == (URL, sorted(WEBHOOK_EVENTS))


def test_setup_warns_about_another_endpoint_on_the_same_events(env: dict[str, str]) -> None:
    c = make_client("sk_test_setup", env["EDGEBILL_STRIPE_API_BASE"], timeout=10)
    other = c.v1.webhook_endpoints.create(
        {"url": "https://cell.example.test/webhooks/stripe", "enabled_events": ["checkout.session.completed"]}
    )
    c.v1.webhook_endpoints.create({"url": "https://unrelated.test/hook", "enabled_events": ["invoice.paid"]})
    result = CliRunner().invoke(cli, ["stripe", "setup"], env=env, catch_exceptions=False)
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert other.id in warnings[0] and "checkout.session.completed" in warnings[0] and "twice" in warnings[0]
    assert "unrelated" not in result.stderr


def test_setup_refuses_a_partial_catalog(env: dict[str, str]) -> None:
    c = make_client("sk_test_setup", env["EDGEBILL_STRIPE_API_BASE"], timeout=10)
    assert run(env, "stripe", "setup", "--no-webhook").exit_code == 0
    before = store(env).catalog_rows()
    # Someone replaces the overage price by hand with another amount under the same tier key.
    overage = next(
        p for p in c.v1.prices.list({"limit": 100}).data if (p.metadata or {})["tier"] == "sandbox_overage_v1"
    )
    c.v1.prices.update(overage.id, {"active": False})
    product, meter = overage.product, overage.recurring.meter  # type: ignore[union-attr]
    params: Any = {
        "currency": "usd",
        "product": product,
        "unit_amount_decimal": "0.5",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
        "metadata": {"tier": "sandbox_overage_v1", "edgebill": "compute"},
    }
    c.v1.prices.create(params)
    result = CliRunner().invoke(cli, ["stripe", "setup", "--no-webhook"], env=env)
    assert result.exit_code == 1
    assert "not published" in result.output and "sandbox_overage_v1" in result.output
    assert store(env).catalog_rows() == before
    result = CliRunner().invoke(cli, ["stripe", "setup", "--no-webhook", "--json"], env=env)
    assert result.exit_code == 1
    out = json.loads(result.stdout)  # the report, carrying the error: one JSON object
    assert out["exit_code"] == 1 and "not published" in out["error"]
    assert any("sandbox_overage_v1" in p for p in out["problems"])
    assert store(env).catalog_rows() == before


def test_webhooks_lists_outcomes_reapplies_and_shows_the_shadow_log(env: dict[str, str]) -> None:
    s = store(env)
    body = json.dumps(
        {"id": "evt_1", "type": "checkout.session.completed", "created": 5, "data": {"object": {"id": "cs_1"}}}
    ).encode()
    s.receive("stripe-webhook-events", [(0, 0, body), (0, 1, b"junk")])
    s.finish_shadow("evt_1", "org_9", "cus_9", {"subscription": {"idempotency_key": "sub-create-org_9"}})
    s.receive("stripe-webhook-events", [(1, 0, body)])
    listed = json.loads(run(env, "webhooks", "--json").stdout)
    assert [(r["event_id"], r["outcome"]) for r in listed] == [
        ("evt_1", "duplicate"),
        ("invalid:not_json", "invalid"),
        ("evt_1", "shadow"),
    ]
    text = run(env, "webhooks").output
    assert "checkout.session.completed" in text and "shadow" in text and "duplicate" in text
    shadow = run(env, "webhooks", "provisioning", "--shadow").output
    assert "shadow" in shadow and "org_9" in shadow and "cus_9" in shadow
    again = run(env, "webhooks", "reapply", "evt_1")
    assert again.exit_code == 0 and "queued" in again.output
    assert s.due() == ["evt_1"]
    s.finish_noop("evt_1", "org_9", "done")
    refused = CliRunner().invoke(cli, ["webhooks", "reapply", "evt_1"], env=env)
    assert refused.exit_code == 1 and "exactly once" in refused.output
    assert CliRunner().invoke(cli, ["webhooks", "reapply", "evt_nope"], env=env).exit_code == 1
