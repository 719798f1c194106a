"""What one record can do to ingestion: the parser refuses what any database would, dead letters stay
bounded, database errors are told apart (the record's fault or the database's)."""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson
import psycopg
import pytest
import sqlalchemy.exc
from pydantic import ValidationError
from sqlalchemy import BigInteger, String

from models.parity import ScaleEvent, parse_scale_event
from models.policy import OrgPolicy
from models.ticks import (
    INT_LIMITS,
    STRING_LIMITS,
    Tick,
    UsageTickEnvelope,
    locate_envelope,
    parse_record,
)
from sinks.schema import cell_intervals, meter_events, org_policies
from streams.pipeline import describe_error, is_record_error
from streams.records import (
    DEAD_LETTER_KEY_MAX_BYTES,
    DEAD_LETTER_MAX_BYTES,
    RawRecord,
    bound_dead_letter,
    dead_letter,
)

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def env(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "sb_42:3:1187",
        "sandbox_id": "sb_42",
        "org_id": "org_7",
        "worker_id": "w-3",
        "cell_id": "eu-1",
        "payload": {"interval_s": 20, "memory_mb": 4096, "cpu_count": 2},
        "timestamp": "2026-06-15T23:00:12Z",
    }
    base.update(over)
    return base


# ------------------------------------------------------------------- the parser's limits = the schema's


def test_every_tick_field_has_a_limit_that_the_columns_it_reaches_can_hold() -> None:
    # A tick is stored in a batch (msgpack: any string, 64-bit integers); its strings reach these columns
    # once aggregated or compared: the org in meter rows, sandbox / worker / cell beside the cell side's.
    reaches = {
        "org_id": meter_events.c.org_id,
        "sandbox_id": cell_intervals.c.sandbox_id,
        "worker_id": cell_intervals.c.worker_id,
        "cell_id": cell_intervals.c.cell_id,
        "memory_mb": cell_intervals.c.memory_mb,
    }
    assert set(STRING_LIMITS) | set(INT_LIMITS) == set(Tick._fields)
    for name, limit in STRING_LIMITS.items():
        col = reaches.get(name, meter_events.c.id)  # the id reaches no column: it keeps the common limit
        assert isinstance(col.type, String) and col.type.length is not None, name
        assert limit == col.type.length, (name, limit, col.type.length)  # varchar(n) counts characters
    for name, limit in INT_LIMITS.items():
        col = reaches.get(name)
        top = INT64_MAX if col is None or isinstance(col.type, BigInteger) else INT32_MAX
        assert 0 < limit <= top, (name, limit)


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"sandbox_id": "s" * 10_000}, "sandbox_id_too_long"),
        ({"sandbox_id": None, "payload": {"sandbox_id": "s" * 256}}, "sandbox_id_too_long"),
        ({"worker_id": "w" * 256}, "worker_id_too_long"),
        ({"cell_id": "c" * 256}, "cell_id_too_long"),
        ({"org_id": "o" * 256}, "org_id_too_long"),
        ({"org_id": "org\x007"}, "org_id_contains_nul"),
        ({"id": "\x00"}, "id_contains_nul"),
        ({"sandbox_id": "sb\x00"}, "sandbox_id_contains_nul"),
        ({"sandbox_id": "", "payload": {"sandbox_id": "\x00"}}, "sandbox_id_contains_nul"),
        ({"worker_id": "w\x00"}, "worker_id_contains_nul"),
        ({"cell_id": "\x00c"}, "cell_id_contains_nul"),
        ({"payload": {"cpu_count": INT32_MAX + 1}}, "cpu_count_out_of_range"),
        ({"payload": {"memory_mb": INT64_MAX + 1}}, "memory_mb_out_of_range"),
        ({"payload": {"interval_s": 2**64 - 1}}, "interval_s_out_of_range"),
    ],
)
def test_values_a_database_would_refuse_are_rejected_with_their_reason(over: dict[str, object], reason: str) -> None:
    raw = orjson.dumps(env(**over))
    out = parse_record(raw)
    assert out.ticks == []
    assert [(r.reason, r.raw) for r in out.rejected] == [(reason, raw)]
    # The pydantic wire model refuses the same envelopes.
    with pytest.raises(ValidationError):
        UsageTickEnvelope.model_validate_json(raw).to_tick()


def test_limits_are_inclusive_and_unicode_counts_characters() -> None:
    e = env(sandbox_id="é" * 255, org_id="o" * 255, worker_id="w" * 255, cell_id="c" * 255, id="i" * 255)
    (tick,) = parse_record(orjson.dumps(e)).ticks
    assert len(tick.sandbox_id) == 255 and len(orjson.dumps(e)) > 255 * 5
    assert UsageTickEnvelope.model_validate(e).to_tick() == tick


def test_an_array_keeps_its_good_elements_around_a_nul() -> None:
    raw = orjson.dumps([env(id="a"), env(id="b", org_id="o\x00"), env(id="c")])
    out = parse_record(raw)
    assert [t.id for t in out.ticks] == ["a", "c"]
    assert [(r.reason, r.index) for r in out.rejected] == [("org_id_contains_nul", 1)]


def test_locate_envelope_finds_the_element_of_a_tick() -> None:
    arr = [env(id="a"), env(id="b", memory=1), env(id="c")]
    assert locate_envelope(orjson.dumps(arr), "b") == (orjson.dumps(arr[1]), 1)
    single = orjson.dumps(env(id="z"))
    assert locate_envelope(single, "z") == (single, None)
    assert locate_envelope(b"\xff not json", "z") == (b"\xff not json", None)
    assert locate_envelope(None, "z") == (b"", None)


def _model_limits(model: type[Any]) -> dict[str, tuple[int | None, int | None]]:
    """field (by alias) -> (max_length, le) from a pydantic model's constraints."""
    out = {}
    for name, f in model.model_fields.items():
        max_len = next((m.max_length for m in f.metadata if getattr(m, "max_length", None) is not None), None)
        le = next((m.le for m in f.metadata if getattr(m, "le", None) is not None), None)
        out[name] = (max_len, le)
    return out


@pytest.mark.parametrize(
    ("model", "table", "columns"),
    [
        (
            OrgPolicy,
            org_policies,
            {
                "org_id": "org_id",
                "stripe_customer_id": "stripe_customer_id",
                "stripe_subscription_id": "stripe_subscription_id",
                "billing_provider": "billing_provider",
                "effective_at_ms": "effective_ms",
            },
        ),
        (
            ScaleEvent,
            cell_intervals,
            {
                f: f
                for f in (
                    "id",
                    "sandbox_id",
                    "org_id",
                    "cell_id",
                    "worker_id",
                    "memory_mb",
                    "cpu_percent",
                    "disk_mb",
                    "started_ms",
                    "ended_ms",
                )
            },
        ),
    ],
)
def test_policy_and_scale_event_limits_fit_their_ledger_columns(
    model: Any, table: Any, columns: dict[str, str]
) -> None:
    limits = _model_limits(model)
    for field_name, col_name in columns.items():
        col = table.c[col_name]
        max_len, le = limits[field_name]
        if isinstance(col.type, String):
            assert max_len is not None and max_len <= (col.type.length or 0), (field_name, max_len, col.type)
        else:
            top = INT64_MAX if isinstance(col.type, BigInteger) else INT32_MAX
            assert le is not None and le <= top, (field_name, le, col.type)


def test_policies_and_scale_events_refuse_what_a_database_would() -> None:
    base = {"org_id": "o", "plan": "pro", "effective_at": 0}
    for over in ({"org_id": "o\x00"}, {"billing_provider": "x" * 33}, {"effective_at": 1e300}):
        with pytest.raises(ValueError):
            OrgPolicy.from_json(orjson.dumps(base | over))
    ev = {"id": "e", "sandbox_id": "s", "org_id": "o", "memory_mb": 1, "started_at": 0}
    assert isinstance(parse_scale_event(orjson.dumps(ev)), ScaleEvent)
    for over, reason in [
        ({"sandbox_id": "s\x00"}, "bad_sandbox_id"),
        ({"cpu_percent": INT32_MAX + 1}, "bad_cpu_percent"),
        ({"disk_mb": INT64_MAX + 1}, "bad_disk_mb"),
        ({"started_at": 1e300}, "bad_started_at"),
    ]:
        assert parse_scale_event(orjson.dumps(ev | over)) == reason


# ---------------------------------------------------------------------------- bounded dead letters


def test_a_dead_letter_of_any_size_fits_a_producer_request() -> None:
    big = b"x" * (5 * 1024 * 1024)
    d = dead_letter(RawRecord(3, 86, b"org", big), "usage-ticks", "not_json", big)
    assert len(d.value) + len(d.key or b"") <= DEAD_LETTER_MAX_BYTES < 1_000_000 - 10_000
    assert d.value == big[: len(d.value)]
    assert d.headers["edgebill-truncated"] == str(len(big)).encode()
    assert d.headers["edgebill-reason"] == b"not_json"
    assert d.headers["edgebill-source"] == b"usage-ticks/3/86"
    small = dead_letter(RawRecord(0, 1, None, b"{}"), "usage-ticks", "empty_array", b"[]", 4)
    assert small.value == b"[]" and "edgebill-truncated" not in small.headers
    assert small.headers["edgebill-array-index"] == b"4"


def test_a_huge_key_is_cut_too_and_cutting_again_keeps_the_original_size() -> None:
    key = b"k" * 50_000
    d = dead_letter(RawRecord(0, 7, key, b"v"), "t", "not_json", b"v" * 600_000, detail="x" * 5000)
    assert len(d.key or b"") == DEAD_LETTER_KEY_MAX_BYTES
    assert d.headers["edgebill-key-truncated"] == b"50000"
    assert len(d.headers["edgebill-detail"]) == 1000
    smaller = bound_dead_letter(d, 16 * 1024)
    assert len(smaller.value) + len(smaller.key or b"") <= 16 * 1024
    assert smaller.headers["edgebill-truncated"] == b"600000"


# ------------------------------------------------------------------- the record's fault, or the database's


def _wrapped(orig: Exception, cls: type[sqlalchemy.exc.DBAPIError]) -> Exception:
    return cls("INSERT ...", {}, orig)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),
        psycopg.errors.StringDataRightTruncation("value too long for type character varying(255)"),
        psycopg.errors.NumericValueOutOfRange('value "1099511627776" is out of range for type integer'),
        psycopg.errors.CheckViolation("new row violates check constraint"),
        sqlite3.IntegrityError("NOT NULL constraint failed"),
        OverflowError("Python int too large to convert to SQLite INTEGER"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        _wrapped(sqlite3.IntegrityError("refused"), sqlalchemy.exc.IntegrityError),
        _wrapped(psycopg.DataError("bad"), sqlalchemy.exc.DataError),
    ],
)
def test_data_errors_are_the_records_fault(exc: Exception) -> None:
    assert is_record_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("connection refused"),
        psycopg.errors.SerializationFailure("could not serialize access"),
        psycopg.errors.DiskFull("could not extend file"),
        psycopg.errors.UndefinedTable('relation "usage_samples" does not exist'),
        psycopg.InterfaceError("the connection is closed"),
        sqlite3.OperationalError("database is locked"),
        _wrapped(sqlite3.OperationalError("disk I/O error"), sqlalchemy.exc.OperationalError),
        sqlalchemy.exc.TimeoutError("QueuePool limit reached"),
        ConnectionResetError(),
        RuntimeError("anything unknown"),
    ],
)
def test_an_unavailable_or_broken_database_is_not_the_records_fault(exc: Exception) -> None:
    assert not is_record_error(exc)


def test_describe_error_names_the_drivers_error() -> None:
    exc = _wrapped(psycopg.errors.StringDataRightTruncation("value too long\nDETAIL: x"), sqlalchemy.exc.DataError)
    assert describe_error(exc) == "StringDataRightTruncation: value too long"
