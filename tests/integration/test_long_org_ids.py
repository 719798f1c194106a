"""An org id of 255 characters (the longest the ticks and policies accept) is billed: its identifiers are at
most 100 characters (Stripe refuses longer ones for good), unique per (org, bucket, meter, revision), the
same after a restart, and Stripe's total is exact. On SQLite and PostgreSQL, through the local Stripe server.
"""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from sqlalchemy import update

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.devkit.stripe_fake import StripeServerThread
from models.billing import MAX_IDENTIFIER_LENGTH, UNIFIED_METER, meter_row_id, short_org
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import OutboxSender
from sinks.schema import make_engine, meter_events, migrate
from sinks.stripe.v1 import StripeMeterSink, make_client

pytestmark = pytest.mark.integration

H = 3600
NOW = int(time.time())
B0 = (NOW // H - 5) * H
LIVE = CloseConfig(H, 600, shadow=False, bill_from=B0)
LONG = ("org-" + "0123456789abcdef" * 16)[:255]
TWIN = LONG[:-1] + "X"  # the same first 254 characters: another org


def _send(led: Ledger, base: str) -> None:
    inner = StripeMeterSink(make_client("sk_test_x", base, timeout=10), concurrency=2)
    try:
        OutboxSender(led, RetryingSink(inner, max_attempts=3), now_s=lambda: int(time.time())).run_once()
    finally:
        inner.close()


def test_a_255_character_org_id_is_billed_with_short_stable_identifiers(db_url: str) -> None:
    assert len(LONG) == 255
    with StripeServerThread() as srv:
        client = make_client("sk_test_x", srv.base_url, timeout=10)
        meters = ensure_meters(client)
        customers = ensure_customers(client, {LONG: "long@example.test", TWIN: "twin@example.test"})
        engine = make_engine(db_url)
        migrate(engine)
        led = Ledger(engine)
        for org in (LONG, TWIN):
            p = OrgPolicy.model_validate(
                {"org_id": org, "plan": "pro", "stripe_customer_id": customers[org], "effective_at": 0}
            )
            led.write_policies("org-policy", [(p, 0, 0)], {}, {})
        n = 0

        def ticks(org: str, b: int, k: int) -> list[SourcedTick]:
            nonlocal n
            out = []
            for _ in range(k):
                n += 1
                out.append(SourcedTick(Tick(f"t{n}", org, "sb", "w", "c", 3000, 0, 13, (b + n) * 1000), 0, n))
            return out

        led.write_ticks(
            "usage-ticks",
            ticks(LONG, B0, 3) + ticks(LONG, B0 + H, 2) + ticks(TWIN, B0, 1),
            bucket_seconds=H,
            progress={},
        )
        led.close(NOW * 1000, LIVE)
        _send(led, srv.base_url)
        first = {r["id"]: r for r in led.rows()}
        engine.dispose()

        # a restart: a new engine and ledger object; a late tick makes a correction of B0
        engine = make_engine(db_url)
        led = Ledger(engine)
        led.write_ticks("usage-ticks", ticks(LONG, B0, 1), bucket_seconds=H, progress={})
        led.close(NOW * 1000, LIVE)
        _send(led, srv.base_url)
        rows = led.rows()
        assert {r["id"]: r["value"] for r in rows if r["id"] in first} == {k: v["value"] for k, v in first.items()}
        ids = {r["id"] for r in rows}
        assert len(ids) == 4 and all(len(i) <= MAX_IDENTIFIER_LENGTH for i in ids)
        assert ids == {
            meter_row_id(LONG, B0, UNIFIED_METER),
            meter_row_id(LONG, B0, UNIFIED_METER, 1),
            meter_row_id(LONG, B0 + H, UNIFIED_METER),
            meter_row_id(TWIN, B0, UNIFIED_METER),
        }
        assert {r["state"] for r in rows} == {"sent"}
        assert {r["org_id"] for r in rows} == {LONG, TWIN}  # the ledger keeps the whole org id
        truth = (Decimal(6 * 3000 * 13) / 1024).quantize(Decimal("0.000001"))
        got = meter_totals(client, meters[UNIFIED_METER], customers[LONG], B0 - H, B0 + 3 * H)
        assert got == sum(Decimal(r["value"]) for r in rows if r["org_id"] == LONG) == truth
        assert srv.state.conflicting_identifiers() == []
        engine.dispose()


def test_an_org_whose_id_is_another_orgs_short_form_is_billed_apart_and_old_rows_keep_their_identifiers(
    db_url: str,
) -> None:
    """The pair that shared identifiers before scheme 2: a 124-character org id and an org whose id is that
    id's short form. The short-form org's first row was written under scheme 1 (its plain id); it keeps that
    identifier when sent again, its later correction takes scheme 2, and both orgs' totals are exact."""
    long_org = "org_" + "v" * 120
    twin = short_org(long_org)
    with StripeServerThread() as srv:
        client = make_client("sk_test_x", srv.base_url, timeout=10)
        meters = ensure_meters(client)
        customers = ensure_customers(client, {long_org: "long@example.test", twin: "twin@example.test"})
        assert customers[long_org] != customers[twin]
        engine = make_engine(db_url)
        migrate(engine)
        led = Ledger(engine)
        for org in (long_org, twin):
            p = OrgPolicy.model_validate(
                {"org_id": org, "plan": "pro", "stripe_customer_id": customers[org], "effective_at": 0}
            )
            led.write_policies("org-policy", [(p, 0, 0)], {}, {})
        n = 0

        def ticks(org: str, b: int, k: int) -> list[SourcedTick]:
            nonlocal n
            out = []
            for _ in range(k):
                n += 1
                out.append(SourcedTick(Tick(f"t{n}", org, "sb", "w", "c", 3000, 0, 13, (b + n) * 1000), 0, n))
            return out

        # the release before: the twin's row of B0 took its plain id (scheme 1) and was sent
        led.write_ticks("usage-ticks", ticks(twin, B0, 3), bucket_seconds=H, progress={})
        led.close(NOW * 1000, LIVE)
        old_r0 = meter_row_id(twin, B0, UNIFIED_METER, scheme=1)
        assert old_r0 == f"{twin}:{B0}:{UNIFIED_METER}" != meter_row_id(twin, B0, UNIFIED_METER)
        with engine.begin() as conn:
            conn.execute(update(meter_events).values(id=old_r0))
        _send(led, srv.base_url)

        # this release: a late tick corrects B0; both orgs bill B0 + H, where scheme 1 gave them one identifier
        led.write_ticks(
            "usage-ticks",
            ticks(twin, B0, 1) + ticks(twin, B0 + H, 2) + ticks(long_org, B0 + H, 4),
            bucket_seconds=H,
            progress={},
        )
        led.close(NOW * 1000, LIVE)
        _send(led, srv.base_url)
        # a re-send of the old row (as a reconciliation repair does) sends its stored identifier again
        with engine.begin() as conn:
            conn.execute(update(meter_events).where(meter_events.c.id == old_r0).values(state="pending"))
        _send(led, srv.base_url)

        rows = led.rows()
        assert {r["id"]: (r["org_id"], r["bucket_start"], r["revision"]) for r in rows} == {
            old_r0: (twin, B0, 0),
            meter_row_id(twin, B0, UNIFIED_METER, 1): (twin, B0, 1),
            meter_row_id(twin, B0 + H, UNIFIED_METER): (twin, B0 + H, 0),
            meter_row_id(long_org, B0 + H, UNIFIED_METER): (long_org, B0 + H, 0),
        }
        assert meter_row_id(long_org, B0 + H, UNIFIED_METER) == meter_row_id(twin, B0 + H, UNIFIED_METER, scheme=1)
        assert {r["state"] for r in rows} == {"sent"}
        assert [d["identifier"] for d in srv.state.duplicate_attempt_list()] == [old_r0]
        assert srv.state.conflicting_identifiers() == []
        for org, k in ((twin, 6), (long_org, 4)):
            truth = (Decimal(k * 3000 * 13) / 1024).quantize(Decimal("0.000001"))
            got = meter_totals(client, meters[UNIFIED_METER], customers[org], B0 - H, B0 + 3 * H)
            assert got == sum(Decimal(r["value"]) for r in rows if r["org_id"] == org) == truth, org
        engine.dispose()


def test_an_org_whose_id_is_another_orgs_short_form_gets_its_own_customer() -> None:
    """The customer-create idempotency key holds the org the same way: a 255-character org and the org
    whose id is its short form used one key (Stripe refused the second create as a key reuse)."""
    with StripeServerThread() as srv:
        client = make_client("sk_test_x", srv.base_url, timeout=10)
        twin = short_org(LONG)
        got = ensure_customers(client, {LONG: "long@example.test", twin: "twin@example.test"})
        assert len(set(got.values())) == 2
        again = ensure_customers(client, {LONG: "long@example.test", twin: "twin@example.test"})
        assert again == got
