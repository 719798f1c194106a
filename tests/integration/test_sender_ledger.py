"""The ledger methods the Stripe sender relies on, on SQLite and PostgreSQL: the bulk state update
and the reconciliation of rows Stripe refused after a 202."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from models.billing import RowState
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.schema import make_engine, migrate

pytestmark = pytest.mark.integration

H = 3600
NOW = int(time.time())
B0 = (NOW // H - 10) * H
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=B0)
CURSOR = "stripe.v2.error_reports_cursor_ms"


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = make_engine(db_url)
    migrate(engine)
    yield Ledger(engine, clock=lambda: 1_000)
    engine.dispose()


def _rows(led: Ledger, orgs: list[str], buckets: int) -> list[str]:
    for org in orgs:
        p = OrgPolicy.model_validate({"org_id": org, "plan": "pro", "billing_mode": "unified", "effective_at": 0})
        led.write_policies("org-policy", [(p, 0, 0)], {0: (0, None)}, {})
    ticks = [
        SourcedTick(Tick(f"{o}:{b}", o, "sb", "w", "c", 1024, 0, 20, (B0 + b * H) * 1000), 0, i)
        for i, (o, b) in enumerate((o, b) for o in orgs for b in range(buckets))
    ]
    led.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={0: (len(ticks), None)})
    led.close(NOW * 1000, LIVE)
    return sorted(r["id"] for o in orgs for r in led.rows(org=o))


def _view(led: Ledger, org: str) -> dict[str, tuple[Any, ...]]:
    keep = ("state", "stripe_customer_id", "attempts", "last_error", "sent_ms")
    return {r["id"].split(":", 1)[1]: tuple(r[k] for k in keep) for r in led.rows(org=org)}


def test_set_states_records_outcomes_and_never_leaves_sent(ledger: Ledger) -> None:
    b = _rows(ledger, ["b"], 4)
    ledger.set_states([(b[2], RowState.DEFERRED_NO_CUSTOMER, None, "org has no Stripe customer yet")])
    ledger.set_states([(b[3], RowState.SENT, "cus_early", None)], attempts=1)
    ledger.set_states(
        [
            (b[0], RowState.SENT, "cus_1", "duplicate at Stripe: already exists"),
            (b[1], RowState.REJECTED, "cus_1", "resource_missing: No such customer"),
            (b[2], RowState.PENDING, None, "429 slow down"),  # deferred -> pending, customer kept (None)
            (b[3], RowState.PENDING, None, "a late transient outcome"),  # must not leave `sent`
        ],
        attempts=1,
    )
    view = _view(ledger, "b")  # keyed by "{bucket}:{meter}"
    assert sorted(v[0] for v in view.values()) == ["pending", "rejected", "sent", "sent"]
    assert view[b[0].split(":", 1)[1]] == ("sent", "cus_1", 1, "duplicate at Stripe: already exists", 1_000)
    assert view[b[3].split(":", 1)[1]][:3] == ("sent", "cus_early", 1)  # unchanged by the late outcome
    assert view[b[2].split(":", 1)[1]][:2] == ("pending", None)
    counters = ledger.counters()
    assert counters["rows.sent"] == 2 and counters["rows.pending"] == 2


def test_rows_refused_after_a_202_become_rejected_once_and_the_cursor_only_moves_forward(ledger: Ledger) -> None:
    ids = _rows(ledger, ["o"], 5)
    ledger.set_states([(ids[0], RowState.SENT, "cus_1", "accepted"), (ids[1], RowState.SENT, "cus_1", None)])
    ledger.set_states([(ids[3], RowState.DEFERRED_NO_CUSTOMER, None, "no customer")])
    refusals = [(i, f"rejected by Stripe after 202 (code): bad {i}") for i in (ids[0], ids[2], ids[3], "unknown")]
    moved = ledger.reject_after_send(refusals, cursor=(CURSOR, 5_000))
    assert moved == [ids[0], ids[2]]  # a sent row and a pending one; never a deferred (unsent) row
    states = {r["id"]: (r["state"], r["last_error"]) for r in ledger.rows()}
    assert states[ids[0]] == ("rejected", f"rejected by Stripe after 202 (code): bad {ids[0]}")
    assert states[ids[1]] == ("sent", None) and states[ids[3]][0] == "deferred_no_customer"
    assert ledger.stripe_cursor(CURSOR) == 5_000
    assert ledger.reject_after_send(refusals, cursor=(CURSOR, 4_000)) == []  # again: nothing to move
    assert ledger.stripe_cursor(CURSOR) == 5_000  # never backwards
    ledger.reject_after_send([], cursor=(CURSOR, 7_000))
    assert ledger.stripe_cursor(CURSOR) == 7_000
    assert ledger.counters()["rows.rejected_async"] == 2
    assert ledger.stripe_cursor("stripe.never.set") is None
