"""``usage-ticks`` wire format: envelopes, parsing, and the reasons a record is rejected.

A Kafka record's value is one envelope or a JSON array of envelopes (producers batch). Parsing never
raises on bad input: it returns :class:`ParsedRecord` with the good ticks, the rejected parts
(each with a short machine-readable reason and the exact bytes to dead-letter) and how many
envelopes of another ``type`` were ignored.

The contract has these implementations:

* :class:`UsageTickEnvelope` — the frozen pydantic wire model (producers, the simulator, docs);
* :func:`validate_record` — ``orjson`` plus hand-written checks (about 20x faster than pydantic per tick),
  the reference for every input: it names the reason of each rejection and keeps the bytes to dead-letter;
* :func:`parse_record` — the one entry point (ingest, replay, ``edgebill ticks``): a ``msgspec`` fast path
  that decodes and validates a record of well-formed ticks in C, and hands every record it is not sure
  about to :func:`validate_record`, so that its result is the validator's on every input.

Property tests keep the wire model and the validator in agreement, and the fast path and the validator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import repeat
from operator import attrgetter, floordiv, sub
from typing import Annotated, Any, Final, NamedTuple

import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "FUTURE_TOLERANCE_MS",
    "INT32_MAX",
    "INT64_MAX",
    "INT_LIMITS",
    "MAX_CPUS",
    "MAX_ID_LENGTH",
    "MAX_INTERVAL_S",
    "MAX_MEMORY_MB",
    "MAX_TS_MS",
    "STRING_LIMITS",
    "TICK_TYPE",
    "ParsedRecord",
    "Rejected",
    "SourcedTick",
    "Tick",
    "TickColumns",
    "TickPayload",
    "UsageTickEnvelope",
    "locate_envelope",
    "no_nul",
    "parse_record",
    "parse_timestamp_ms",
    "tick_fingerprint",
    "validate_record",
]

TICK_TYPE: Final = "usage_tick"

# ---- What the ledger can store, so that every database accepts and refuses the same ticks.
# A tick the parser accepts must fit every column its fields reach once aggregated (org ids in meter rows,
# sandbox and worker ids beside the cell side's intervals) on SQLite (which stores nearly anything) and on
# PostgreSQL (which refuses a string longer than its varchar(n) and any NUL character, and an integer beyond
# its column type), and the stored batch's integers. A test checks these limits against the schema.
INT32_MAX: Final = 2**31 - 1  # an SQL integer column
INT64_MAX: Final = 2**63 - 1  # an SQL bigint column
MAX_ID_LENGTH: Final = 255  # characters (not bytes): every string column of a tick is varchar(255)
MAX_MEMORY_MB: Final = 16 * 1024 * 1024  # 16 TiB: anything larger is a producer bug (column: bigint)
MAX_INTERVAL_S: Final = 86_400  # column: integer
MAX_CPUS: Final = 1_000_000  # column: integer
# 10000-01-02T00:00:00Z: above anything parse_timestamp_ms returns (year <= 9999, UTC offset > -24 h). bigint.
MAX_TS_MS: Final = 253_402_387_200_000
#: Tick field -> the longest string the ledger stores in it. NUL is refused in every one of them.
STRING_LIMITS: Final = {
    "id": MAX_ID_LENGTH,
    "org_id": MAX_ID_LENGTH,
    "sandbox_id": MAX_ID_LENGTH,
    "worker_id": MAX_ID_LENGTH,
    "cell_id": MAX_ID_LENGTH,
}
#: Tick field -> the largest value the parser accepts (all are >= 0).
INT_LIMITS: Final = {
    "memory_mb": MAX_MEMORY_MB,
    "cpu_count": MAX_CPUS,
    "interval_s": MAX_INTERVAL_S,
    "ts_ms": MAX_TS_MS,
}
# A tick (or a scale event) stamped more than this ahead of the reader's clock is rejected: it would hold
# a bucket open, or bill an hour that has not happened, on a producer's broken clock.
FUTURE_TOLERANCE_MS: Final = 3600 * 1000


class Tick(NamedTuple):
    """One validated usage tick, in the units the ledger stores (ints only; no floats).

    A NamedTuple, not a dataclass: immutable all the same, and about 5x cheaper to build on the ingest
    hot path (one per tick).
    """

    id: str
    org_id: str
    sandbox_id: str
    worker_id: str
    cell_id: str
    memory_mb: int
    cpu_count: int
    interval_s: int
    ts_ms: int

    @property
    def mb_seconds(self) -> int:
        """Exact usage in MB-seconds (GB-s = this / 1024)."""
        return self.memory_mb * self.interval_s


class SourcedTick(NamedTuple):
    """A tick and where it was read (one per tick on the ingest hot path: a NamedTuple, cheap to build)."""

    tick: Tick
    partition: int
    offset: int


class TickColumns:
    """Ticks of one bucket as columns (the stored batch's layout), for readers that only aggregate: no tick
    object per tick. ``org`` indexes ``org_names``; every other column holds one value per tick, in order.

    ``sandbox_id``, ``worker_id`` and ``ts_ms`` are only needed for the ticks aggregation cannot count in
    bulk (the zombie test, a policy change inside the bucket): :meth:`lazy` defers reading them until asked.
    """

    __slots__ = ("_detail", "_load", "interval_s", "memory_mb", "org", "org_names")

    def __init__(
        self,
        org_names: list[str],
        org: list[int],
        sandbox_id: list[str],
        worker_id: list[str],
        memory_mb: list[int],
        interval_s: list[int],
        ts_ms: list[int],
    ) -> None:
        self.org_names, self.org, self.memory_mb, self.interval_s = org_names, org, memory_mb, interval_s
        self._detail: tuple[list[str], list[str], list[int]] | None = (sandbox_id, worker_id, ts_ms)
        self._load: Callable[[], tuple[list[str], list[str], list[int]]] | None = None

    @classmethod
    def lazy(
        cls,
        org_names: list[str],
        org: list[int],
        memory_mb: list[int],
        interval_s: list[int],
        detail: Callable[[], tuple[list[str], list[str], list[int]]],
    ) -> TickColumns:
        """Columns whose ``(sandbox_id, worker_id, ts_ms)`` ``detail`` reads on first use."""
        cols = cls(org_names, org, [], [], memory_mb, interval_s, [])
        cols._detail, cols._load = None, detail
        return cols

    def _details(self) -> tuple[list[str], list[str], list[int]]:
        if self._detail is None:
            assert self._load is not None
            self._detail = self._load()
        return self._detail

    @property
    def sandbox_id(self) -> list[str]:
        return self._details()[0]

    @property
    def worker_id(self) -> list[str]:
        return self._details()[1]

    @property
    def ts_ms(self) -> list[int]:
        return self._details()[2]

    def tick(self, i: int) -> Tick:
        """Tick ``i`` as a :class:`Tick` (without id and cell, which aggregation never reads)."""
        sandbox, worker, ts = self._details()
        return Tick(
            "", self.org_names[self.org[i]], sandbox[i], worker[i], "", self.memory_mb[i], 0, self.interval_s[i], ts[i]
        )


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record (or one element of an array record) that cannot be billed."""

    reason: str
    raw: bytes
    index: int | None = None  # position in an array record; None for the whole record


@dataclass(slots=True)
class ParsedRecord:
    ticks: list[Tick] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    ignored: int = 0  # envelopes of another type: accepted, counted, not billed


def no_nul(v: str | None) -> str | None:
    """A pydantic validator body: refuse a string holding a NUL character (PostgreSQL text cannot store it)."""
    if v is not None and "\x00" in v:
        raise ValueError("must not contain a NUL character (PostgreSQL text cannot store it)")
    return v


class TickPayload(BaseModel):
    """``payload`` of a ``usage_tick``. Old producers omit the dimensions: they read as 0."""

    model_config = ConfigDict(frozen=True, extra="allow")

    sandbox_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    cost_cents: int = 0
    interval_s: int = Field(default=0, ge=0, le=MAX_INTERVAL_S)
    memory_mb: int = Field(default=0, ge=0, le=MAX_MEMORY_MB)
    cpu_count: int = Field(default=0, ge=0, le=MAX_CPUS)

    _no_nul = field_validator("sandbox_id")(no_nul)


class UsageTickEnvelope(BaseModel):
    """The envelope on ``usage-ticks``, as producers publish it.

    ``plan`` is the worker's stale view, kept but never used for pricing: the plan comes from the org
    policy in force at the tick's timestamp. Unknown extra fields are allowed and ignored.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    type: str = TICK_TYPE
    sandbox_id: str = Field(default="", max_length=MAX_ID_LENGTH)
    org_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    plan: str | None = None
    worker_id: str = Field(default="", max_length=MAX_ID_LENGTH)
    cell_id: str = Field(default="", max_length=MAX_ID_LENGTH)
    payload: TickPayload = TickPayload()
    timestamp: datetime

    _no_nul = field_validator("id", "org_id", "sandbox_id", "worker_id", "cell_id")(no_nul)

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("timestamp must carry a UTC offset (e.g. 'Z')")
        return v.astimezone(UTC)

    def to_tick(self) -> Tick:
        return Tick(
            id=self.id,
            org_id=self.org_id,
            sandbox_id=self.sandbox_id or (self.payload.sandbox_id or ""),
            worker_id=self.worker_id,
            cell_id=self.cell_id,
            memory_mb=self.payload.memory_mb,
            cpu_count=self.payload.cpu_count,
            interval_s=self.payload.interval_s,
            ts_ms=_dt_to_ms(self.timestamp),
        )

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))


def _dt_to_ms(dt: datetime) -> int:
    return (dt - _EPOCH) // _ONE_MS


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


def parse_timestamp_ms(value: object) -> int | None:
    """RFC 3339 timestamp with an offset -> unix milliseconds, or None when it cannot be one."""
    if type(value) is not str or len(value) < 20 or len(value) > 40:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None or not (1970 <= dt.year <= 9999):
        return None
    # == (dt - _EPOCH) // _ONE_MS, exactly (0 <= microseconds < 10**6), and a quarter cheaper on the hot path.
    td = dt - _EPOCH
    return (td.days * 86_400 + td.seconds) * 1000 + td.microseconds // 1000


def _nonneg_int(payload: dict[str, Any], key: str, limit: int) -> int | str:
    """A non-negative integer dimension; missing/null reads as 0. Returns a reason string on error."""
    v = payload.get(key)
    if v is None:
        return 0
    if type(v) is float and v.is_integer():
        v = int(v)
    if type(v) is not int:
        return f"bad_{key}"
    if v < 0:
        return f"negative_{key}"
    if v > limit:
        return f"{key}_out_of_range"
    return v


def _str_field(env: dict[str, Any], key: str) -> str:
    v = env.get(key)
    return v if isinstance(v, str) else ""


def _unstorable(value: str) -> bool:
    """Whether a tick's string column cannot hold ``value`` on every database (too long, or a NUL)."""
    return len(value) > MAX_ID_LENGTH or "\x00" in value


def _unstorable_reason(value: str, name: str) -> str:
    """The reason for a string that :func:`_unstorable` refused."""
    return f"{name}_too_long" if len(value) > MAX_ID_LENGTH else f"{name}_contains_nul"


def _parse_envelope(env: Any, max_ts_ms: int | None, may_hold_nul: bool) -> Tick | str | None:
    """A tick, a rejection reason, or None for an envelope of another type (ignored).

    ``may_hold_nul``: False when the record's bytes hold no ``\\u0000`` escape, the only way a JSON string
    can decode to a NUL character (a raw NUL byte is invalid JSON): the NUL checks are then skipped.
    """
    if not isinstance(env, dict):
        return "not_an_envelope"
    typ = env.get("type", TICK_TYPE)
    if typ != TICK_TYPE:
        return None if isinstance(typ, str) else "bad_type"
    tick_id = env.get("id")
    if not isinstance(tick_id, str) or not tick_id:
        return "missing_id"
    if len(tick_id) > MAX_ID_LENGTH or (may_hold_nul and "\x00" in tick_id):
        return _unstorable_reason(tick_id, "id")
    org_id = env.get("org_id")
    if not isinstance(org_id, str) or not org_id:
        return "missing_org_id"
    if len(org_id) > MAX_ID_LENGTH or (may_hold_nul and "\x00" in org_id):
        return _unstorable_reason(org_id, "org_id")
    ts_ms = parse_timestamp_ms(env.get("timestamp"))
    if ts_ms is None:
        return "bad_timestamp"
    if max_ts_ms is not None and ts_ms > max_ts_ms:
        return "timestamp_in_future"
    payload = env.get("payload")
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        return "bad_payload"
    # Common case inline (plain ints in range); anything else goes through _nonneg_int for its reason.
    interval = payload.get("interval_s", 0)
    if type(interval) is not int or not 0 <= interval <= MAX_INTERVAL_S:
        interval = _nonneg_int(payload, "interval_s", MAX_INTERVAL_S)
        if isinstance(interval, str):
            return interval
    memory = payload.get("memory_mb", 0)
    if type(memory) is not int or not 0 <= memory <= MAX_MEMORY_MB:
        memory = _nonneg_int(payload, "memory_mb", MAX_MEMORY_MB)
        if isinstance(memory, str):
            return memory
    cpus = payload.get("cpu_count", 0)
    if type(cpus) is not int or not 0 <= cpus <= MAX_CPUS:
        cpus = _nonneg_int(payload, "cpu_count", MAX_CPUS)
        if isinstance(cpus, str):
            return cpus
    sandbox = env.get("sandbox_id")
    if type(sandbox) is not str or not sandbox:
        sandbox = _str_field(payload, "sandbox_id")
    worker = env.get("worker_id", "")
    if type(worker) is not str:
        worker = ""
    cell = env.get("cell_id", "")
    if type(cell) is not str:
        cell = ""
    # The column limits of the three optional strings, in one pass for the common (short, clean) case.
    if (
        len(sandbox) > MAX_ID_LENGTH
        or len(worker) > MAX_ID_LENGTH
        or len(cell) > MAX_ID_LENGTH
        or (may_hold_nul and ("\x00" in sandbox or "\x00" in worker or "\x00" in cell))
    ):
        for value, name in ((sandbox, "sandbox_id"), (worker, "worker_id"), (cell, "cell_id")):
            if _unstorable(value):
                return _unstorable_reason(value, name)
    return Tick(tick_id, org_id, sandbox, worker, cell, memory, cpus, interval, ts_ms)


def _element_bytes(env: Any, raw: bytes) -> bytes:
    """An array element's bytes to dead-letter: re-serialized, or the whole record ``raw`` when the element is
    nested deeper than orjson writes (it reads 1024 levels, writes 254), so that parsing never raises."""
    try:
        return orjson.dumps(env)
    except TypeError:  # orjson.JSONEncodeError: "Recursion limit reached"
        return raw


def validate_record(raw: bytes | None, *, max_ts_ms: int | None = None) -> ParsedRecord:
    """Parse one Kafka record value with ``orjson`` and the checks above. Never raises on bad input.

    The fallback of :func:`parse_record` and the reference it is tested against; call that one.

    ``max_ts_ms``: ticks stamped later than this are rejected (``timestamp_in_future``): a producer
    clock far ahead would otherwise hold a bucket open for its whole skew.

    A whole-record failure (not JSON, not an object or array, empty array) rejects the record with
    its original bytes. Inside an array each element stands alone: good elements are kept, bad
    ones are rejected individually (their bytes re-serialized, with their index; the whole record's bytes for
    an element nested deeper than orjson writes back).
    """
    out = ParsedRecord()
    if raw is None or not raw:
        out.rejected.append(Rejected("empty_record", raw or b""))
        return out
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        out.rejected.append(Rejected("not_json", raw))
        return out
    nul = b"\\u0000" in raw
    if isinstance(doc, list):
        if not doc:
            out.rejected.append(Rejected("empty_array", raw))
            return out
        for i, env in enumerate(doc):
            result = _parse_envelope(env, max_ts_ms, nul)
            if isinstance(result, Tick):
                out.ticks.append(result)
            elif result is None:
                out.ignored += 1
            else:
                out.rejected.append(Rejected(result, _element_bytes(env, raw), i))
        return out
    result = _parse_envelope(doc, max_ts_ms, nul)
    if isinstance(result, Tick):
        out.ticks.append(result)
    elif result is None:
        out.ignored += 1
    else:
        out.rejected.append(Rejected(result, raw))
    return out


# ---- The fast path: msgspec decodes and validates a record of well-formed ticks in one C pass.
# It only ever answers "these ticks (and this many ignored envelopes)"; anything else, and anything it is not
# sure the validator would read the same way, goes to validate_record. What keeps the two identical:
# - every field is typed as a scalar and unknown fields are refused (forbid_unknown_fields), so msgspec never
#   skips a value unread: nesting, big or non-finite numbers and odd strings elsewhere in an envelope cannot
#   be read differently by the two decoders (an envelope with fields beyond the wire model is validated);
# - both decoders refuse malformed JSON, invalid UTF-8, lone surrogates, raw control characters, NaN and
#   Infinity, and take the last of duplicate keys;
# - integers are plain JSON integers within the ledger's limits (a float, a bool or anything out of range is
#   refused here and given its reason by the validator), strings are limited in characters as len() counts;
# - a record holding a ``\u0000`` escape (the only way to a NUL character) goes to the validator whole;
# - the timestamp goes through parse_timestamp_ms, the same function the validator calls.
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
_OptionalId = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)] | None
_Interval = Annotated[int, msgspec.Meta(ge=0, le=MAX_INTERVAL_S)] | None
_Memory = Annotated[int, msgspec.Meta(ge=0, le=MAX_MEMORY_MB)] | None
_Cpus = Annotated[int, msgspec.Meta(ge=0, le=MAX_CPUS)] | None
_Cents = Annotated[int, msgspec.Meta(ge=-INT64_MAX - 1, le=INT64_MAX)] | None


class _FastPayload(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    sandbox_id: _OptionalId = None
    cost_cents: _Cents = None  # not billed; bounded only so that orjson reads it as the same number
    interval_s: _Interval = None
    memory_mb: _Memory = None
    cpu_count: _Cpus = None


class _FastEnvelope(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    id: _Id
    org_id: _Id
    timestamp: str
    type: str = TICK_TYPE
    sandbox_id: _OptionalId = None
    plan: str | None = None
    worker_id: _OptionalId = None
    cell_id: _OptionalId = None
    payload: _FastPayload | None = None


_fast_decode: Final = msgspec.json.Decoder(_FastEnvelope | list[_FastEnvelope]).decode
_EMPTY_PAYLOAD: Final = _FastPayload()


def _times_ms(envs: list[_FastEnvelope] | tuple[_FastEnvelope], limit: int) -> list[int] | None:
    """Every envelope's timestamp in unix ms, exactly as :func:`parse_timestamp_ms` reads each, computed in C
    over the whole record (no Python call per tick); None when one is not a valid time up to ``limit``."""
    if len(envs) == 1:
        ts = parse_timestamp_ms(envs[0].timestamp)
        return None if ts is None or ts > limit else [ts]
    stamps = list(map(_timestamp_of, envs))
    lengths = list(map(len, stamps))
    if min(lengths) < 20 or max(lengths) > 40:
        return None
    try:
        times = list(map(datetime.fromisoformat, stamps))
        # An offset-free time cannot be subtracted from the aware epoch: TypeError, as parse_timestamp_ms refuses.
        ms = list(map(floordiv, map(sub, times, repeat(_EPOCH)), repeat(_ONE_MS)))
    except (ValueError, TypeError):
        return None
    if min(map(_year_of, times)) < 1970 or max(ms) > limit:
        return None
    return ms


_timestamp_of: Final = attrgetter("timestamp")
_year_of: Final = attrgetter("year")


def _parse_fast(raw: bytes, max_ts_ms: int | None) -> ParsedRecord | None:
    """The record's ticks when every envelope is a well-formed tick (or of another type); None when unsure."""
    if b"\\u0000" in raw:
        return None
    try:
        doc = _fast_decode(raw)
    except Exception:  # DecodeError, ValidationError, UnicodeDecodeError: the validator gives the reason
        return None
    envs = doc if type(doc) is list else (doc,)
    if not envs:
        return None
    # parse_timestamp_ms never returns more than MAX_TS_MS. Every envelope's time is read, an ignored one's
    # too: a record whose other-type envelope holds no valid time goes to the validator.
    times = _times_ms(envs, MAX_TS_MS if max_ts_ms is None else max_ts_ms)
    if times is None:
        return None
    out = ParsedRecord()
    add = out.ticks.append
    new, tick = tuple.__new__, Tick  # Tick's own __new__ is a Python function: a third of the loop's time
    empty = _EMPTY_PAYLOAD
    for e, ts_ms in zip(envs, times, strict=True):
        if e.type != TICK_TYPE:
            out.ignored += 1
            continue
        p = e.payload or empty
        sandbox = e.sandbox_id or p.sandbox_id or ""
        worker, cell = e.worker_id or "", e.cell_id or ""
        add(
            new(
                tick,
                (e.id, e.org_id, sandbox, worker, cell, p.memory_mb or 0, p.cpu_count or 0, p.interval_s or 0, ts_ms),
            )
        )
    return out


def parse_record(raw: bytes | None, *, max_ts_ms: int | None = None) -> ParsedRecord:
    """Parse one Kafka record value: the good ticks, the rejected parts, the ignored count. Never raises.

    The result is exactly :func:`validate_record`'s (see there for ``max_ts_ms`` and the rejections): the
    msgspec fast path answers for a record of well-formed ticks, the validator for every other record.
    """
    if raw:
        fast = _parse_fast(raw, max_ts_ms)
        if fast is not None:
            return fast
    return validate_record(raw, max_ts_ms=max_ts_ms)


def locate_envelope(raw: bytes | None, tick_id: str, occurrence: int = 0) -> tuple[bytes, int | None]:
    """The bytes to dead-letter for tick ``tick_id`` of record ``raw``, and its array index.

    For a tick the parser accepted but the ledger later refused: inside an array record, the element whose
    ``id`` is ``tick_id`` (the ``occurrence``-th such, from 0; the last one if there are fewer), re-serialized,
    with its index; otherwise the whole record. Never raises.
    """
    data = raw or b""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data, None
    if isinstance(doc, list):
        found = [(i, env) for i, env in enumerate(doc) if isinstance(env, dict) and env.get("id") == tick_id]
        if found:
            i, env = found[min(occurrence, len(found) - 1)]
            return _element_bytes(env, data), i
    return data, None


def tick_fingerprint(tick: Tick) -> str:
    """A short, stable digest of a tick's payload (every field but its id): two copies of one id with
    different fingerprints are a conflicting duplicate. 16 hex characters (blake2b, 8 bytes)."""
    return hashlib.blake2b(orjson.dumps(tick[1:]), digest_size=8).hexdigest()
