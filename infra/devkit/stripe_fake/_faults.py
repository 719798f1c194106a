"""Fault and limit emulation: seeded 429 / 500 / latency / cut-off answers, and live-mode rate limits.

Decisions are drawn from one seeded RNG in arrival order, so a sequential client sees the same
faults on every run with the same seed.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

__all__ = ["FaultConfig", "FaultDecision", "FaultEngine", "RateWindow"]

FaultKind = Literal["none", "429", "500", "cutoff"]

#: Paths that faults apply to by default: the meter-event endpoints a sender hits.
DEFAULT_FAULT_PATHS = (
    "/v1/billing/meter_events",
    "/v2/billing/meter_event_stream",
    "/v2/billing/meter_events",
)


@dataclass(frozen=True)
class FaultConfig:
    """What to inject. Probabilities are per request on the matching ``paths`` (prefix match).

    ``p_429 + p_500 + p_cutoff`` must not exceed 1; ``p_slow`` is drawn independently and adds
    ``slow_seconds`` of latency. A cut-off request is executed (Stripe records it), then the
    connection is dropped without an answer. With ``live_limits`` the live-mode limits apply:
    v1 meter events ``v1_meter_events_per_s`` calls/s and one concurrent call per (customer, meter),
    the v2 stream ``v2_stream_per_s`` requests/s. With ``read_limits`` read requests (every GET, and invoice
    previews) are limited to ``reads_per_s`` a second (Stripe: 25 in test mode, 100 in live mode, 25 on one
    endpoint), answered 429 beyond. ``replay_errors`` stores 5xx answers under the
    Idempotency-Key (Stripe documents that a key replays its result, "including 500 errors").
    """

    seed: int = 0
    p_429: float = 0.0
    p_500: float = 0.0
    p_slow: float = 0.0
    slow_seconds: float = 0.2
    p_cutoff: float = 0.0
    paths: tuple[str, ...] = DEFAULT_FAULT_PATHS
    live_limits: bool = False
    v1_meter_events_per_s: int = 1000
    v2_stream_per_s: int = 10_000
    replay_errors: bool = True
    methods: tuple[str, ...] = field(default=("POST",))
    read_limits: bool = False
    reads_per_s: int = 25

    def __post_init__(self) -> None:
        for name in ("p_429", "p_500", "p_slow", "p_cutoff"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {p}")
        if self.p_429 + self.p_500 + self.p_cutoff > 1.0 + 1e-9:
            raise ValueError("p_429 + p_500 + p_cutoff must not exceed 1")
        if self.slow_seconds < 0:
            raise ValueError("slow_seconds must be >= 0")
        if self.v1_meter_events_per_s < 1 or self.v2_stream_per_s < 1 or self.reads_per_s < 1:
            raise ValueError("rate limits must be >= 1")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: FaultConfig | None = None) -> FaultConfig:
        """Build from JSON-ish data (unknown keys are an error); unspecified fields keep ``base``'s."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        values = dict(data)
        for name in ("paths", "methods"):
            if name in values:
                raw = values[name]
                values[name] = (raw,) if isinstance(raw, str) else tuple(str(p) for p in raw)
        return replace(base or cls(), **values)

    @classmethod
    def parse(cls, spec: str, base: FaultConfig | None = None) -> FaultConfig:
        """Parse a CLI spec: ``"p_429=0.1,p_500=0.05,p_slow=0.2,slow_seconds=0.5,p_cutoff=0.01,seed=7"``.

        Booleans are ``true``/``false``; ``paths``/``methods`` take ``|``-separated values.
        """
        current = base or cls()
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, raw = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or not hasattr(current, name):
                raise ValueError(f"bad fault setting {item!r} (expected name=value)")
            default = getattr(current, name)
            raw = raw.strip()
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"{name} must be true or false")
                values[name] = raw.lower() in ("true", "1", "yes")
            elif isinstance(default, int):
                values[name] = int(raw)
            elif isinstance(default, float):
                values[name] = float(raw)
            else:
                values[name] = tuple(p for p in raw.split("|") if p)
        return replace(current, **values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["paths"] = list(self.paths)
        out["methods"] = list(self.methods)
        return out

    def applies_to(self, method: str, path: str) -> bool:
        return method in self.methods and any(path.startswith(p) for p in self.paths)


@dataclass(frozen=True)
class FaultDecision:
    kind: FaultKind = "none"
    delay: float = 0.0


class FaultEngine:
    """Draws fault decisions from the seeded RNG; thread-safe."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self._lock = threading.Lock()
        self.config = config or FaultConfig()
        self._rng = random.Random(self.config.seed)
        self.injected: dict[str, int] = {}

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self._rng = random.Random(config.seed)
            self.injected = {}

    def decide(self, method: str, path: str) -> FaultDecision:
        with self._lock:
            cfg = self.config
            if not cfg.applies_to(method, path):
                return FaultDecision()
            u = self._rng.random()
            slow = self._rng.random() < cfg.p_slow
            kind: FaultKind = "none"
            if u < cfg.p_429:
                kind = "429"
            elif u < cfg.p_429 + cfg.p_500:
                kind = "500"
            elif u < cfg.p_429 + cfg.p_500 + cfg.p_cutoff:
                kind = "cutoff"
            if kind != "none":
                self.injected[kind] = self.injected.get(kind, 0) + 1
            if slow:
                self.injected["slow"] = self.injected.get("slow", 0) + 1
            return FaultDecision(kind, cfg.slow_seconds if slow else 0.0)

    def note(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] = self.injected.get(kind, 0) + 1


class RateWindow:
    """Sliding one-second window counter (real monotonic time, not the fake clock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: deque[float] = deque()

    def allow(self, limit: int, now: float | None = None) -> bool:
        t = time.monotonic() if now is None else now
        with self._lock:
            while self._hits and self._hits[0] <= t - 1.0:
                self._hits.popleft()
            if len(self._hits) >= limit:
                return False
            self._hits.append(t)
            return True
