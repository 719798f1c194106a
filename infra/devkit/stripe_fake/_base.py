"""The shared core of the fake's state: lock, clock, ids, the v1 event log, listing, request counts."""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

from infra.devkit.stripe_fake._errors import StripeError, no_such
from infra.devkit.stripe_fake._faults import FaultConfig, FaultEngine, RateWindow
from infra.devkit.stripe_fake._params import Params
from infra.devkit.stripe_fake._util import IdFactory

__all__ = ["API_VERSION", "RequestContext", "StateBase", "current_request", "locked"]

API_VERSION = "2026-10-28.endive"

Obj = dict[str, Any]
P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="StateBase")


@dataclass(frozen=True)
class RequestContext:
    """Who is asking: filled in by the HTTP layer, read when objects and events are created."""

    request_id: str | None = None
    idempotency_key: str | None = None
    livemode: bool = False


_NO_REQUEST = RequestContext()
current_request: ContextVar[RequestContext | None] = ContextVar("stripe_fake_request", default=None)


def locked(fn: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Run a state operation under the state's lock (the HTTP loop and test threads share it)."""

    @functools.wraps(fn)
    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper


@dataclass
class IdempotentResult:
    method: str
    path: str
    fingerprint: bytes
    status: int
    body: bytes
    headers: dict[str, str]
    request_id: str
    created: float


@dataclass
class Counters:
    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)


class StateBase:
    """Attributes and helpers every resource mixin relies on."""

    def __init__(
        self,
        *,
        faults: FaultConfig | None = None,
        seed: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._clock = clock or time.time
        self._clock_offset = 0.0
        self._seed = seed
        self.ids = IdFactory(seed)
        self.faults = FaultEngine(faults)
        self._event_listeners: list[Callable[[Obj], None]] = []
        self._init_state()

    # -- lifecycle ---------------------------------------------------------------------------------

    def _init_state(self) -> None:
        self.events: dict[str, Obj] = {}
        self.idempotency: dict[tuple[str, str], IdempotentResult] = {}
        self.in_flight_keys: set[tuple[str, str]] = set()
        self.counters = Counters()
        self.rate_windows: dict[str, RateWindow] = {}
        self.in_flight_meter_calls: set[tuple[str, str]] = set()
        # (monotonic time, method, route, status) of every Stripe API request served, newest last.
        self.request_log: deque[tuple[float, str, str, int]] = deque(maxlen=100_000)

    # -- time --------------------------------------------------------------------------------------

    def now(self) -> float:
        """The fake's clock: wall time (or the injected clock) plus whatever ``advance_clock`` added."""
        return self._clock() + self._clock_offset

    def now_s(self) -> int:
        return int(self.now())

    @locked
    def advance_clock(self, seconds: float) -> float:
        """Move the fake's clock forward (sessions expire, the 24 h windows close). Returns now()."""
        self._clock_offset += seconds
        return self.now()

    # -- helpers for resources ---------------------------------------------------------------------

    @staticmethod
    def ctx() -> RequestContext:
        return current_request.get() or _NO_REQUEST

    @staticmethod
    def copy(obj: Obj) -> Obj:
        return copy.deepcopy(obj)

    def window(self, name: str) -> RateWindow:
        w = self.rate_windows.get(name)
        if w is None:
            w = self.rate_windows[name] = RateWindow()
        return w

    def get_or_404(self, table: dict[str, Obj], ident: str, label: str) -> Obj:
        obj = table.get(ident)
        if obj is None:
            raise no_such(label, ident)
        return obj

    def paginate(
        self,
        items: Iterable[Obj],
        params: Params,
        url: str,
        *,
        max_limit: int = 100,
    ) -> Obj:
        """A v1 list object over ``items`` (already in list order, newest first)."""
        limit = params.integer("limit")
        if limit is None:
            limit = 10
        if not 1 <= limit <= max_limit:
            raise StripeError(
                400,
                f"Invalid limit: must be between 1 and {max_limit}",
                code="parameter_invalid_integer",
                param="limit",
            )
        rows = list(items)
        after = params.string("starting_after")
        before = params.string("ending_before")
        if after and before:
            raise StripeError(400, "You may only specify one of these parameters: ending_before, starting_after.")
        ids = [r["id"] for r in rows]
        if after:
            if after not in ids:
                raise no_such("object", after, param="starting_after", status=400)
            rows = rows[ids.index(after) + 1 :]
            page, has_more = rows[:limit], len(rows) > limit
        elif before:
            if before not in ids:
                raise no_such("object", before, param="ending_before", status=400)
            rows = rows[: ids.index(before)]
            page, has_more = rows[-limit:], len(rows) > limit
        else:
            page, has_more = rows[:limit], len(rows) > limit
        return {"object": "list", "data": [self.copy(r) for r in page], "has_more": has_more, "url": url}

    # -- v1 events (the webhook feed) ---------------------------------------------------------------

    def add_event_listener(self, listener: Callable[[Obj], None]) -> None:
        self._event_listeners.append(listener)

    def remove_event_listener(self, listener: Callable[[Obj], None]) -> None:
        if listener in self._event_listeners:
            self._event_listeners.remove(listener)

    def emit(self, type_: str, obj: Obj, previous: Obj | None = None) -> Obj:
        """Record a v1 ``event`` for ``obj`` and hand it to the webhook deliverer."""
        ctx = self.ctx()
        data: Obj = {"object": self.copy(obj)}
        if previous is not None:
            data["previous_attributes"] = self.copy(previous)
        event: Obj = {
            "id": self.ids("evt_"),
            "object": "event",
            "api_version": API_VERSION,
            "created": self.now_s(),
            "data": data,
            "livemode": bool(obj.get("livemode", ctx.livemode)),
            "pending_webhooks": 0,
            "request": {"id": ctx.request_id, "idempotency_key": ctx.idempotency_key},
            "type": type_,
        }
        self.events[event["id"]] = event
        for listener in list(self._event_listeners):
            listener(event)
        return event

    # -- in-flight slots and the Idempotency-Key store (used by the HTTP layer) ---------------------

    @locked
    def claim_meter_slot(self, slot: tuple[str, str]) -> bool:
        """Take the one concurrent v1 meter-event call allowed per (customer, meter); False if taken."""
        if slot in self.in_flight_meter_calls:
            return False
        self.in_flight_meter_calls.add(slot)
        return True

    @locked
    def release_slots(self, meter_slot: tuple[str, str] | None, idem_slot: tuple[str, str] | None) -> None:
        if meter_slot is not None:
            self.in_flight_meter_calls.discard(meter_slot)
        if idem_slot is not None:
            self.in_flight_keys.discard(idem_slot)

    @locked
    def idempotency_claim(self, slot: tuple[str, str], ttl_s: float) -> IdempotentResult | None:
        """The stored result for (api key, Idempotency-Key), or None after marking the key in flight.

        Raises 409 while another request with the same key is in flight, as Stripe does.
        """
        stored = self.idempotency.get(slot)
        if stored is not None and self.now() - stored.created > ttl_s:
            del self.idempotency[slot]
            stored = None
        if stored is not None:
            return stored
        if slot in self.in_flight_keys:
            raise StripeError(
                409,
                "There is currently another in-progress request using this Stripe idempotency key (that "
                "probably means you submitted twice, and the other request is still going through): "
                f"{slot[1]}. Please try again later.",
                type_="idempotency_error",
            )
        self.in_flight_keys.add(slot)
        return None

    @locked
    def idempotency_store(self, slot: tuple[str, str], result: IdempotentResult) -> None:
        self.idempotency[slot] = result

    # -- inspection --------------------------------------------------------------------------------

    def count_request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self.counters.requests[(method, route, status)] += 1
            if not route.startswith("/_fake/"):
                self.request_log.append((time.monotonic(), method, route, status))

    def request_times(self, method: str | None = None, prefix: str = "") -> list[tuple[float, str, str, int]]:
        """The API requests served (monotonic time, method, route, status), oldest first, filtered."""
        with self._lock:
            return [r for r in self.request_log if (method is None or r[1] == method) and r[2].startswith(prefix)]
