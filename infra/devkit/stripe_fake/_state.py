"""``FakeStripe``: the whole in-memory Stripe account, with Python-level accessors for tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infra.devkit.stripe_fake._base import locked
from infra.devkit.stripe_fake._expand import ExpandMixin
from infra.devkit.stripe_fake._faults import FaultConfig

__all__ = ["FakeStripe"]

Obj = dict[str, Any]


class FakeStripe(ExpandMixin):
    """State and operations of the fake Stripe account.

    Every public operation takes the request's parameters as parsed (nested dicts/lists of strings
    for v1 forms, JSON for v2), returns a JSON-ready Stripe object, and raises
    :class:`~infra.devkit.stripe_fake.StripeError` with Stripe's status and error body. The HTTP layer
    (:func:`~infra.devkit.stripe_fake.build_app`) is a thin shell around these.
    """

    def __init__(
        self,
        *,
        faults: FaultConfig | None = None,
        seed: int = 0,
        clock: Callable[[], float] | None = None,
        webhook_speed: float | None = None,
    ) -> None:
        super().__init__(faults=faults, seed=seed, clock=clock)
        if webhook_speed is not None:
            self.set_webhook_speed(webhook_speed)

    @locked
    def reset(self) -> None:
        """Forget every object, event, key and counter, and undo ``advance_clock`` (faults stay)."""
        self._init_state()
        self._clock_offset = 0.0
        self.faults.configure(self.faults.config)
        self._deliveries_cv.notify_all()

    def set_faults(self, config: FaultConfig) -> None:
        """Replace the fault config (and restart its seeded RNG)."""
        self.faults.configure(config)

    @locked
    def request_counts(self) -> list[Obj]:
        """Requests served, per (method, route, status), sorted."""
        return [
            {"method": m, "path": path, "status": status, "count": n}
            for (m, path, status), n in sorted(self.counters.requests.items())
        ]

    @locked
    def error_report_list(self) -> list[Obj]:
        return [self.copy(r) for r in self.error_reports]
