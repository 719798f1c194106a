"""The reconciliation's pure rules: Stripe's windows, meter checks, labels, likely causes, repairs, alerts."""

from __future__ import annotations

from decimal import Decimal

import pytest

from models.invoice_check import compare_invoice_line
from models.reconcile import (
    DAY,
    HOUR,
    Cause,
    Grouping,
    Label,
    MeterConfig,
    RepairAction,
    RowFact,
    RowKind,
    WindowKey,
    alert_id,
    aligned_range,
    choose_meter,
    compare_window,
    grouping_for,
    meter_problems,
    plan_repair,
    window_buckets,
    window_of,
    window_ready,
)
from models.reconcile_over import CREDIT_PREFIX, OverAction, credit_of, over_key, plan_over_repair
from models.stripe_window import STRIPE_MAX_AGE_SECONDS

D = 1_781_481_600  # 2026-06-15T00:00:00Z
NOW = D + 3 * DAY
KEY = WindowKey("org_7", "cus_1", "sandbox_compute_sandbox_overage", D, Grouping.DAY)


def _row(i: int, value: str, kind: RowKind = RowKind.SENT, hour: int = 0, **kw: object) -> RowFact:
    return RowFact(f"r{i}", Decimal(value), kind, D + hour * HOUR, **kw)  # type: ignore[arg-type]


def _meter(**kw: object) -> MeterConfig:
    base: dict[str, object] = {
        "id": "mtr_1",
        "event_name": KEY.meter,
        "status": "active",
        "customer_key": "stripe_customer_id",
        "customer_type": "by_id",
        "value_key": "value",
        "formula": "sum",
    }
    base.update(kw)
    return MeterConfig(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- windows


def test_a_row_counts_in_the_window_of_its_bucket_end_as_stripe_groups_it() -> None:
    # The bucket [23:00, 24:00) of the 14th has its timestamp (bucket end) at midnight: it is the 15th's.
    assert window_of(D, Grouping.DAY) == D
    assert window_of(D - 1, Grouping.DAY) == D - DAY
    first, last = window_buckets(D, Grouping.DAY, HOUR)
    assert (first, last) == (D - HOUR, D + 22 * HOUR)  # bucket ends D .. D+23h, all inside the day
    assert window_buckets(D + 5 * HOUR, Grouping.HOUR, HOUR) == (D + 4 * HOUR, D + 4 * HOUR)
    assert window_buckets(D, Grouping.DAY, 60) == (D - 60, D + DAY - 120)


def test_days_when_the_range_is_midnight_aligned_else_hours_rounded_outwards() -> None:
    assert grouping_for(D, D + 2 * DAY) is Grouping.DAY
    assert grouping_for(D, D + 6 * HOUR) is Grouping.HOUR
    assert grouping_for(D + HOUR, D + DAY) is Grouping.HOUR
    assert aligned_range(D + 90, D + 3 * HOUR + 1, Grouping.HOUR) == (D, D + 4 * HOUR)
    assert aligned_range(D + 90, D + DAY + 1, Grouping.DAY) == (D, D + 2 * DAY)


def test_a_window_is_compared_only_closed_sent_and_settled() -> None:
    common = {"grace_s": 600, "settle_s": 600, "open_samples": False, "pending_rows": False}
    end = D + DAY
    assert window_ready(D, Grouping.DAY, now_s=end + 599, newest_sent_s=None, **common) == "not closed yet"  # type: ignore[arg-type]
    assert window_ready(D, Grouping.DAY, now_s=end + 600, newest_sent_s=end, **common) is None  # type: ignore[arg-type]
    assert (
        window_ready(D, Grouping.DAY, now_s=end + 900, newest_sent_s=end + 700, **common) == "sent less than 600 s ago"
    )  # type: ignore[arg-type]
    assert (
        window_ready(
            D,
            Grouping.DAY,
            now_s=NOW,
            newest_sent_s=None,
            grace_s=600,
            settle_s=600,
            open_samples=True,
            pending_rows=False,
        )
        == "samples not aggregated yet"
    )
    assert (
        window_ready(
            D,
            Grouping.DAY,
            now_s=NOW,
            newest_sent_s=None,
            grace_s=600,
            settle_s=600,
            open_samples=False,
            pending_rows=True,
        )
        == "rows waiting to be sent"
    )


def test_an_hour_closes_with_its_last_bucket_not_an_hour_later() -> None:
    """The hour [14:00, 15:00) holds the bucket [13:00, 14:00): it is closed the grace after 14:00."""
    common = {"settle_s": 0, "open_samples": False, "pending_rows": False, "newest_sent_s": None}
    h = D + 14 * HOUR
    assert window_ready(h, Grouping.HOUR, now_s=h + 599, grace_s=600, bucket_seconds=HOUR, **common) == "not closed yet"  # type: ignore[arg-type]
    assert window_ready(h, Grouping.HOUR, now_s=h + 600, grace_s=600, bucket_seconds=HOUR, **common) is None  # type: ignore[arg-type]
    # 15-minute buckets: the last one ending in the hour ends at 14:45.
    assert window_ready(h, Grouping.HOUR, now_s=h + 2700 + 599, grace_s=600, bucket_seconds=900, **common)  # type: ignore[arg-type]
    assert window_ready(h, Grouping.HOUR, now_s=h + 2700 + 600, grace_s=600, bucket_seconds=900, **common) is None  # type: ignore[arg-type]
    # A day: its last bucket ends at 23:00.
    assert window_ready(D, Grouping.DAY, now_s=D + 23 * HOUR + 600, grace_s=600, bucket_seconds=HOUR, **common) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- meters


def test_meter_checks_name_what_stripe_would_not_bill() -> None:
    assert meter_problems(KEY.meter, _meter()) == []
    assert "no meter at Stripe" in meter_problems(KEY.meter, None)[0]
    (inactive,) = meter_problems(KEY.meter, _meter(status="inactive", deactivated_at=D))
    assert "inactive" in inactive and str(D) in inactive
    assert "maps customers" in meter_problems(KEY.meter, _meter(customer_key="customer"))[0]
    assert "reads the value" in meter_problems(KEY.meter, _meter(value_key="amount"))[0]
    assert "aggregates by last" in meter_problems(KEY.meter, _meter(formula="last"))[0]
    assert "pre-aggregated" in meter_problems(KEY.meter, _meter(event_time_window="hour"))[0]
    old = _meter(id="mtr_old", status="inactive", deactivated_at=D)
    new = _meter(id="mtr_new")
    assert choose_meter(KEY.meter, [old, new]) == new  # the active one takes the events
    assert choose_meter(KEY.meter, [old, _meter(id="mtr_older", status="inactive", deactivated_at=D - 9)]) == old
    assert choose_meter("other", [old, new]) is None


# --------------------------------------------------------------------------------------------- compare


def test_exact_decimal_sums_are_ok() -> None:
    rows = [_row(i, "0.1", hour=i) for i in range(3)]
    res = compare_window(KEY, rows, Decimal("0.3"))
    assert res.label is Label.OK and res.ledger == Decimal("0.3") and res.causes == ()


def test_a_dropped_row_is_found_by_its_hour_and_named_missing() -> None:
    rows = [_row(0, "10.5", hour=1), _row(1, "7.25", hour=2), _row(2, "3", hour=2, kind=RowKind.NOT_SENT)]
    res = compare_window(KEY, rows, Decimal("10.5"), hours={D + HOUR: Decimal("10.5")})
    assert res.label is Label.SHORT and res.difference == Decimal("-7.25")
    (note,) = res.causes
    assert (note.cause, note.rows, note.value) == (Cause.MISSING, ("r1",), Decimal("7.25"))
    assert res.hours == ((D + 2 * HOUR, Decimal("7.25"), Decimal(0)),)
    steps, refused = plan_repair(res, NOW)
    assert refused == [] and [(s.row_id, s.action) for s in steps] == [("r1", RepairAction.RESEND)]


def test_a_row_refused_after_the_send_is_counted_as_sent_and_named() -> None:
    lost = _row(1, "4", kind=RowKind.REJECTED_AFTER_SEND, hour=3, error_code="meter_event_customer_not_found")
    rows = [_row(0, "6", hour=2), lost]
    res = compare_window(KEY, rows, Decimal("6"), hours={D + 2 * HOUR: Decimal("6")})
    assert res.label is Label.SHORT and res.ledger == Decimal(10) and res.lost == Decimal(4)
    (note,) = res.causes
    assert note.cause is Cause.REJECTED_AFTER_SEND and note.rows == ("r1",)
    assert "meter_event_customer_not_found" in note.detail
    steps, _ = plan_repair(res, NOW)
    assert [(s.row_id, s.action, s.value) for s in steps] == [("r1", RepairAction.REPLACE, Decimal(4))]


def test_an_error_report_not_applied_yet_is_named_and_its_row_replaced() -> None:
    rows = [_row(0, "6", hour=2), _row(1, "4", hour=3, reported="meter_event_no_customer_defined")]
    res = compare_window(KEY, rows, Decimal("6"), hours={D + 2 * HOUR: Decimal("6")})
    assert [c.cause for c in res.causes] == [Cause.REPORT_NOT_APPLIED]
    assert [s.action for s in plan_repair(res, NOW)[0]] == [RepairAction.REPLACE]


def test_a_row_stripe_holds_without_counting_it_is_cancelled_and_replaced() -> None:
    for kw in ({"held": True}, {"resent": True}):
        rows = [_row(0, "6", hour=2), _row(1, "4", hour=3, **kw)]
        res = compare_window(KEY, rows, Decimal("6"), hours={D + 2 * HOUR: Decimal("6")})
        assert [c.cause for c in res.causes] == [Cause.CANCELLED]
        assert [s.action for s in plan_repair(res, NOW)[0]] == [RepairAction.REPLACE]


def test_a_refusal_for_the_timestamp_is_outside_stripes_window_and_not_repaired() -> None:
    lost = _row(1, "4", kind=RowKind.REJECTED_AFTER_SEND, hour=3, error_code="timestamp_too_far_in_past")
    res = compare_window(KEY, [lost], Decimal(0), hours={})
    assert [c.cause for c in res.causes] == [Cause.OUTSIDE_WINDOW]
    steps, refused = plan_repair(res, NOW)
    assert steps == [] and "35-day window" in refused[0]
    # A missing row whose bucket end is now past the window cannot be re-sent either.
    res = compare_window(KEY, [_row(0, "5", hour=1)], Decimal(0), hours={})
    assert [c.cause for c in res.causes] == [Cause.MISSING]
    steps, refused = plan_repair(res, D + HOUR + STRIPE_MAX_AGE_SECONDS)
    assert steps == [] and "35-day window" in refused[0]


def test_rows_that_cannot_be_told_apart_are_unexplained_and_not_guessed() -> None:
    rows = [_row(0, "2", hour=4), _row(1, "2", hour=4), _row(2, "2", hour=4)]  # a bucket and two corrections
    res = compare_window(KEY, rows, Decimal(4), hours={D + 4 * HOUR: Decimal(4)})
    (note,) = res.causes
    assert note.cause is Cause.UNEXPLAINED and set(note.rows) == {"r0", "r1", "r2"}
    steps, refused = plan_repair(res, NOW)
    assert steps == [] and "cannot be told apart" in refused[0]
    # Without Stripe's hours the shortfall is not attributed either.
    res = compare_window(KEY, rows[:1], Decimal(0))
    assert [c.cause for c in res.causes] == [Cause.UNEXPLAINED]


def test_over_is_taken_back_per_hour_by_a_credit_in_that_hour() -> None:
    # A day window: one hour is short (a row missing), another holds 2.5 more than edgebill sent.
    rows = [_row(0, "5", hour=1), _row(1, "3", hour=4)]
    res = compare_window(KEY, rows, Decimal("7.5"), hours={D + HOUR: Decimal("7.5")})
    assert res.label is Label.SHORT and res.difference == Decimal("-0.5")
    assert res.excess == ((D + HOUR, Decimal("2.5")),)
    assert [(c.cause, c.value) for c in res.causes] == [
        (Cause.MISSING, Decimal(3)),
        (Cause.STRIPE_HOLDS_MORE, Decimal("2.5")),
    ]
    steps, refused = plan_repair(res, NOW)
    assert [(s.row_id, s.action) for s in steps] == [("r1", RepairAction.RESEND)] and refused == []
    over, refused_over = plan_over_repair(res, NOW, HOUR)
    assert refused_over == []
    (credit,) = over
    assert (credit.action, credit.hour, credit.excess, credit.value) == (
        OverAction.CREDIT,
        D + HOUR,
        Decimal("2.5"),
        Decimal("-2.5"),
    )
    assert (credit.bucket_start, credit.bucket_end) == (D, D + HOUR)  # inside the hour, on its row's bucket
    assert credit.key == over_key(KEY.org_id, KEY.meter, D + HOUR, Decimal("2.5"), OverAction.CREDIT)
    assert len(credit.key) <= 100


def test_over_in_an_hour_without_edgebill_rows_is_credited_on_the_hour_s_last_bucket() -> None:
    res = compare_window(
        KEY, [_row(0, "5", hour=1)], Decimal(12), hours={D + HOUR: Decimal(5), D + 9 * HOUR: Decimal(7)}
    )
    (credit,) = plan_over_repair(res, NOW, 900)[0]
    assert (credit.hour, credit.bucket_end, credit.bucket_start) == (
        D + 9 * HOUR,
        D + 9 * HOUR + 2700,
        D + 9 * HOUR + 1800,
    )


def test_an_own_identifier_stripe_holds_is_cancelled_and_billed_again_within_24_hours() -> None:
    sent_ms = (NOW - 3600) * 1000
    held = _row(0, "5", hour=1, held=True, sent_ms=sent_ms)
    res = compare_window(KEY, [held], Decimal(8), hours={D + HOUR: Decimal(8)})
    (step,) = plan_over_repair(res, NOW, HOUR)[0]
    assert (step.action, step.row_id, step.value, step.excess) == (
        OverAction.CANCEL_REPLACE,
        "r0",
        Decimal(5),
        Decimal(3),
    )
    # Past Stripe's 24 h (with the margin), or with two candidates: a credit.
    late = _row(0, "5", hour=1, held=True, sent_ms=(NOW - 24 * 3600 + 600) * 1000)
    res = compare_window(KEY, [late], Decimal(8), hours={D + HOUR: Decimal(8)})
    assert [s.action for s in plan_over_repair(res, NOW, HOUR)[0]] == [OverAction.CREDIT]
    two = [held, _row(1, "1", hour=1, held=True, sent_ms=sent_ms)]
    res = compare_window(KEY, two, Decimal(9), hours={D + HOUR: Decimal(9)})
    assert [s.action for s in plan_over_repair(res, NOW, HOUR)[0]] == [OverAction.CREDIT]


def test_over_past_stripes_window_is_refused_for_a_credit_note() -> None:
    res = compare_window(KEY, [_row(0, "5", hour=1)], Decimal(6), hours={D + HOUR: Decimal(6)})
    steps, refused = plan_over_repair(res, D + HOUR + STRIPE_MAX_AGE_SECONDS, HOUR)
    assert steps == [] and refused[0][0] == D + HOUR and "credit note" in refused[0][1]


def test_a_credit_row_and_the_excess_it_takes_back_add_up_to_nothing() -> None:
    rows = [_row(0, "5", hour=1), _row(1, "-2.5", kind=RowKind.CREDIT, hour=1, repair_of=CREDIT_PREFIX + "k")]
    res = compare_window(KEY, rows, Decimal(5), hours={D + HOUR: Decimal(5)})  # Stripe: 5 + 2.5 - 2.5
    assert res.label is Label.OK and res.ledger == Decimal(5)
    assert credit_of(CREDIT_PREFIX + "k") == "k" and credit_of("r0") is None and credit_of(None) is None


def test_over_keys_are_one_per_org_meter_hour_difference_and_action() -> None:
    k = over_key("o", "m", D, Decimal("2.50"), OverAction.CREDIT)
    assert k == over_key("o", "m", D, Decimal("2.5"), OverAction.CREDIT)
    others = {
        over_key("o2", "m", D, Decimal("2.5"), OverAction.CREDIT),
        over_key("o", "m2", D, Decimal("2.5"), OverAction.CREDIT),
        over_key("o", "m", D + HOUR, Decimal("2.5"), OverAction.CREDIT),
        over_key("o", "m", D, Decimal("2.6"), OverAction.CREDIT),
        over_key("o", "m", D, Decimal("2.5"), OverAction.CANCEL_REPLACE),
    }
    assert k not in others and len(others) == 5
    assert len(over_key("o" * 255, "m" * 100, D, Decimal("123456789.123456"), OverAction.CANCEL_REPLACE)) <= 100


def test_meter_and_customer_labels_come_first() -> None:
    rows = [_row(0, "5", hour=1)]
    res = compare_window(KEY, rows, Decimal(5), meter_issues=["meter mtr_1 is inactive"])
    assert res.label is Label.METER_MISCONFIGURED and res.causes[0].cause is Cause.METER
    assert plan_repair(res, NOW)[0] == []
    res = compare_window(KEY, rows, None, customer_known=False)
    assert res.label is Label.UNKNOWN_CUSTOMER and res.causes[0].cause is Cause.CUSTOMER
    res = compare_window(KEY, rows, None)  # no meter at all: nothing to read
    assert res.label is Label.METER_MISCONFIGURED


def test_replaced_and_unsent_rows_are_not_expected_at_stripe() -> None:
    rows = [
        _row(0, "4", kind=RowKind.REPLACED, hour=3),
        _row(1, "4", hour=3, repair_of="r0"),
        _row(2, "9", kind=RowKind.NOT_SENT, hour=3),
        _row(3, "1", kind=RowKind.PENDING, hour=3),
    ]
    res = compare_window(KEY, rows, Decimal(4))
    assert res.label is Label.OK and res.ledger == Decimal(4)


def test_alert_ids_are_stable_bounded_and_one_per_episode() -> None:
    a = alert_id(KEY, 3)
    assert a == alert_id(KEY, 3) and a != alert_id(KEY, 5)
    long = WindowKey("o" * 255, "cus_" + "x" * 200, KEY.meter, D, Grouping.DAY)
    assert len(alert_id(long, 10**12)) <= 255


@pytest.mark.parametrize(
    ("stripe", "ledger", "known", "label"),
    [("3.5", "3.5", True, Label.OK), ("3", "3.5", True, Label.SHORT), ("4", "3.5", True, Label.OVER)],
)
def test_invoice_lines_compare_exactly(stripe: str, ledger: str, known: bool, label: Label) -> None:
    assert compare_invoice_line(Decimal(stripe), Decimal(ledger), meter_known=known) is label
    assert compare_invoice_line(Decimal(stripe), Decimal(ledger), meter_known=False) is Label.METER_MISCONFIGURED
