"""The v2 meter-event stream sink, its session, and the reconciliation of Stripe's error reports.

:class:`StripeStreamSink` sends at most 100 events a request with a session token
(:class:`MeterEventSessions`, renewed before expiry and once on a 401). Every event is validated first
(refused: ``permanent``, never sent); an accepted one is ``ok`` with code :data:`ACCEPTED_ASYNC`; a request
refused whole is split in halves to isolate the bad event; transient failures are ``transient`` for every
event of the request. :class:`ErrorReportReconciler` moves rows Stripe later refuses to ``rejected``. Why:
docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import stripe

from models.catalog import METER_CUSTOMER_KEY, METER_VALUE_KEY
from sinks.base import KeptThreads, Outcome, Status
from sinks.stripe.errors import classify, observed
from sinks.stripe.v1 import MeterEvent, validate_event

if TYPE_CHECKING:
    from stripe.params.v2.billing import MeterEventStreamCreateParams, MeterEventStreamCreateParamsEvent
    from stripe.params.v2.core import EventListParams

    from sinks.ledger import Ledger

__all__ = [
    "ACCEPTED_ASYNC",
    "ASYNC_REJECTION_NOTE",
    "ERROR_REPORT_CURSOR",
    "ERROR_REPORT_TYPES",
    "MAX_STREAM_EVENTS",
    "AsyncRejection",
    "ErrorReportReconciler",
    "ErrorReports",
    "MeterEventSessions",
    "ReconcileReport",
    "StripeStreamSink",
    "iso_timestamp",
    "read_error_reports",
]

log = logging.getLogger(__name__)

#: Outcome code of an event the v2 stream accepted (202): delivered, validated later by Stripe.
ACCEPTED_ASYNC = "accepted_async"
#: The stream takes at most this many events per request.
MAX_STREAM_EVENTS = 100
#: A meter-event session token is valid this long (Stripe: 15 minutes), unless the session says otherwise.
DEFAULT_SESSION_TTL_S = 15 * 60
#: The v2 event types through which Stripe reports meter events it refused after a 202.
ERROR_REPORT_TYPES: tuple[str, ...] = (
    "v1.billing.meter.error_report_triggered",
    "v1.billing.meter.no_meter_found",
)
#: How ``last_error`` of a row Stripe refused after accepting it begins (then ``(<code>): <message>``).
ASYNC_REJECTION_NOTE = "rejected by Stripe after 202"
#: Ledger cursor (``counters`` row): ``created`` of the newest error report read, unix ms.
ERROR_REPORT_CURSOR = "stripe.v2.error_reports_cursor_ms"


def iso_timestamp(ts: float) -> str:
    """Stripe v2 timestamp text for unix seconds ``ts``: ``2026-06-15T23:00:00.000Z``."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_seconds(ts: int) -> str:
    """:func:`iso_timestamp` for whole seconds, cached: meter events share their bucket-end timestamps."""
    return iso_timestamp(ts)


def _parse_iso(text: str) -> float:
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


class MeterEventSessions:
    """The current meter-event session token, created on first use and renewed before it expires.

    The deadline is measured on the local clock ``now`` from just before the session was created,
    with the session's own lifetime (``expires_at - created``), so a skew between our clock and
    Stripe's does not matter. ``refresh(stale)`` renews only if ``stale`` is still the current token:
    many threads hitting the same expiry create one new session, not one each. Thread-safe.
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        *,
        margin_s: float = 60.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._margin = max(0.0, margin_s)
        self._now = now
        self._lock = threading.Lock()
        self._token: str | None = None
        self._deadline = 0.0
        self.created = 0  # sessions created so far

    def token(self) -> str:
        with self._lock:
            if self._token is None or self._now() >= self._deadline:
                return self._create()
            return self._token

    def refresh(self, stale: str) -> str:
        with self._lock:
            if self._token is None or self._token == stale:
                return self._create()
            return self._token

    def _create(self) -> str:
        t0 = self._now()
        session = self._client.v2.billing.meter_event_session.create()
        try:
            ttl = _parse_iso(session.expires_at) - _parse_iso(session.created)
        except (AttributeError, TypeError, ValueError):
            ttl = DEFAULT_SESSION_TTL_S
        if ttl <= 0:
            ttl = DEFAULT_SESSION_TTL_S
        self._token = str(session.authentication_token)
        self._deadline = t0 + ttl - min(self._margin, ttl / 2)
        self.created += 1
        log.info("new Stripe meter-event session (valid %.0fs, renewed after %.0fs)", ttl, self._deadline - t0)
        return self._token


class _JsonBodyList(list[Any]):
    """The ``events`` list, marked (``id``) so the SDK does not also form-encode it for a debug line (about 5 ms
    of CPU per 100 events); the JSON body is unchanged. Why it is safe: docs/architecture.md, "Module notes".
    """

    id = "(events: sent as JSON)"


def _session_rejected(exc: stripe.StripeError) -> bool:
    """A 401 from the stream: the session expired (or is unknown to Stripe); a new one may fix it."""
    return isinstance(exc, stripe.TemporarySessionExpiredError) or exc.http_status == 401


class StripeStreamSink:
    """v2 ``POST /v2/billing/meter_event_stream`` sink: ≤ 100 events a request, requests in parallel.

    At most ``concurrency`` requests are in flight across every flush and thread using the sink.
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        *,
        concurrency: int = 8,
        events_per_request: int = MAX_STREAM_EVENTS,
        sessions: MeterEventSessions | None = None,
        session_margin_s: float = 60.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 1 <= events_per_request <= MAX_STREAM_EVENTS:
            raise ValueError(f"events_per_request must be within 1..{MAX_STREAM_EVENTS}")
        self._client = client
        self._concurrency = concurrency
        self._per_request = events_per_request
        self._sessions = sessions or MeterEventSessions(client, margin_s=session_margin_s)
        self._now = now
        self._slots = threading.BoundedSemaphore(concurrency)
        self._buffer: list[MeterEvent] = []
        self._threads = KeptThreads(self._concurrency, "stripe-v2")

    @property
    def sessions(self) -> MeterEventSessions:
        return self._sessions

    def add(self, item: MeterEvent) -> None:
        self._buffer.append(item)

    @staticmethod
    def _wire(ev: MeterEvent) -> MeterEventStreamCreateParamsEvent:
        return {
            "event_name": ev.event_name,
            "identifier": ev.identifier,
            "timestamp": _iso_seconds(ev.timestamp),
            "payload": {METER_CUSTOMER_KEY: ev.customer, METER_VALUE_KEY: ev.value},
        }

    def _post(self, params: MeterEventStreamCreateParams) -> None:
        """One stream request; on a 401 a new session and one more try."""
        token = self._sessions.token()
        try:
            with self._slots, observed():
                self._client.v2.billing.meter_event_stream.create(params, {"api_key": token})
        except stripe.StripeError as exc:
            if not _session_rejected(exc):
                raise
            log.info("meter-event session refused (%s); renewing it and sending again", exc.code or exc.http_status)
            token = self._sessions.refresh(token)
            with self._slots, observed():
                self._client.v2.billing.meter_event_stream.create(params, {"api_key": token})

    def _send_chunk(self, chunk: list[MeterEvent]) -> list[Outcome[MeterEvent]]:
        try:
            self._post({"events": _JsonBodyList(self._wire(ev) for ev in chunk)})
        except Exception as exc:  # every failure is classified, none escapes
            failed = classify(exc, chunk[0], new_request_per_attempt=True)
            if failed.status is not Status.TRANSIENT and len(chunk) > 1:
                log.warning(
                    "the meter-event stream refused a request of %d events (%s: %s); splitting it",
                    len(chunk),
                    failed.code,
                    failed.error,
                )
                mid = len(chunk) // 2
                return self._send_chunk(chunk[:mid]) + self._send_chunk(chunk[mid:])
            return [replace(failed, item=ev) for ev in chunk]
        return [Outcome(ev, Status.OK, None, ACCEPTED_ASYNC) for ev in chunk]

    def flush(self) -> list[Outcome[MeterEvent]]:
        """Send everything buffered; one outcome per event, in no particular order.

        Order of side effects: the buffer is emptied first (always); events failing pre-send
        validation get a permanent outcome and are never sent; the rest go out in requests of ≤ 100,
        up to ``concurrency`` at once. A crash part-way leaves the rows of unanswered events
        ``pending`` in the caller's ledger: they are sent again next cycle, and Stripe's identifier
        dedup absorbs the ones it had already received.
        """
        todo, self._buffer = self._buffer, []
        if not todo:
            return []
        now_s = int(self._now())
        out: list[Outcome[MeterEvent]] = []
        ready: list[MeterEvent] = []
        for ev in todo:
            problem = validate_event(ev, now_s)
            if problem:
                out.append(Outcome(ev, Status.PERMANENT, f"not sent: {problem}", "edgebill_presend_validation"))
            else:
                ready.append(ev)
        chunks = [ready[i : i + self._per_request] for i in range(0, len(ready), self._per_request)]
        if len(chunks) <= 1 or self._concurrency == 1:
            for chunk in chunks:
                out.extend(self._send_chunk(chunk))
            return out
        for outs in self._threads.get().map(self._send_chunk, chunks):
            out.extend(outs)
        return out

    def close(self) -> None:
        """Stop the worker threads (waiting for requests in flight). Idempotent."""
        self._threads.close()


# -- error reports -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AsyncRejection:
    """One meter event Stripe refused after the stream accepted it."""

    identifier: str
    code: str
    message: str
    event_id: str

    @property
    def error(self) -> str:
        return f"{ASYNC_REJECTION_NOTE} ({self.code}): {self.message} [report {self.event_id}]"


@dataclass(slots=True)
class ErrorReports:
    """What a batch of error-report events says, per identifier."""

    rejections: dict[str, AsyncRejection] = field(default_factory=dict)
    events: int = 0
    #: errors Stripe counted but named no identifier for (reports carry *sample* errors)
    unattributed: int = 0
    #: errors about duplicate identifiers: the first copy was billed, the row stays ``sent``
    duplicates: int = 0
    newest_ms: int | None = None


def _is_duplicate_code(code: str) -> bool:
    return "duplicate" in code.lower()


def read_error_reports(events: Iterable[Mapping[str, Any]], *, count_after_ms: int | None = None) -> ErrorReports:
    """Reduce v2 error-report events (as dicts) to the identifiers Stripe refused and why.

    Only the sample errors name identifiers; ``error_count`` beyond them is counted as unattributed
    (for events created after ``count_after_ms``, so a re-read report is not counted twice). Duplicate-
    identifier errors are not rejections: Stripe kept the first copy.
    """
    out = ErrorReports()
    for ev in events:
        if ev.get("type") not in ERROR_REPORT_TYPES:
            continue
        out.events += 1
        event_id = str(ev.get("id") or "")
        try:
            created_ms = int(_parse_iso(str(ev.get("created"))) * 1000)
        except ValueError:
            created_ms = None
        if created_ms is not None and (out.newest_ms is None or created_ms > out.newest_ms):
            out.newest_ms = created_ms
        fresh = count_after_ms is None or created_ms is None or created_ms > count_after_ms
        data = ev.get("data") or {}
        reason = (data.get("reason") or {}) if isinstance(data, Mapping) else {}
        for etype in reason.get("error_types") or []:
            code = str(etype.get("code") or "unknown_error")
            samples = etype.get("sample_errors") or []
            named = 0
            for sample in samples:
                request = sample.get("request") or {}
                ident = request.get("identifier")
                if not ident:
                    continue
                named += 1
                if _is_duplicate_code(code):
                    continue
                out.rejections[str(ident)] = AsyncRejection(
                    str(ident), code, str(sample.get("error_message") or code), event_id
                )
            total = int(etype.get("error_count") or named)
            if fresh and _is_duplicate_code(code):
                out.duplicates += total
            elif fresh and total > named:
                out.unattributed += total - named
    return out


@dataclass(slots=True)
class ReconcileReport:
    events: int = 0  # error-report events read
    named: int = 0  # identifiers named as refused
    rejected: int = 0  # rows moved to ``rejected`` by this run
    unattributed: int = 0  # refused events Stripe did not name (see ErrorReports)
    duplicates: int = 0
    rejected_ids: list[str] = field(default_factory=list)


class ErrorReportReconciler:
    """Reads Stripe's meter error reports and rejects the ledger rows they name.

    Each run lists error-report events created since the ledger's cursor minus ``overlap_s`` (reports
    can become visible after later ones; re-reading one is harmless), or since ``initial_lookback_s``
    ago on the first run (Stripe keeps v2 events 30 days).
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        ledger: Ledger,
        *,
        now: Callable[[], float] = time.time,
        overlap_s: float = 600.0,
        initial_lookback_s: float = 30 * 86_400,
        page_size: int = 20,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._now = now
        self._overlap = overlap_s
        self._initial = initial_lookback_s
        self._page_size = page_size

    def run_once(self) -> ReconcileReport:
        """One reconciliation pass.

        Order: (1) read the cursor; (2) list error-report events since it (all pages); (3) in one
        ledger transaction, move the named rows to ``rejected`` and advance the cursor to the newest
        report read. A crash before (3) commits writes nothing and the next pass reads the same
        reports again; rows already rejected are not touched twice.
        """
        cursor = self._ledger.stripe_cursor(ERROR_REPORT_CURSOR)
        since = cursor / 1000 - self._overlap if cursor is not None else self._now() - self._initial
        params: EventListParams = {
            "types": list(ERROR_REPORT_TYPES),
            "created": {"gte": iso_timestamp(since)},
            "limit": self._page_size,
        }
        page = self._client.v2.core.events.list(params)
        docs = [ev.to_dict() for ev in page.auto_paging_iter()]
        reports = read_error_reports(docs, count_after_ms=cursor)
        report = ReconcileReport(
            events=reports.events,
            named=len(reports.rejections),
            unattributed=reports.unattributed,
            duplicates=reports.duplicates,
        )
        if not reports.events:
            return report
        moved = self._ledger.reject_after_send(
            [(r.identifier, r.error) for r in reports.rejections.values()],
            cursor=(ERROR_REPORT_CURSOR, reports.newest_ms) if reports.newest_ms is not None else None,
        )
        report.rejected = len(moved)
        report.rejected_ids = moved
        for ident in moved:
            r = reports.rejections[ident]
            log.error("Stripe refused %s after accepting it: %s: %s", ident, r.code, r.message)
        if reports.unattributed:
            log.error(
                "Stripe reported %d refused meter event(s) without naming them (error reports carry samples "
                "only); compare Stripe's meter summaries with the ledger",
                reports.unattributed,
            )
        return report
