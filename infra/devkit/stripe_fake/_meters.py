"""Billing meters, v1 meter events, meter event summaries and adjustments (v1 and v2), and the inspection
of accepted events. Meter-event validation lives here too; the v2 stream (:mod:`._meter_stream`) shares it."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

from infra.devkit.stripe_fake._base import locked
from infra.devkit.stripe_fake._customers import CustomersMixin
from infra.devkit.stripe_fake._errors import StripeError
from infra.devkit.stripe_fake._params import Params
from infra.devkit.stripe_fake._util import (
    MAX_SIGNIFICANT_DIGITS,
    iso,
    parse_meter_value,
    significant_digits,
)

__all__ = ["MeterEventInvalid", "MeterEventRecord", "MetersMixin"]

Obj = dict[str, Any]

#: Stripe accepts meter-event timestamps within the past 35 calendar days and up to 5 minutes ahead.
MAX_PAST_S = 35 * 86400
MAX_FUTURE_S = 300
#: Identifiers are unique for (at least) 24 h at Stripe; here, for the life of the state.
MAX_IDENTIFIER_LEN = 100
#: A cancellation adjustment must arrive within 24 h of Stripe receiving the event.
CANCEL_WINDOW_S = 86400


@dataclass
class MeterEventRecord:
    """One accepted meter event (what the fake's inspection endpoints report)."""

    identifier: str
    event_name: str
    meter: str
    customer: str
    value: Decimal
    timestamp: int
    received_at: float
    payload: dict[str, str]
    livemode: bool
    source: str  # "v1" | "v2" | "v2_stream"
    cancelled_at: float | None = None

    def as_dict(self) -> Obj:
        out = asdict(self)
        out["value"] = str(self.value)
        return out


class MeterEventInvalid(Exception):
    """A meter event failed validation: synchronously a 400, asynchronously an error report."""

    def __init__(self, code: str, message: str, param: str | None, meter: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.meter = meter


class MetersMixin(CustomersMixin):
    def _init_state(self) -> None:
        super()._init_state()
        self.meters: dict[str, Obj] = {}
        self.meter_events: dict[str, MeterEventRecord] = {}
        self.duplicate_attempts: list[Obj] = []
        self.adjustments: list[Obj] = []
        # Every meter event that arrived with an identifier, valid or not: identifier -> the values it carried.
        self.receipts: dict[str, list[str]] = {}

    # -- meters ------------------------------------------------------------------------------------

    def _active_meter_for(self, event_name: str) -> Obj | None:
        for meter in self.meters.values():
            if meter["event_name"] == event_name and meter["status"] == "active":
                return meter
        return None

    @locked
    def create_meter(self, data: Obj) -> Obj:
        p = Params(
            data,
            (
                "display_name",
                "event_name",
                "default_aggregation",
                "customer_mapping",
                "value_settings",
                "event_time_window",
            ),
        )
        display_name = p.req_str("display_name", max_len=250)
        event_name = p.req_str("event_name", max_len=100)
        agg = p.sub("default_aggregation", ("formula",), required=True)
        assert agg is not None
        formula = agg.enum("formula", ("sum", "count", "last"), required=True)
        mapping = p.sub("customer_mapping", ("event_payload_key", "type"))
        customer_key = "stripe_customer_id"
        if mapping is not None:
            customer_key = mapping.req_str("event_payload_key", max_len=100)
            mapping.enum("type", ("by_id",), required=True)
        values = p.sub("value_settings", ("event_payload_key",))
        value_key = values.req_str("event_payload_key", max_len=100) if values is not None else "value"
        window = p.enum("event_time_window", ("day", "hour"))
        if self._active_meter_for(event_name) is not None:
            raise StripeError(
                400,
                f"An active meter with event_name `{event_name}` already exists.",
                param="event_name",
            )
        now = self.now_s()
        ctx = self.ctx()
        meter: Obj = {
            "id": self.ids("mtr_test_" if not ctx.livemode else "mtr_", 28),
            "object": "billing.meter",
            "created": now,
            "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
            "default_aggregation": {"formula": formula},
            "display_name": display_name,
            "event_name": event_name,
            "event_time_window": window,
            "livemode": ctx.livemode,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": now,
            "value_settings": {"event_payload_key": value_key},
        }
        self.meters[meter["id"]] = meter
        self.emit("billing.meter.created", meter)
        return self.copy(meter)

    @locked
    def retrieve_meter(self, ident: str) -> Obj:
        return self.copy(self.get_or_404(self.meters, ident, "billing.meter"))

    @locked
    def update_meter(self, ident: str, data: Obj) -> Obj:
        meter = self.get_or_404(self.meters, ident, "billing.meter")
        p = Params(data, ("display_name",))
        name = p.string("display_name", max_len=250)
        if name:
            meter["display_name"] = name
            meter["updated"] = self.now_s()
        return self.copy(meter)

    @locked
    def set_meter_active(self, ident: str, active: bool) -> Obj:
        meter = self.get_or_404(self.meters, ident, "billing.meter")
        if active and meter["status"] != "active":
            if self._active_meter_for(meter["event_name"]) is not None:
                raise StripeError(
                    400,
                    f"An active meter with event_name `{meter['event_name']}` already exists.",
                    param="event_name",
                )
            meter["status"] = "active"
            meter["status_transitions"]["deactivated_at"] = None
        elif not active and meter["status"] == "active":
            meter["status"] = "inactive"
            meter["status_transitions"]["deactivated_at"] = self.now_s()
        meter["updated"] = self.now_s()
        return self.copy(meter)

    @locked
    def list_meters(self, data: Obj) -> Obj:
        p = Params(data, ("limit", "starting_after", "ending_before", "status"))
        status = p.enum("status", ("active", "inactive"))
        rows = [m for m in reversed(self.meters.values()) if status is None or m["status"] == status]
        return self.paginate(rows, p, "/v1/billing/meters")

    # -- meter-event validation (shared by v1, v2 sync and the v2 stream) ---------------------------

    def _validate_event(
        self,
        *,
        event_name: str,
        payload: dict[str, Any],
        identifier: str | None,
        timestamp: int,
        source: str,
    ) -> MeterEventRecord:
        if identifier:
            self.receipts.setdefault(identifier, []).append(str(payload.get("value")))
        meter = self._active_meter_for(event_name)
        if meter is None:
            archived = any(m["event_name"] == event_name for m in self.meters.values())
            if archived:
                raise MeterEventInvalid(
                    "archived_meter",
                    f'No active meter found for event name "{event_name}".',
                    "event_name",
                    next(m["id"] for m in self.meters.values() if m["event_name"] == event_name),
                )
            raise MeterEventInvalid("no_meter", f'No active meter found for event name "{event_name}".', "event_name")
        mid = meter["id"]
        now = self.now_s()
        if timestamp < now - MAX_PAST_S:
            raise MeterEventInvalid(
                "timestamp_too_far_in_past",
                "The event timestamp cannot be more than 35 days in past. "
                f"Expected a timestamp greater than or equal to {now - MAX_PAST_S}.",
                "timestamp",
                mid,
            )
        if timestamp > now + MAX_FUTURE_S:
            raise MeterEventInvalid(
                "timestamp_in_future",
                "The event timestamp cannot be more than 5 minutes in future. "
                f"Expected a timestamp less than or equal to {now + MAX_FUTURE_S}.",
                "timestamp",
                mid,
            )
        ckey = meter["customer_mapping"]["event_payload_key"]
        customer = payload.get(ckey)
        if customer is None or customer == "":
            raise MeterEventInvalid(
                "meter_event_no_customer_defined",
                f"Customer mapping key {ckey} not found in payload.",
                f"payload[{ckey}]",
                mid,
            )
        if not isinstance(customer, str) or not self.customer_exists(customer):
            raise MeterEventInvalid(
                "meter_event_customer_not_found",
                f"No customer found with ID {customer}.",
                f"payload[{ckey}]",
                mid,
            )
        vkey = meter["value_settings"]["event_payload_key"]
        raw_value = payload.get(vkey)
        if raw_value is None or raw_value == "":
            raise MeterEventInvalid(
                "meter_event_value_not_found",
                f"Value key {vkey} not found in payload.",
                f"payload[{vkey}]",
                mid,
            )
        value = parse_meter_value(str(raw_value)) if isinstance(raw_value, str | int) else None
        if value is None:
            raise MeterEventInvalid(
                "meter_event_invalid_value",
                f"The value in the event payload must be a number. Received {raw_value}.",
                f"payload[{vkey}]",
                mid,
            )
        if significant_digits(value) > MAX_SIGNIFICANT_DIGITS:
            raise MeterEventInvalid(
                "meter_event_value_too_many_digits",
                f"The value in the event payload can have at most {MAX_SIGNIFICANT_DIGITS} digits. "
                f"Received {raw_value}.",
                f"payload[{vkey}]",
                mid,
            )
        return MeterEventRecord(
            identifier=identifier or self.ids.uuid(),
            event_name=event_name,
            meter=mid,
            customer=customer,
            value=value,
            timestamp=timestamp,
            received_at=self.now(),
            payload={str(k): str(v) for k, v in payload.items()},
            livemode=self.ctx().livemode,
            source=source,
        )

    def _is_duplicate(self, rec: MeterEventRecord) -> bool:
        prior = self.meter_events.get(rec.identifier)
        if prior is None:
            return False
        self.duplicate_attempts.append(
            {
                "identifier": rec.identifier,
                "event_name": rec.event_name,
                "customer": rec.customer,
                "value": str(rec.value),
                "first_value": str(prior.value),
                "same_value": rec.value == prior.value and rec.customer == prior.customer,
                "timestamp": rec.timestamp,
                "received_at": rec.received_at,
                "source": rec.source,
            }
        )
        return True

    # -- v1 meter events ---------------------------------------------------------------------------

    @locked
    def create_meter_event_v1(self, data: Obj) -> Obj:
        p = Params(data, ("event_name", "payload", "identifier", "timestamp"))
        event_name = p.req_str("event_name", max_len=100)
        payload = p.sub("payload", required=True)
        assert payload is not None
        identifier = p.string("identifier", max_len=MAX_IDENTIFIER_LEN)
        timestamp = p.integer("timestamp")
        try:
            rec = self._validate_event(
                event_name=event_name,
                payload=dict(payload.data),
                identifier=identifier or None,
                timestamp=self.now_s() if timestamp is None else timestamp,
                source="v1",
            )
        except MeterEventInvalid as exc:
            raise StripeError(400, exc.message, param=exc.param) from None
        if self._is_duplicate(rec):
            raise StripeError(
                400,
                f"An event already exists with identifier {rec.identifier}.",
                headers={"Stripe-Should-Retry": "false"},
            )
        self.meter_events[rec.identifier] = rec
        return {
            "object": "billing.meter_event",
            "created": int(rec.received_at),
            "event_name": rec.event_name,
            "identifier": rec.identifier,
            "livemode": rec.livemode,
            "payload": dict(rec.payload),
            "timestamp": rec.timestamp,
        }

    # -- summaries ---------------------------------------------------------------------------------

    def _aggregate(self, meter: Obj, events: list[MeterEventRecord]) -> Decimal:
        formula = meter["default_aggregation"]["formula"]
        if formula == "count":
            return Decimal(len(events))
        if formula == "last":
            if not events:
                return Decimal(0)
            return max(events, key=lambda e: (e.timestamp, e.received_at)).value
        return sum((e.value for e in events), Decimal(0))

    @locked
    def list_event_summaries(self, meter_id: str, data: Obj) -> Obj:
        meter = self.get_or_404(self.meters, meter_id, "billing.meter")
        p = Params(
            data,
            (
                "customer",
                "start_time",
                "end_time",
                "value_grouping_window",
                "limit",
                "starting_after",
                "ending_before",
            ),
        )
        customer = p.req_str("customer")
        start = p.integer("start_time", required=True)
        end = p.integer("end_time", required=True)
        assert start is not None and end is not None
        window = p.enum("value_grouping_window", ("day", "hour"))
        for name, ts in (("start_time", start), ("end_time", end)):
            if ts % 60:
                raise StripeError(400, f"{name} must be aligned with minute boundaries.", param=name)
        if end <= start:
            raise StripeError(400, "end_time must be after start_time.", param="end_time")
        step = {"hour": 3600, "day": 86400}.get(window or "", 0)
        if step:
            for name, ts in (("start_time", start), ("end_time", end)):
                if ts % step:
                    raise StripeError(
                        400,
                        f"{name} must be aligned with {window} boundaries when value_grouping_window is {window}.",
                        param=name,
                    )
        self.require_customer(customer)
        events = [
            e
            for e in self.meter_events.values()
            if e.meter == meter_id and e.customer == customer and e.cancelled_at is None and start <= e.timestamp < end
        ]
        bounds = [(s, min(s + step, end)) for s in range(start, end, step)] if step else [(start, end)]
        rows: list[Obj] = []
        for lo, hi in reversed(bounds):
            window_events = [e for e in events if lo <= e.timestamp < hi]
            digest = hashlib.sha256(f"{meter_id}:{customer}:{lo}:{hi}".encode()).hexdigest()[:24]
            rows.append(
                {
                    "id": f"mtrusg_{digest}",
                    "object": "billing.meter_event_summary",
                    "aggregated_value": self._aggregate(meter, window_events),
                    "end_time": hi,
                    "livemode": meter["livemode"],
                    "meter": meter_id,
                    "start_time": lo,
                }
            )
        return self.paginate(rows, p, f"/v1/billing/meters/{meter_id}/event_summaries")

    # -- adjustments -------------------------------------------------------------------------------

    def _cancel_event(self, event_name: str, identifier: str) -> None:
        rec = self.meter_events.get(identifier)
        if rec is None or rec.event_name != event_name:
            raise StripeError(
                400,
                f"No meter event with identifier {identifier} was found for event name {event_name}.",
                param="cancel[identifier]",
            )
        if rec.cancelled_at is not None:
            raise StripeError(
                400,
                f"The meter event with identifier {identifier} has already been cancelled.",
                param="cancel[identifier]",
            )
        if self.now() - rec.received_at > CANCEL_WINDOW_S:
            raise StripeError(
                400,
                f"The meter event with identifier {identifier} can no longer be cancelled: "
                "events can only be cancelled within 24 hours of being received.",
                param="cancel[identifier]",
            )
        rec.cancelled_at = self.now()

    @locked
    def create_adjustment_v1(self, data: Obj) -> Obj:
        p = Params(data, ("event_name", "type", "cancel"))
        event_name = p.req_str("event_name", max_len=100)
        p.enum("type", ("cancel",))
        cancel = p.sub("cancel", ("identifier",), required=True)
        assert cancel is not None
        identifier = cancel.req_str("identifier", max_len=MAX_IDENTIFIER_LEN)
        self._cancel_event(event_name, identifier)
        adj: Obj = {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": identifier},
            "event_name": event_name,
            "livemode": self.ctx().livemode,
            "status": "complete",
            "type": "cancel",
        }
        self.adjustments.append(dict(adj))
        return adj

    @locked
    def create_adjustment_v2(self, data: Obj) -> Obj:
        p = Params(data, ("event_name", "type", "cancel"))
        event_name = p.req_str("event_name", max_len=100)
        p.enum("type", ("cancel",), required=True)
        cancel = p.sub("cancel", ("identifier",), required=True)
        assert cancel is not None
        identifier = cancel.req_str("identifier", max_len=MAX_IDENTIFIER_LEN)
        self._cancel_event(event_name, identifier)
        adj: Obj = {
            "id": self.ids("mtradj_"),
            "object": "v2.billing.meter_event_adjustment",
            "cancel": {"identifier": identifier},
            "created": iso(self.now()),
            "event_name": event_name,
            "livemode": self.ctx().livemode,
            "status": "complete",
            "type": "cancel",
        }
        self.adjustments.append(dict(adj))
        return adj

    # -- inspection --------------------------------------------------------------------------------

    @locked
    def accepted_meter_events(self, *, include_cancelled: bool = True) -> list[Obj]:
        """Every accepted meter event, in arrival order (value as an exact decimal string)."""
        return [r.as_dict() for r in self.meter_events.values() if include_cancelled or r.cancelled_at is None]

    @locked
    def receipt_list(self) -> dict[str, list[str]]:
        """Every identifier that arrived, with the value each arrival carried (in order)."""
        return {k: list(v) for k, v in self.receipts.items()}

    @locked
    def duplicate_attempt_list(self) -> list[Obj]:
        """Every refused re-send of an accepted identifier (with its value and the accepted one)."""
        return [dict(d) for d in self.duplicate_attempts]

    @locked
    def conflicting_identifiers(self) -> list[Obj]:
        """Duplicate attempts that carried a different value or customer than the accepted event."""
        return [dict(d) for d in self.duplicate_attempts if not d["same_value"]]

    @locked
    def totals(self) -> dict[tuple[str, str], Decimal]:
        """Exact sum of live (not cancelled) event values per (event_name, customer)."""
        out: dict[tuple[str, str], Decimal] = {}
        for r in self.meter_events.values():
            if r.cancelled_at is None:
                key = (r.event_name, r.customer)
                out[key] = out.get(key, Decimal(0)) + r.value
        return out
