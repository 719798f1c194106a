"""What the worker knows about its own health: readiness conditions, their metrics, and logs that do not flood.

*Live* while the event loop answers (``/healthz``); *ready* while none of ``starting``, ``ingest_stalled``,
``ledger_unwritable``, ``broker_unreachable``, ``dead_letters_unwritable`` holds (``/readyz``,
``edgebill_unready{condition}``). Repeated failures are logged once per interval with a count
(:class:`RateLimitedLog` for our loops, :class:`RepeatedLogFilter` for the libraries'). What each condition
means: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import Counter, Gauge

from sinks.observe import REGISTRY

__all__ = [
    "BROKER",
    "CONDITIONS",
    "DEAD_LETTERS",
    "LEDGER",
    "STALLED",
    "STARTING",
    "Health",
    "RateLimitedLog",
    "RepeatedLogFilter",
    "dead_letter_failures_total",
    "dead_letters_truncated_total",
    "ingest_fetch_errors_total",
    "install_log_filter",
    "ledger_write_failures_total",
    "ticks_refused_total",
]

STARTING: Final = "starting"
STALLED: Final = "ingest_stalled"
LEDGER: Final = "ledger_unwritable"
BROKER: Final = "broker_unreachable"
DEAD_LETTERS: Final = "dead_letters_unwritable"
CONDITIONS: Final = (STARTING, STALLED, LEDGER, BROKER, DEAD_LETTERS)

# ---- process metrics (rendered first on /metrics, with the Stripe ones)
_ready = Gauge("edgebill_ready", "1 while the worker is ready (see /readyz), else 0.", registry=REGISTRY)
_unready = Gauge(
    "edgebill_unready",
    "1 while a readiness condition holds: starting, ingest_stalled, ledger_unwritable, broker_unreachable, "
    "dead_letters_unwritable.",
    ["condition"],
    registry=REGISTRY,
)
_lag = Gauge(
    "edgebill_ingest_lag",
    "usage-ticks records of the partitions this worker owns that are not yet written to the ledger.",
    registry=REGISTRY,
)
_progress_age = Gauge(
    "edgebill_ingest_progress_age_seconds",
    "Seconds since ingest last wrote a batch or was caught up.",
    registry=REGISTRY,
)
ledger_write_failures_total: Final = Counter(
    "edgebill_ledger_write_failures",
    "Ingest ledger writes that failed, by kind: unavailable (retried) or refused (a record the database "
    "refuses: isolated and dead-lettered).",
    ["kind"],
    registry=REGISTRY,
)
ticks_refused_total: Final = Counter(
    "edgebill_ticks_refused",
    "Ticks the parser accepted but the database refused: isolated from their batch and dead-lettered.",
    registry=REGISTRY,
)
dead_letter_failures_total: Final = Counter(
    "edgebill_dead_letter_failures",
    "Attempts to produce a batch of dead letters that failed (ingestion waits until they are written).",
    registry=REGISTRY,
)
dead_letters_truncated_total: Final = Counter(
    "edgebill_dead_letters_truncated",
    "Dead letters carried as a bounded prefix of the record (header edgebill-truncated = original size).",
    registry=REGISTRY,
)
ingest_fetch_errors_total: Final = Counter(
    "edgebill_ingest_fetch_errors",
    "usage-ticks fetches that failed (the consumer retries).",
    registry=REGISTRY,
)
for _c in CONDITIONS:
    _unready.labels(_c).set(0)
for _k in ("unavailable", "refused"):
    ledger_write_failures_total.labels(_k)


# ------------------------------------------------------------------------------------------ logs


@dataclass(slots=True)
class _Streak:
    first: float
    last_logged: float
    failures: int = 1  # in the whole streak
    unlogged: int = 0  # since the last line


class RateLimitedLog:
    """Logs a run of repeated failures once per ``interval_s``, with a count, and its end once.

    ``failure(key, ...)``: the first failure of a streak is logged at once; later ones at most once per
    interval, with how many happened since the last line. ``recovered(key)``: if ``key`` was failing, one
    line says so, with the streak's length. Keys are short names ("ledger write", "fetch").
    """

    def __init__(
        self, logger: logging.Logger, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._clock = clock
        self._streaks: dict[str, _Streak] = {}

    def failing(self, key: str) -> bool:
        return key in self._streaks

    def failure(
        self, key: str, msg: str, *args: Any, level: int = logging.WARNING, exc_info: BaseException | None = None
    ) -> None:
        now = self._clock()
        st = self._streaks.get(key)
        if st is None:
            self._streaks[key] = _Streak(first=now, last_logged=now)
            self._log.log(level, msg, *args, exc_info=exc_info)
            return
        st.failures += 1
        st.unlogged += 1
        if now - st.last_logged >= self.interval_s:
            self._log.log(
                level,
                msg + " [%d more time(s) in the last %.0f s]",
                *args,
                st.unlogged,
                now - st.last_logged,
                exc_info=exc_info,
            )
            st.last_logged = now
            st.unlogged = 0

    def recovered(self, key: str, msg: str = "%s: recovered after %d failure(s) over %.0f s") -> None:
        st = self._streaks.pop(key, None)
        if st is not None:
            self._log.info(msg, key, st.failures, self._clock() - st.first)


class RepeatedLogFilter(logging.Filter):
    """A handler filter: each warning or error *message template* passes at most once per ``interval_s``.

    For the libraries' messages: records of edgebill's own packages and records below WARNING always pass. A
    repeat inside the interval is dropped and counted; the next one that passes says how many were dropped.
    One decision per record, whatever the number of handlers the filter sits on.
    """

    _MARK: Final = "_edgebill_passes"
    OWN: Final = ("models", "sinks", "streams", "infra")

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._passed: dict[tuple[str, int, str], float] = {}  # template -> when it last passed
        self._dropped: dict[tuple[str, int, str], int] = {}  # template -> dropped since then

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.name.partition(".")[0] in self.OWN:
            return True
        decided = record.__dict__.get(self._MARK)
        if decided is not None:
            return bool(decided)
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._passed.get(key)
        passes = last is None or now - last >= self.interval_s
        if passes:
            dropped = self._dropped.pop(key, 0)
            self._passed[key] = now
            if len(self._passed) > 10_000:  # bounded: forget the templates seen longest ago
                for k in sorted(self._passed, key=self._passed.__getitem__)[:5_000]:
                    del self._passed[k]
                    self._dropped.pop(k, None)
            if dropped and last is not None:
                record.msg = f"{record.msg} [repeated {dropped} more time(s) in the last {now - last:.0f} s]"
        else:
            self._dropped[key] = self._dropped.get(key, 0) + 1
        record.__dict__[self._MARK] = passes
        return passes


def install_log_filter(interval_s: float = 10.0) -> RepeatedLogFilter:
    """Add one :class:`RepeatedLogFilter` to every handler of the root logger (idempotent); returns it."""
    root = logging.getLogger()
    for h in root.handlers:
        for f in h.filters:
            if isinstance(f, RepeatedLogFilter):
                return f
    flt = RepeatedLogFilter(interval_s)
    for h in root.handlers:
        h.addFilter(flt)
    return flt


# ---------------------------------------------------------------------------------------- health


@dataclass(slots=True)
class _Held:
    since: float
    detail: str


class Health:
    """Readiness conditions of one worker process (see the module docstring). Event-loop only, no locks.

    Conditions are set and cleared where things happen (:meth:`fail`, :meth:`ok`), per ``source`` (the
    ingest write and the progress reporter both report on the ledger: it is unwritable while either
    fails). The stall is derived from the lag the ingest consumer reports (:meth:`observe_lag`) and the
    batches it writes (:meth:`progress`).
    """

    def __init__(
        self,
        *,
        stall_after_s: float = 15.0,
        broker_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_after_s = stall_after_s
        self.broker_timeout_s = broker_timeout_s
        self._clock = clock
        self._held: dict[str, dict[str, _Held]] = {
            STARTING: {"": _Held(clock(), "the ingest consumer has not started")}
        }
        self.lag: int | None = None
        self._progress_at = clock()

    def fail(self, condition: str, detail: str, source: str = "") -> None:
        by_source = self._held.setdefault(condition, {})
        held = by_source.get(source)
        if held is None:
            by_source[source] = _Held(self._clock(), detail)
        else:
            held.detail = detail

    def ok(self, condition: str, source: str = "") -> None:
        by_source = self._held.get(condition)
        if by_source is not None:
            by_source.pop(source, None)
            if not by_source:
                del self._held[condition]

    def holds(self, condition: str) -> bool:
        return condition in self.conditions()

    def progress(self) -> None:
        """A batch was written to the ledger."""
        self._progress_at = self._clock()

    def observe_lag(self, lag: int) -> None:
        """Records owned by this worker and not yet written; 0 counts as progress (nothing to do)."""
        self.lag = lag
        if lag <= 0:
            self._progress_at = self._clock()

    def progress_age_s(self) -> float:
        return self._clock() - self._progress_at

    def conditions(self) -> dict[str, _Held]:
        """Every condition that holds now (the stall included), with when it began and what it is."""
        out = {
            name: _Held(min(h.since for h in by.values()), "; ".join(h.detail for h in by.values()))
            for name, by in self._held.items()
        }
        age = self.progress_age_s()
        if STARTING not in out and (self.lag or 0) > 0 and age >= self.stall_after_s:
            out[STALLED] = _Held(self._progress_at, f"{self.lag} record(s) waiting, no batch written for {age:.0f} s")
        return out

    def ready(self) -> bool:
        return not self.conditions()

    def report(self) -> dict[str, Any]:
        """The ``/readyz`` body; also refreshes the readiness gauges."""
        now = self._clock()
        held = self.conditions()
        for c in CONDITIONS:
            _unready.labels(c).set(1 if c in held else 0)
        _ready.set(0 if held else 1)
        _lag.set(self.lag or 0)
        _progress_age.set(self.progress_age_s())
        return {
            "ready": not held,
            "conditions": {
                name: {"for_s": round(now - h.since, 1), "detail": h.detail} for name, h in sorted(held.items())
            },
            "ingest_lag": self.lag,
            "ingest_progress_age_s": round(self.progress_age_s(), 1),
        }
