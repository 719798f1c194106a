"""The outbox sender: drains sendable meter rows from the ledger's outbox (:mod:`sinks.ledger.outbox`) into a
meter-event sink; run from a timer in a thread (:meth:`OutboxSender.run_once`), never in an agent.

With the v2 stream a row is ``sent`` on Stripe's 202, noted :data:`V2_ACCEPTED_NOTE`; the optional
``reconciler`` moves rows Stripe later refuses to ``rejected``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from models.billing import RowState
from models.stripe_window import expired_at_send
from sinks.base import Outcome, Sink, Status
from sinks.ledger import Ledger, MeterRow
from sinks.stripe.v1 import MeterEvent
from sinks.stripe.v2 import ACCEPTED_ASYNC

__all__ = ["DUPLICATE_NOTE", "V2_ACCEPTED_NOTE", "OutboxSender", "Reconciler", "SendReport"]

log = logging.getLogger(__name__)

#: ``last_error`` of a row the v2 stream accepted: billed unless Stripe's later validation refuses it.
V2_ACCEPTED_NOTE = "accepted by the v2 meter-event stream (202); Stripe validates it asynchronously"
#: How ``last_error`` of a row Stripe answered "already exists" begins: Stripe holds its identifier.
DUPLICATE_NOTE = "duplicate at Stripe"


class _Reconciled(Protocol):
    @property
    def rejected(self) -> int: ...


class Reconciler(Protocol):
    def run_once(self) -> _Reconciled: ...


@dataclass(slots=True)
class SendReport:
    sent: int = 0
    duplicates: int = 0
    rejected: int = 0
    deferred: int = 0
    expired: int = 0
    retry_later: int = 0
    accepted_async: int = 0  # of ``sent``: accepted by the v2 stream, validated later by Stripe
    rejected_async: int = 0  # rows moved from sent to rejected by the reconciler in this run
    errors: list[str] = field(default_factory=list)

    @property
    def touched(self) -> int:
        return (
            self.sent
            + self.duplicates
            + self.rejected
            + self.deferred
            + self.expired
            + self.retry_later
            + self.rejected_async
        )


class OutboxSender:
    def __init__(
        self,
        ledger: Ledger,
        sink: Sink[MeterEvent],
        *,
        batch: int = 500,
        now_s: Callable[[], int],
        reconciler: Reconciler | None = None,
        reconcile_every_s: float = 30.0,
        drain_s: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._ledger = ledger
        self._sink = sink
        self._batch = batch
        self._now_s = now_s
        self._reconciler = reconciler
        self._reconcile_every = reconcile_every_s
        self._drain_s = drain_s
        self._monotonic = monotonic
        self._next_reconcile: float | None = None
        self._on_close = list(on_close)

    def close(self) -> None:
        """Release what the sender was built with (the sink's threads, HTTP connections). Idempotent."""
        closers, self._on_close = self._on_close, []
        for fn in closers:
            fn()

    def run_once(self) -> SendReport:
        """Send one batch of sendable rows and record the outcomes; then reconcile, when due.

        With ``drain_s`` > 0, further batches follow while the last one was full, for up to ``drain_s``
        seconds (a backlog drains at the sink's speed, not one batch per timer tick). Per batch, in
        order: (1) read sendable rows (pending, and deferred rows whose org now has a customer);
        (2) rows without a customer -> ``deferred_no_customer``; rows past Stripe's 35-day window ->
        ``expired`` (both recorded before any send); (3) send the rest through the sink (which retries
        transient failures); (4) record outcomes: delivered -> ``sent`` (v2: with
        :data:`V2_ACCEPTED_NOTE`), permanent -> ``rejected`` with Stripe's message, still transient ->
        stays ``pending`` with the error and attempt count; (5) if a reconciler is set and due, apply
        Stripe's error reports (``sent`` -> ``rejected``).
        A crash after (3) and before (4) leaves delivered rows ``pending``: they are sent again with the
        same identifier and value, and Stripe's identifier dedup turns the repeat into a duplicate,
        which is recorded as ``sent``. Nothing is ever sent with a different value. A crash in (5)
        loses nothing: the reconciler's cursor moves in the same transaction as the rows.
        """
        report = SendReport()
        try:
            deadline = self._monotonic() + self._drain_s
            while self._send_batch(report) and self._monotonic() < deadline:
                pass  # a full batch and time left: there may be more
        finally:
            self._maybe_reconcile(report)
        if report.touched:
            log.info(
                "sent %d (+%d duplicates; %d accepted by the v2 stream), rejected %d (+%d after 202), "
                "deferred %d, expired %d, retry later %d",
                report.sent,
                report.duplicates,
                report.accepted_async,
                report.rejected,
                report.rejected_async,
                report.deferred,
                report.expired,
                report.retry_later,
            )
        return report

    def reconcile_now(self) -> int:
        """Run the reconciler at once (whatever its schedule); rows moved to ``rejected``."""
        if self._reconciler is None:
            return 0
        self._next_reconcile = self._monotonic() + self._reconcile_every
        return self._reconciler.run_once().rejected

    def _maybe_reconcile(self, report: SendReport) -> None:
        if self._reconciler is None:
            return
        now = self._monotonic()
        if self._next_reconcile is not None and now < self._next_reconcile:
            return
        try:
            report.rejected_async += self.reconcile_now()
        except Exception as exc:  # Stripe or the ledger failed: try again next cycle, keep sending
            self._next_reconcile = now  # due again next cycle
            log.warning("reconciling Stripe's error reports failed; will retry: %s", exc)
            report.errors.append(f"reconcile: {type(exc).__name__}: {exc}")

    def _send_batch(self, report: SendReport) -> bool:
        """One batch (steps 1-4 of :meth:`run_once`); True when it was full (more rows may wait)."""
        rows = self._ledger.sendable(self._batch)
        if not rows:
            return False
        full = len(rows) >= self._batch
        now = self._now_s()
        pre: list[tuple[str, RowState, str | None, str | None]] = []
        by_id: dict[str, MeterRow] = {}
        for row in rows:
            if expired_at_send(row.bucket_end, now):
                pre.append((row.id, RowState.EXPIRED, None, "bucket end is past Stripe's 35-day window"))
                report.expired += 1
            elif not row.stripe_customer_id:
                if row.state != RowState.DEFERRED_NO_CUSTOMER.value:
                    pre.append((row.id, RowState.DEFERRED_NO_CUSTOMER, None, "org has no Stripe customer yet"))
                    report.deferred += 1
            else:
                by_id[row.id] = row
                self._sink.add(
                    MeterEvent(
                        identifier=row.id,
                        event_name=row.meter,
                        customer=row.stripe_customer_id,
                        value=row.value,
                        timestamp=row.bucket_end,
                    )
                )
        self._ledger.set_states(pre)
        if not by_id:
            return full
        updates = self._outcomes(self._sink.flush(), by_id, report)
        self._ledger.set_states(updates, attempts=1)
        retried = any(state not in (RowState.SENT, RowState.REJECTED) for _, state, _, _ in updates)
        return full and not retried  # rows left transient wait for the next cycle

    def _outcomes(
        self, outcomes: list[Outcome[MeterEvent]], by_id: dict[str, MeterRow], report: SendReport
    ) -> list[tuple[str, RowState, str | None, str | None]]:
        """Row updates for the sink's outcomes (step 4), counted into ``report``."""
        updates: list[tuple[str, RowState, str | None, str | None]] = []
        for o in outcomes:
            row = by_id[o.item.identifier]
            if o.status is Status.OK:
                accepted_async = o.code == ACCEPTED_ASYNC
                note = V2_ACCEPTED_NOTE if accepted_async else None
                updates.append((row.id, RowState.SENT, o.item.customer, note))
                report.sent += 1
                report.accepted_async += accepted_async
            elif o.status is Status.DUPLICATE:
                updates.append((row.id, RowState.SENT, o.item.customer, f"{DUPLICATE_NOTE}: {o.error}"))
                report.duplicates += 1
            elif o.status is Status.PERMANENT:
                updates.append((row.id, RowState.REJECTED, o.item.customer, f"{o.code or 'error'}: {o.error}"))
                report.rejected += 1
                log.error("Stripe rejected %s permanently: %s", row.id, o.error)
            else:
                updates.append((row.id, RowState(row.state), None, o.error))
                report.retry_later += 1
                report.errors.append(o.error or "transient error")
        return updates
