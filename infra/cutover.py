"""The cutover as an operation: what ``edgebill cutover status | plan | arm | rollback | release`` do.

A change is written to the ledger first (with its row moves, :mod:`sinks.ledger.cutover`), then every state
change not yet acknowledged is published on ``billing-control`` (key ``cutover``). A failed publish leaves
the change recorded and in force; the next command (or ``cutover publish``) publishes it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from models.billing import Authority, RowState, bucket_start_s
from models.cutover import (
    CutoverState,
    Decision,
    armed_state,
    interlock_problems,
    plan_problems,
    rollback_problems,
    rolled_back_state,
)
from models.errors import BrokerError, CutoverRefused
from models.stripe_window import CANCEL_MARGIN_SECONDS, cancellable
from sinks.ledger import BOOTSTRAP_SOURCE, Ledger, LogEntry
from sinks.ledger.cutover import KIND_CANCEL, KIND_PLAN
from sinks.parity import ParityStore
from sinks.stripe.v1 import Cancellation

__all__ = [
    "CANCEL_MARGIN_SECONDS",
    "Actor",
    "CutoverOps",
    "arm",
    "plan",
    "publish_pending",
    "release",
    "rollback",
    "status",
    "status_without_ledger",
]

log = logging.getLogger(__name__)

#: A worker whose last acknowledgement is older than this is shown as gone.
ACK_STALE_SECONDS: Final = 120
#: Buckets shown on each side of T (and of R) in the seam report.
SEAM_BUCKETS: Final = 2


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change, why, and with which command (all recorded)."""

    by: str
    reason: str
    command: str


@dataclass(frozen=True)
class CutoverOps:
    """What the cutover commands work with, built at the edge from the settings."""

    ledger: Ledger
    parity: ParityStore
    bootstrap: CutoverState  # the environment's state, in force until the first recorded change
    bucket_seconds: int
    grace_seconds: int
    clean_hours_required: Decimal
    publish: Callable[[CutoverState], None]  # one state on billing-control; raises BrokerError
    clock_ms: Callable[[], int]
    cancel: Callable[[str, str], Cancellation] | None = None  # (event_name, identifier) at Stripe


def _iso(ts_s: int | None) -> str | None:
    if ts_s is None:
        return None
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _change_id(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:24]


def _state_wire(state: CutoverState) -> dict[str, Any]:
    w = state.to_wire()
    w["bill_from_iso"] = _iso(state.bill_from) if state.bill_from else None
    w["bill_until_iso"] = _iso(state.bill_until)
    w["live"] = state.live
    return w


# ------------------------------------------------------------------------------------------ publishing


def publish_pending(ops: CutoverOps) -> dict[str, Any]:
    """Publish every recorded state change the control topic has not acknowledged, oldest first, and mark
    each published once the broker acknowledged it. Returns ``{"published": [...], "error": str | None}``;
    a broker that cannot be reached stops the loop (the rest stays unpublished, in order)."""
    done: list[str] = []
    for entry in ops.ledger.unpublished_states():
        state = entry.state()
        try:
            ops.publish(state)
        except BrokerError as exc:
            return {"published": done, "error": str(exc), "unpublished": len(ops.ledger.unpublished_states())}
        ops.ledger.mark_published([entry.change_id])
        done.append(entry.change_id)
    return {"published": done, "error": None, "unpublished": 0}


# ------------------------------------------------------------------------------------------ status


def status(ops: CutoverOps, *, log_limit: int = 50) -> dict[str, Any]:
    """Everything an operator watches during a cutover, as data (``--json`` prints it as is)."""
    led = ops.ledger
    now_ms = ops.clock_ms()
    eff = led.effective_cutover(ops.bootstrap)
    st = eff.state
    gate = ops.parity.gate(ops.grace_seconds)
    counts = led.state_counts()
    size = ops.bucket_seconds
    out: dict[str, Any] = {
        "now": _iso(now_ms // 1000),
        "state": {**_state_wire(st), "source": eff.source, "seq": eff.seq},
        "environment": {**_state_wire(ops.bootstrap), "in_force": eff.seq == 0},
        "interlocks": interlock_problems(st, size),
        "gate": {
            "clean_hours": str(gate.clean_hours.normalize()) if gate.clean_hours else "0",
            "required_hours": str(ops.clean_hours_required),
            "open": gate.clean_hours >= ops.clean_hours_required,
            "clean_buckets": gate.clean_buckets,
            "last_settled": gate.last_settled,
            "last_flagged": gate.last_flagged,
        },
        "rows": {"pending": counts.get(RowState.PENDING.value, 0), "shadow": counts.get(RowState.SHADOW.value, 0)},
        "rows_by_state": counts,
    }
    plan_entry = led.latest_plan()
    out["plan"] = None if plan_entry is None else _entry_wire(plan_entry)
    seam_t = plan_entry.bill_from if plan_entry is not None and plan_entry.bill_from else st.bill_from
    out["seam"] = _seam(ops, seam_t, st.bill_until)
    acks = []
    for owner, seq, acked_ms in led.cutover_acks():
        gone = now_ms - acked_ms > ACK_STALE_SECONDS * 1000
        acks.append(
            {
                "owner": owner,
                "seq": seq,
                "acked": _iso(acked_ms // 1000),
                "current": seq == eff.seq,
                "status": "gone" if gone else ("current" if seq == eff.seq else "stale"),
            }
        )
    out["workers"] = acks
    out["log"] = [_entry_wire(e) for e in led.cutover_log(limit=log_limit)]
    out["unpublished"] = [e.change_id for e in led.unpublished_states()]
    return out


def status_without_ledger(bootstrap: CutoverState, bucket_seconds: int, ledger_url: str, why: str) -> dict[str, Any]:
    """``cutover status`` before any ledger exists: the bootstrap state (from the settings) is the one in
    force, since no change can have been recorded; ``ledger`` is None and ``ledger_url`` says where it will be.
    Reads nothing and creates nothing."""
    return {
        "now": _iso(int(time.time())),
        "ledger": None,
        "ledger_url": ledger_url,
        "note": f"no ledger exists yet ({why}); the first worker or cutover command creates it there. Until then "
        "the bootstrap state from the settings is in force",
        "state": {**_state_wire(bootstrap), "source": BOOTSTRAP_SOURCE, "seq": 0},
        "environment": {**_state_wire(bootstrap), "in_force": True},
        "interlocks": interlock_problems(bootstrap, bucket_seconds),
    }


def _entry_wire(e: LogEntry) -> dict[str, Any]:
    w = e.to_wire()
    w["changed"] = _iso(e.changed_ms // 1000)
    w["bill_from_iso"] = _iso(e.bill_from) if e.bill_from else None
    w["bill_until_iso"] = _iso(e.bill_until)
    return w


def _seam(ops: CutoverOps, at: int, until: int | None) -> dict[str, Any]:
    """The buckets around T (and R): each bucket's decision and rows by state; the gaps (buckets in [T, R)
    decided in shadow: nobody bills them until released); rows sent for buckets at or after R."""
    size = ops.bucket_seconds
    led = ops.ledger
    out: dict[str, Any] = {"T": at or None, "R": until, "buckets": [], "gaps": [], "sent_from_R": []}
    if not at:
        return out
    around = {at + k * size for k in range(-SEAM_BUCKETS, SEAM_BUCKETS + 1)}
    if until is not None:
        around |= {until + k * size for k in range(-SEAM_BUCKETS, SEAM_BUCKETS + 1)}
    report = led.bucket_report(around)
    for b in sorted(around):
        r = report[b]
        side = "cell" if b < at or (until is not None and b >= until) else "edge"
        out["buckets"].append(
            {"bucket": b, "at": _iso(b), "side": side, "closed": r["closed"], "decision": r["decision"], **r}
        )
    out["gaps"] = [
        {"bucket": b, "at": _iso(b)}
        for b, _ in led.decided_buckets(at_or_after=at, before=until, decision=Decision.SHADOW)
    ]
    if until is not None:
        out["sent_from_R"] = [_sent_row(r, ops.clock_ms()) for r in led.sent_rows_from(until)]
    return out


def _sent_row(r: dict[str, Any], now_ms: int) -> dict[str, Any]:
    sent = r.get("sent_ms") or 0
    can_cancel = cancellable(sent, now_ms)
    return {
        "id": r["id"],
        "org_id": r["org_id"],
        "bucket": r["bucket_start"],
        "meter": r["meter"],
        "value": r["value"],
        "sent": _iso(sent // 1000) if sent else None,
        "cancellable": can_cancel,
    }


# ------------------------------------------------------------------------------------------ changes


def _refuse_or_force(problems: Sequence[str], *, force: bool, actor: Actor) -> list[str]:
    """The problems a forced command records, or :class:`CutoverRefused`."""
    if not problems:
        return []
    if not force:
        raise CutoverRefused([*problems, "(--force --reason '...' overrides, and is recorded)"])
    if not actor.reason.strip():
        raise CutoverRefused(["--force needs a --reason: forcing past a safety check is recorded with why"])
    for p in problems:
        log.warning("forced past: %s", p)
    return list(problems)


def plan(ops: CutoverOps, at: int, actor: Actor, *, force: bool = False) -> dict[str, Any]:
    """Record a plan to cut over at T. Refuses a T that is not bucket-aligned, not in the future, or not
    preceded by the configured run of clean parity hours, and a plan while the edge is authoritative,
    unless forced (the problems are then recorded with the plan). Changes no state."""
    now_ms = ops.clock_ms()
    gate = ops.parity.gate(ops.grace_seconds)
    problems = plan_problems(
        at,
        now_s=now_ms // 1000,
        bucket_seconds=ops.bucket_seconds,
        clean_hours=gate.clean_hours,
        required_hours=ops.clean_hours_required,
    )
    current = ops.ledger.effective_cutover(ops.bootstrap).state
    if current.authority is Authority.EDGE:
        problems.append(f"a cutover is in force (T={current.bill_from}, {_iso(current.bill_from)}): roll back first")
    forced = _refuse_or_force(problems, force=force, actor=actor)
    details = {"forced": forced, "clean_hours": str(gate.clean_hours), "required_hours": str(ops.clean_hours_required)}
    got = ops.ledger.record_entry(
        KIND_PLAN,
        _change_id("plan", at, now_ms, actor.by),
        by=actor.by,
        reason=actor.reason,
        command=actor.command,
        changed_ms=now_ms,
        details=details,
        bill_from=at,
    )
    return {"planned": {"T": at, "at": _iso(at), "seq": got.seq, "forced": forced}}


def arm(ops: CutoverOps, actor: Actor, *, force: bool = False) -> dict[str, Any]:
    """Make the latest plan live: {shadow off, bill_from T, authority edge}. Refuses without a plan, with a
    state the interlocks refuse (never overridable), and — unless forced — once T is not in the future
    (the cell has billed past T) or when a bucket at or after T has already closed (it would be a gap)."""
    now_ms = ops.clock_ms()
    entry = ops.ledger.latest_plan()
    if entry is None or not entry.bill_from:
        raise CutoverRefused(["no plan to arm: run `edgebill cutover plan --at T` first"])
    at = entry.bill_from
    state = armed_state(at, changed_at_ms=now_ms, by=actor.by, reason=actor.reason, command=actor.command)
    hard = interlock_problems(state, ops.bucket_seconds)
    if hard:
        raise CutoverRefused(hard)
    problems: list[str] = []
    if at <= now_ms // 1000:
        problems.append(
            f"T={at} ({_iso(at)}) is not in the future: the cell has billed past T, so the edge would bill "
            "those hours a second time"
        )
    closed = ops.ledger.decided_buckets(at_or_after=at)
    if closed:
        problems.append(
            f"{len(closed)} bucket(s) at or after T have closed already (first {_iso(closed[0][0])}): they stay "
            "decided as they are (gaps to release with `edgebill cutover release`)"
        )
    forced = _refuse_or_force(problems, force=force, actor=actor)
    got = ops.ledger.record_state(state, details={"plan_seq": entry.seq, "forced": forced})
    return {"armed": {"T": at, "at": _iso(at), "seq": got.seq, "forced": forced}, **publish_pending(ops)}


def rollback(ops: CutoverOps, at: int | None, actor: Actor, *, cancel_sent: bool = False) -> dict[str, Any]:
    """Hand Pro billing back to the cell from R (default: the start of the current bucket).

    The new state {authority cell, bill_from T, bill_until R, shadow off} is recorded; in the same ledger
    transaction the rows of buckets at or after R that the edge has not sent become ``skipped_rolled_back``
    and those buckets are decided so; buckets in [T, R) still ship. Rows already sent for buckets at or
    after R are listed; with ``cancel_sent``, those still inside Stripe's 24 h window are cancelled through
    meter-event adjustments (then recorded ``cancelled``), older ones are reported for a credit.
    """
    now_ms = ops.clock_ms()
    size = ops.bucket_seconds
    until = at if at is not None else bucket_start_s(now_ms // 1000, size)
    current = ops.ledger.effective_cutover(ops.bootstrap).state
    problems = rollback_problems(current, until, size)
    state = rolled_back_state(
        current, until, changed_at_ms=now_ms, by=actor.by, reason=actor.reason, command=actor.command
    )
    problems += interlock_problems(state, size)
    if problems:
        raise CutoverRefused(problems)
    got = ops.ledger.record_state(state)
    out: dict[str, Any] = {
        "rolled_back": {"R": until, "at": _iso(until), "seq": got.seq, "rows_skipped": got.rows_moved},
    }
    out.update(publish_pending(ops))
    sent = [_sent_row(r, now_ms) for r in ops.ledger.sent_rows_from(until)]
    out["sent_from_R"] = sent
    out["cancelled"], out["credit_needed"], out["cancel_errors"] = [], [], []
    if cancel_sent and sent:
        out.update(_cancel(ops, sent, actor, now_ms))
    else:
        out["credit_needed"] = [r for r in sent if not r["cancellable"]]
    return out


def _cancel(ops: CutoverOps, sent: list[dict[str, Any]], actor: Actor, now_ms: int) -> dict[str, Any]:
    if ops.cancel is None:
        raise CutoverRefused(["no Stripe client to cancel with"])
    cancelled: list[str] = []
    credit: list[dict[str, Any]] = [r for r in sent if not r["cancellable"]]
    errors: list[dict[str, Any]] = []
    for r in sent:
        if not r["cancellable"]:
            continue
        res = ops.cancel(r["meter"], r["id"])
        if res.cancelled:
            cancelled.append(r["id"])
        elif res.too_late:
            credit.append(r)
        else:
            errors.append({"id": r["id"], "error": res.error, "transient": res.transient})
    if cancelled:
        ops.ledger.record_cancelled(cancelled, "cancelled at Stripe (meter-event adjustment) by a rollback")
        ops.ledger.record_entry(
            KIND_CANCEL,
            _change_id("cancel", now_ms, *cancelled),
            by=actor.by,
            reason=actor.reason,
            command=actor.command,
            changed_ms=now_ms,
            details={"rows": cancelled, "credit_needed": [c["id"] for c in credit]},
        )
    return {"cancelled": cancelled, "credit_needed": credit, "cancel_errors": errors}


def release(ops: CutoverOps, bucket: int, actor: Actor) -> dict[str, Any]:
    """Release a gap (a bucket at or after T decided in shadow): its rows become billed, through the billed
    rounding carry; recorded with the reason (required)."""
    if not actor.reason.strip():
        raise CutoverRefused(["release needs a --reason (it is recorded)"])
    size = ops.bucket_seconds
    if bucket % size:
        raise CutoverRefused([f"{bucket} is not a bucket start (bucket size {size} s)"])
    now_ms = ops.clock_ms()
    got = ops.ledger.release_bucket(
        bucket,
        bucket_seconds=size,
        bootstrap=ops.bootstrap,
        change_id=_change_id("release", bucket),
        by=actor.by,
        reason=actor.reason,
        command=actor.command,
        changed_ms=now_ms,
    )
    return {"released": {"bucket": bucket, "at": _iso(bucket), "seq": got.seq, "rows": got.rows_moved}}
