"""Reading back what Stripe holds (meters, meter event summaries, invoice previews, v2 error reports) through
the official SDK, read-only, paced (:class:`Pacer`, ``reads_per_s``; a 429 halves the pace for the run).

Numbers are parsed as :class:`~decimal.Decimal`, never floats. Every read returns an :class:`Answer`: the
value or the :class:`Problem` that stopped it; nothing Stripe-specific leaves this module. Clock, sleep and
randomness are injected. Why these limits: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Generic, TypeVar

import stripe

from models.invoice_check import InvoiceLine
from models.reconcile import Grouping, MeterConfig
from sinks.base import READ_RETRY, RetryPolicy, Status
from sinks.stripe.errors import classify, observed
from sinks.stripe.v1 import RateLimiter
from sinks.stripe.v2 import ERROR_REPORT_TYPES

__all__ = [
    "DEFAULT_READS_PER_S",
    "STRIPE_READ_LIMITS",
    "Answer",
    "ErrorReportIds",
    "InvoicePreview",
    "Pacer",
    "Problem",
    "StripeReader",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Stripe's read limits (requests a second): per account in live and in test mode, and per endpoint.
STRIPE_READ_LIMITS: Mapping[str, int] = {"live": 100, "test": 25, "endpoint": 25}
#: The reconciliation's default pace: a fifth of the lowest limit that applies to its reads.
DEFAULT_READS_PER_S = 5.0
_PAGE = 100


class Problem(StrEnum):
    UNREACHABLE = "unreachable"  # no answer: connection refused, timed out, cut
    REFUSED_KEY = "refused_key"  # 401 / 403
    NOT_FOUND = "not_found"  # Stripe does not know the object (customer, meter, subscription)
    THROTTLED = "throttled"  # still 429 after every attempt
    ERROR = "error"  # any other refusal

    @property
    def fatal(self) -> bool:
        """Stripe cannot be read at all: nothing else in the run can succeed either."""
        return self in (Problem.UNREACHABLE, Problem.REFUSED_KEY, Problem.THROTTLED)


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    value: T | None = None
    problem: Problem | None = None
    detail: str = ""
    param: str | None = None  # which parameter Stripe named (e.g. ``customer`` for an unknown customer)

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True, slots=True)
class InvoicePreview:
    id: str
    customer: str
    subscription: str
    lines: tuple[InvoiceLine, ...]


@dataclass(slots=True)
class ErrorReportIds:
    """What Stripe's error reports say per identifier: refused (with the code), or held already (a duplicate)."""

    refused: dict[str, str] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)


class Pacer(RateLimiter):
    """At most ``per_s`` requests a second across threads, one slot every ``1/per_s`` s (the sender's
    :class:`~sinks.stripe.v1.RateLimiter`); :meth:`slow_down` halves the pace (down to an eighth of the
    configured one) until :meth:`reset`. ``kw``: the clock and sleep, as for the rate limiter."""

    def __init__(self, per_s: float, **kw: Any) -> None:
        if per_s <= 0:
            raise ValueError("per_s must be > 0")
        super().__init__(per_s, **kw)
        self._base = self._per_s = per_s

    @property
    def per_s(self) -> float:
        return self._per_s

    def reset(self) -> None:
        with self._lock:
            self._per_s = self._base
            self._interval = 1.0 / self._per_s

    def slow_down(self) -> None:
        with self._lock:
            self._per_s = max(self._base / 8, self._per_s / 2)
            self._interval = 1.0 / self._per_s


def _iso(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _text(obj: Any) -> str | None:
    """An id field that may be expanded (an object with ``id``) or not."""
    if isinstance(obj, Mapping):
        got = obj.get("id")
        return None if got is None else str(got)
    return None if obj is None else str(obj)


class StripeReader:
    """Paced, retried reads of what Stripe holds. One request at a time; thread-safe through the pacer."""

    def __init__(
        self,
        client: stripe.StripeClient,
        *,
        reads_per_s: float = DEFAULT_READS_PER_S,
        policy: RetryPolicy = READ_RETRY,
        connect_attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._pacer = Pacer(reads_per_s, clock=clock, sleep=sleep)
        self._policy = policy
        self._connect_attempts = max(1, connect_attempts)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.requests = 0
        self.throttled = 0

    @property
    def reads_per_s(self) -> float:
        return self._pacer.per_s

    def begin_run(self) -> None:
        """Start a run: the configured pace again, counters at zero."""
        self._pacer.reset()
        self.requests = 0
        self.throttled = 0

    # ------------------------------------------------------------------------------------------ requests

    def _call(self, method: str, path: str, params: Mapping[str, Any] | None = None) -> Answer[dict[str, Any]]:
        """One read, paced and retried; the JSON body with exact decimals, or the problem."""
        attempt = 0
        while True:
            attempt += 1
            self._pacer.acquire()
            self.requests += 1
            try:
                with observed():
                    resp = self._client.raw_request(method, path, **dict(params or {}))
                body: dict[str, Any] = json.loads(resp.body, parse_float=Decimal)
                return Answer(body)
            except stripe.StripeError as exc:
                problem, wait = self._judge(exc, attempt)
                message = _reason(exc)
                if problem is not None:
                    param = getattr(exc, "param", None)
                    return Answer(problem=problem, detail=message, param=None if param is None else str(param))
                log.debug("Stripe read %s %s: %s; retrying in %.2fs (attempt %d)", method, path, message, wait, attempt)
                self._sleep(wait)
            except ValueError as exc:  # not JSON
                return Answer(problem=Problem.ERROR, detail=f"Stripe's answer is not JSON: {exc}")

    def _judge(self, exc: stripe.StripeError, attempt: int) -> tuple[Problem | None, float]:
        """(the final problem, or None and how long to wait before the next attempt)."""
        status = exc.http_status or 0
        if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
            return Problem.REFUSED_KEY, 0.0
        code = (exc.code or "").lower()
        if isinstance(exc, stripe.InvalidRequestError) and (status == 404 or code == "resource_missing"):
            return Problem.NOT_FOUND, 0.0
        verdict = classify(exc, None, new_request_per_attempt=True)
        throttled = isinstance(exc, stripe.RateLimitError) or status == 429
        if throttled:
            self.throttled += 1
            self._pacer.slow_down()
        if verdict.status is not Status.TRANSIENT:
            return Problem.ERROR, 0.0
        if isinstance(exc, stripe.APIConnectionError):
            if attempt >= self._connect_attempts:
                return Problem.UNREACHABLE, 0.0
        elif not self._policy.again(attempt):
            return (Problem.THROTTLED if throttled else Problem.ERROR), 0.0
        return None, self._policy.wait(attempt, self._rng, verdict.retry_after)

    def _list(self, path: str, params: Mapping[str, Any]) -> Answer[list[dict[str, Any]]]:
        """Every object of a v1 list (``starting_after`` pages)."""
        out: list[dict[str, Any]] = []
        query = {**params, "limit": _PAGE}
        while True:
            got = self._call("get", path, query)
            if got.value is None:
                return Answer(problem=got.problem, detail=got.detail, param=got.param)
            data = got.value.get("data") or []
            out.extend(data)
            if not got.value.get("has_more") or not data:
                return Answer(out)
            query = {**query, "starting_after": data[-1]["id"]}

    # ------------------------------------------------------------------------------------------- reads

    def meters(self) -> Answer[list[MeterConfig]]:
        """Every billing meter of the account, active or not."""
        got = self._list("/v1/billing/meters", {})
        if got.value is None:
            return Answer(problem=got.problem, detail=got.detail)
        out = []
        for m in got.value:
            mapping = m.get("customer_mapping") or {}
            values = m.get("value_settings") or {}
            agg = m.get("default_aggregation") or {}
            transitions = m.get("status_transitions") or {}
            out.append(
                MeterConfig(
                    id=str(m["id"]),
                    event_name=str(m.get("event_name")),
                    status=str(m.get("status")),
                    customer_key=str(mapping.get("event_payload_key")),
                    customer_type=str(mapping.get("type")),
                    value_key=str(values.get("event_payload_key")),
                    formula=str(agg.get("formula")),
                    event_time_window=m.get("event_time_window") or None,
                    deactivated_at=transitions.get("deactivated_at"),
                )
            )
        return Answer(out)

    def summaries(
        self, meter_id: str, customer: str, start_s: int, end_s: int, grouping: Grouping
    ) -> Answer[dict[int, Decimal]]:
        """Stripe's value per window ``[start, end)`` for (meter, customer): window start -> exact value.

        ``start_s`` and ``end_s`` must be aligned to ``grouping`` (see :func:`models.reconcile.aligned_range`).
        An unknown customer is ``NOT_FOUND`` with ``param == "customer"``.
        """
        got = self._list(
            f"/v1/billing/meters/{meter_id}/event_summaries",
            {
                "customer": customer,
                "start_time": start_s,
                "end_time": end_s,
                "value_grouping_window": grouping.value,
            },
        )
        if got.value is None:
            return Answer(problem=got.problem, detail=got.detail, param=got.param)
        out: dict[int, Decimal] = {}
        for s in got.value:
            value = s.get("aggregated_value")
            out[int(s["start_time"])] = value if isinstance(value, Decimal) else Decimal(str(value or 0))
        return Answer(out)

    def invoice_preview(self, subscription: str) -> Answer[InvoicePreview]:
        """The upcoming invoice of ``subscription`` (``POST /v1/invoices/create_preview``): its usage lines."""
        got = self._call("post", "/v1/invoices/create_preview", {"subscription": subscription})
        if got.value is None:
            return Answer(problem=got.problem, detail=got.detail, param=got.param)
        inv = got.value
        lines_obj = inv.get("lines") or {}
        raw = list(lines_obj.get("data") or [])
        url = lines_obj.get("url")
        more = bool(lines_obj.get("has_more"))
        while more and url and raw:
            page = self._call("get", str(url), {"limit": _PAGE, "starting_after": raw[-1]["id"]})
            if page.value is None:
                return Answer(problem=page.problem, detail=page.detail)
            data = page.value.get("data") or []
            raw.extend(data)
            more = bool(page.value.get("has_more")) and bool(data)
        lines = []
        for line in raw:
            pricing = line.get("pricing") or {}
            price = _text((pricing.get("price_details") or {}).get("price")) or _text(line.get("price"))
            if price is None:
                continue  # not a price-based line (an invoice item without a price, a tax line)
            qd = line.get("quantity_decimal")
            quantity = Decimal(str(qd)) if qd is not None else Decimal(str(line.get("quantity") or 0))
            parent = line.get("parent") or {}
            period = line.get("period") or {}
            lines.append(
                InvoiceLine(
                    price_id=price,
                    quantity=quantity,
                    period_start=int(period.get("start") or 0),
                    period_end=int(period.get("end") or 0),
                    subscription_item=_text((parent.get("subscription_item_details") or {}).get("subscription_item")),
                )
            )
        return Answer(
            InvoicePreview(
                id=str(inv.get("id")),
                customer=_text(inv.get("customer")) or "",
                subscription=subscription,
                lines=tuple(lines),
            )
        )

    def error_reports(self, since_s: float) -> Answer[ErrorReportIds]:
        """The identifiers Stripe's v2 meter error reports since ``since_s`` name: refused, or held already."""
        out = ErrorReportIds()
        got = self._call(
            "get",
            "/v2/core/events",
            {"types": list(ERROR_REPORT_TYPES), "created": {"gte": _iso(since_s)}, "limit": 100},
        )
        while True:
            if got.value is None:
                return Answer(problem=got.problem, detail=got.detail)
            for ev in got.value.get("data") or []:
                _read_report(ev, out)
            nxt = got.value.get("next_page_url")
            if not nxt:
                return Answer(out)
            got = self._call("get", str(nxt))


def _reason(exc: stripe.StripeError) -> str:
    """Stripe's message in one line; for a failed connection, the cause inside the SDK's text."""
    text = getattr(exc, "user_message", None) or str(exc) or type(exc).__name__
    if isinstance(exc, stripe.APIConnectionError):
        full = str(exc)
        m = re.search(r"\[Errno -?\d+\] ([^\"')]+)", full)
        if m:
            return m.group(1).strip()
        if "timed out" in full.lower() or "timeout" in full.lower():
            return "no answer in time"
        _, _, rest = full.partition("Network error: ")
        text = rest or full
    line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return line[:200]


def _read_report(ev: Mapping[str, Any], out: ErrorReportIds) -> None:
    if ev.get("type") not in ERROR_REPORT_TYPES:
        return
    data = ev.get("data") or {}
    reason = (data.get("reason") or {}) if isinstance(data, Mapping) else {}
    for etype in reason.get("error_types") or []:
        code = str(etype.get("code") or "unknown_error")
        for sample in etype.get("sample_errors") or []:
            ident = (sample.get("request") or {}).get("identifier")
            if not ident:
                continue
            if "duplicate" in code.lower():
                out.held.add(str(ident))
            else:
                out.refused[str(ident)] = code
