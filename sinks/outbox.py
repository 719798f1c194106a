"""The outbox sender: drains sendable meter rows from the ledger into a meter-event sink.

It never runs inside a stream agent's event handling: the worker calls :meth:`OutboxSender.run_once`
from a timer (in a thread), and tests call it directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from models.billing import STRIPE_MAX_AGE_SECONDS, RowState
from sinks.base import Sink, Status
from sinks.ledger import Ledger, MeterRow
from sinks.stripe import MeterEvent

__all__ = ["OutboxSender", "SendReport"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SendReport:
    sent: int = 0
    duplicates: int = 0
    rejected: int = 0
    deferred: int = 0
    expired: int = 0
    retry_later: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def touched(self) -> int:
        return self.sent + self.duplicates + self.rejected + self.deferred + self.expired + self.retry_later


class OutboxSender:
    def __init__(
        self,
        ledger: Ledger,
        sink: Sink[MeterEvent],
        *,
        batch: int = 500,
        now_s: Callable[[], int],
    ) -> None:
        self._ledger = ledger
        self._sink = sink
        self._batch = batch
        self._now_s = now_s

    def run_once(self) -> SendReport:
        """Send one batch of sendable rows and record the outcomes.

        Order: (1) read sendable rows (pending, and deferred rows whose org now has a customer);
        (2) rows without a customer -> ``deferred_no_customer``; rows past Stripe's 35-day window ->
        ``expired`` (both recorded before any send); (3) send the rest through the sink (which retries
        transient failures); (4) record outcomes: delivered -> ``sent``, permanent -> ``rejected`` with
        Stripe's message, still transient -> stays ``pending`` with the error and attempt count.
        A crash after (3) and before (4) leaves delivered rows ``pending``: they are sent again with the
        same identifier and value, and Stripe's identifier dedup turns the repeat into a duplicate,
        which is recorded as ``sent``. Nothing is ever sent with a different value.
        """
        report = SendReport()
        rows = self._ledger.sendable(self._batch)
        if not rows:
            return report
        now = self._now_s()
        pre: list[tuple[str, RowState, str | None, str | None]] = []
        by_id: dict[str, MeterRow] = {}
        for row in rows:
            if row.bucket_end < now - STRIPE_MAX_AGE_SECONDS + 60:
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
            return report
        outcomes = self._sink.flush()
        done: list[tuple[str, RowState, str | None, str | None]] = []
        retry: list[tuple[str, RowState, str | None, str | None]] = []
        for o in outcomes:
            row = by_id[o.item.identifier]
            if o.status is Status.OK:
                done.append((row.id, RowState.SENT, o.item.customer, None))
                report.sent += 1
            elif o.status is Status.DUPLICATE:
                done.append((row.id, RowState.SENT, o.item.customer, f"duplicate at Stripe: {o.error}"))
                report.duplicates += 1
            elif o.status is Status.PERMANENT:
                done.append((row.id, RowState.REJECTED, o.item.customer, f"{o.code or 'error'}: {o.error}"))
                report.rejected += 1
                log.error("Stripe rejected %s permanently: %s", row.id, o.error)
            else:
                retry.append((row.id, RowState(row.state), None, o.error))
                report.retry_later += 1
                report.errors.append(o.error or "transient error")
        self._ledger.set_states(done, attempts=1)
        self._ledger.set_states(retry, attempts=1)
        if report.touched:
            log.info(
                "sent %d (+%d duplicates), rejected %d, deferred %d, expired %d, retry later %d",
                report.sent,
                report.duplicates,
                report.rejected,
                report.deferred,
                report.expired,
                report.retry_later,
            )
        return report
