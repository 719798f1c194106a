"""The v2 meter-event API: sessions, synchronous v2 meter events, the high-throughput stream (errors found
after the 202 become ``v1.billing.meter.error_report_triggered`` reports) and ``/v2/core/events``."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from infra.devkit.stripe_fake._base import locked
from infra.devkit.stripe_fake._errors import StripeError, no_such
from infra.devkit.stripe_fake._meters import MAX_IDENTIFIER_LEN, MeterEventInvalid, MetersMixin
from infra.devkit.stripe_fake._params import Params
from infra.devkit.stripe_fake._util import from_iso, iso

__all__ = ["MAX_STREAM_EVENTS", "SESSION_TTL_S", "MeterStreamMixin"]

Obj = dict[str, Any]

#: A v2 meter-event session token is valid for 15 minutes.
SESSION_TTL_S = 15 * 60
MAX_STREAM_EVENTS = 100


class MeterStreamMixin(MetersMixin):
    def _init_state(self) -> None:
        super()._init_state()
        self.error_reports: list[Obj] = []
        self.sessions: dict[str, Obj] = {}  # authentication_token -> session object
        self.lost_identifiers: dict[str, str] = {}  # identifier -> "dropped" | "rejected" (test helpers below)

    # -- v2: sessions, sync events, the stream ---------------------------------------------------------

    @locked
    def create_session(self) -> Obj:
        now = self.now()
        livemode = self.ctx().livemode
        token = self.ids("mes_tok_live_" if livemode else "mes_tok_test_", 48)
        session: Obj = {
            "id": self.ids("mes_"),
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": iso(now),
            "expires_at": iso(now + SESSION_TTL_S),
            "livemode": livemode,
        }
        self.sessions[token] = {**session, "_expires_ts": now + SESSION_TTL_S}
        return session

    @locked
    def session_status(self, token: str) -> str:
        """``valid``, ``expired`` or ``unknown`` for a stream authentication token."""
        session = self.sessions.get(token)
        if session is None:
            return "unknown"
        return "valid" if self.now() < float(session["_expires_ts"]) else "expired"

    @staticmethod
    def _v2_event_fields(raw: Any, index: int | None) -> tuple[str, dict[str, Any], str | None, str | None]:
        where = f"events[{index}]." if index is not None else ""
        if not isinstance(raw, dict):
            raise StripeError(
                400, f"{where or 'body'} must be an object.", code="parameter_invalid", param=where.rstrip(".") or None
            )
        unknown = set(raw) - {"event_name", "payload", "identifier", "timestamp"}
        if unknown:
            raise StripeError(400, f"Received unknown parameter: {where}{sorted(unknown)[0]}", code="parameter_unknown")
        event_name = raw.get("event_name")
        if not isinstance(event_name, str) or not event_name:
            raise StripeError(400, f"Missing required param: {where}event_name.", code="parameter_missing")
        payload = raw.get("payload")
        if not isinstance(payload, dict):
            raise StripeError(400, f"Missing required param: {where}payload.", code="parameter_missing")
        identifier = raw.get("identifier")
        if identifier is not None and (not isinstance(identifier, str) or len(identifier) > MAX_IDENTIFIER_LEN):
            raise StripeError(
                400, f"Invalid {where}identifier: must be a string of at most 100 characters.", code="parameter_invalid"
            )
        ts = raw.get("timestamp")
        if ts is not None and not isinstance(ts, str):
            raise StripeError(
                400, f"Invalid {where}timestamp: must be an ISO-8601 date-time string.", code="parameter_invalid"
            )
        return event_name, payload, identifier, ts

    def _v2_timestamp(self, ts: str | None, where: str) -> int:
        if ts is None:
            return self.now_s()
        try:
            return int(from_iso(ts))
        except ValueError:
            raise StripeError(
                400, f"Invalid {where}timestamp: {ts!r} is not an ISO-8601 date-time.", code="parameter_invalid"
            ) from None

    @locked
    def create_meter_event_v2(self, data: Obj) -> Obj:
        event_name, payload, identifier, ts = self._v2_event_fields(data, None)
        timestamp = self._v2_timestamp(ts, "")
        try:
            rec = self._validate_event(
                event_name=event_name,
                payload=payload,
                identifier=identifier,
                timestamp=timestamp,
                source="v2",
            )
        except MeterEventInvalid as exc:
            raise StripeError(400, exc.message, code=exc.code) from None
        if self._is_duplicate(rec):
            raise StripeError(400, f"An event already exists with identifier {rec.identifier}.")
        self.meter_events[rec.identifier] = rec
        return {
            "object": "v2.billing.meter_event",
            "created": iso(rec.received_at),
            "event_name": rec.event_name,
            "identifier": rec.identifier,
            "livemode": rec.livemode,
            "payload": dict(rec.payload),
            "timestamp": iso(rec.timestamp),
        }

    @locked
    def stream_meter_events(self, data: Obj) -> None:
        """Accept a stream batch. Shape errors are 400 now; event errors become error reports."""
        if set(data) - {"events"}:
            unknown = sorted(set(data) - {"events"})[0]
            raise StripeError(400, f"Received unknown parameter: {unknown}", code="parameter_unknown")
        events = data.get("events")
        if not isinstance(events, list) or not events:
            raise StripeError(400, "Missing required param: events.", code="parameter_missing")
        if len(events) > MAX_STREAM_EVENTS:
            raise StripeError(
                400,
                f"Too many events: at most {MAX_STREAM_EVENTS} events can be sent per request.",
                code="too_many_events",
                param="events",
            )
        parsed = []
        for i, raw in enumerate(events):
            event_name, payload, identifier, ts = self._v2_event_fields(raw, i)
            parsed.append((event_name, payload, identifier, self._v2_timestamp(ts, f"events[{i}].")))
        for event_name, payload, identifier, timestamp in parsed:
            ident = identifier or self.ids.uuid()
            try:
                rec = self._validate_event(
                    event_name=event_name,
                    payload=payload,
                    identifier=ident,
                    timestamp=timestamp,
                    source="v2_stream",
                )
            except MeterEventInvalid as exc:
                self._report_error(exc, ident)
                continue
            if not self._is_duplicate(rec):
                self.meter_events[rec.identifier] = rec

    def _report_error(self, exc: MeterEventInvalid, identifier: str) -> None:
        now = self.now()
        no_meter = exc.code == "no_meter"
        report: Obj = {
            "id": self.ids("evt_test_" if not self.ctx().livemode else "evt_", 40),
            "object": "v2.core.event",
            "created": iso(now),
            "data": {
                "developer_message_summary": "There is 1 invalid event",
                "reason": {
                    "error_count": 1,
                    "error_types": [
                        {
                            "code": exc.code,
                            "error_count": 1,
                            "sample_errors": [{"error_message": exc.message, "request": {"identifier": identifier}}],
                        }
                    ],
                },
                "validation_end": iso(now),
                "validation_start": iso(now),
            },
            "livemode": self.ctx().livemode,
            "type": "v1.billing.meter.no_meter_found" if no_meter else "v1.billing.meter.error_report_triggered",
        }
        # Stripe's schema: ``context`` and ``reason`` are left out when they do not apply (an asynchronous
        # validation has neither), and ``related_object`` (id, type, url) names the meter when there is one.
        if exc.meter is not None:
            report["related_object"] = {
                "id": exc.meter,
                "type": "billing.meter",
                "url": f"/v1/billing/meters/{exc.meter}",
            }
        self.error_reports.append(report)

    # -- test helpers: an accepted event lost after the 202 ------------------------------------------

    @locked
    def drop_meter_event(self, identifier: str) -> Obj:
        """Lose an accepted event without a trace (no error report): its value leaves every summary and invoice,
        and its identifier is free again (a re-send is accepted as a new event)."""
        rec = self.meter_events.pop(identifier, None)
        if rec is None:
            raise no_such("meter event", identifier)
        self.lost_identifiers[identifier] = "dropped"
        return {"identifier": identifier, "outcome": "dropped", "value": str(rec.value), "meter": rec.meter}

    @locked
    def reject_meter_event(self, identifier: str, code: str | None = None, message: str | None = None) -> Obj:
        """Refuse an accepted event afterwards, as the stream's asynchronous validation does: it leaves every
        summary and invoice, and a ``v1.billing.meter.error_report_triggered`` report names it."""
        rec = self.meter_events.pop(identifier, None)
        if rec is None:
            raise no_such("meter event", identifier)
        self.lost_identifiers[identifier] = "rejected"
        code = code or "meter_event_customer_not_found"
        message = message or f"No customer found with ID {rec.customer}."
        self._report_error(MeterEventInvalid(code, message, None, rec.meter), identifier)
        return {"identifier": identifier, "outcome": "rejected", "value": str(rec.value), "code": code}

    @locked
    def lost_identifier_list(self) -> dict[str, str]:
        return dict(self.lost_identifiers)

    @locked
    def list_v2_events(self, data: Obj) -> Obj:
        """``GET /v2/core/events``: newest first, filtered by ``object_id``, ``types`` and ``created``
        (``gt``/``gte``/``lt``/``lte``, ISO-8601), paged with ``next_page_url`` (``page`` carries the
        filters and the position, as Stripe's opaque page tokens do)."""
        p = Params(data, ("limit", "object_id", "types", "created", "page"))
        token = p.string("page")
        if token:
            try:
                state = orjson.loads(base64.urlsafe_b64decode(token.encode()))
                p = Params(state["q"], ("limit", "object_id", "types", "created"))
                offset = int(state["o"])
            except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
                raise StripeError(400, "Invalid page token.", param="page") from None
            query = dict(state["q"])
        else:
            offset = 0
            query = {k: v for k, v in data.items() if k != "page"}
        object_id = p.string("object_id")
        types = p.strings("types")
        limit = p.integer("limit") or 20
        if not 1 <= limit <= 100:
            raise StripeError(400, "Invalid limit: must be between 1 and 100.", param="limit")
        bounds = p.sub("created", ("gt", "gte", "lt", "lte"))
        window: dict[str, float] = {}
        if bounds is not None:
            for op in ("gt", "gte", "lt", "lte"):
                text = bounds.string(op)
                if text:
                    try:
                        window[op] = from_iso(text)
                    except ValueError:
                        raise StripeError(400, f"Invalid created[{op}]: {text!r}.", param=f"created[{op}]") from None

        def in_window(created: str) -> bool:
            t = from_iso(created)
            return (
                ("gt" not in window or t > window["gt"])
                and ("gte" not in window or t >= window["gte"])
                and ("lt" not in window or t < window["lt"])
                and ("lte" not in window or t <= window["lte"])
            )

        rows = [
            r
            for r in reversed(self.error_reports)
            if (object_id is None or (r.get("related_object") or {}).get("id") == object_id)
            and (not types or r["type"] in types)
            and in_window(r["created"])
        ]
        page = rows[offset : offset + limit]
        next_url = None
        if offset + limit < len(rows):
            nxt = base64.urlsafe_b64encode(orjson.dumps({"q": query, "o": offset + limit})).decode()
            next_url = f"/v2/core/events?page={nxt}"
        return {
            "data": [self.copy(r) for r in page],
            "next_page_url": next_url,
            "previous_page_url": None,
        }

    @locked
    def retrieve_v2_event(self, ident: str) -> Obj:
        for r in self.error_reports:
            if r["id"] == ident:
                return self.copy(r)
        raise no_such("event", ident)
