"""Envelope parsing: one envelope or an array, old producers, every rejection reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.ticks import Tick, UsageTickEnvelope, locate_envelope, parse_record, parse_timestamp_ms


def env(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "sb_42:3:1187",
        "type": "usage_tick",
        "sandbox_id": "sb_42",
        "org_id": "org_7",
        "plan": "pro",
        "worker_id": "w-3",
        "cell_id": "eu-1",
        "payload": {"sandbox_id": "sb_42", "cost_cents": 10, "interval_s": 20, "memory_mb": 4096, "cpu_count": 2},
        "timestamp": "2026-06-15T23:00:12Z",
    }
    base.update(over)
    return base


def test_the_readme_example_parses_to_an_exact_tick() -> None:
    out = parse_record(orjson.dumps(env()))
    assert out.rejected == [] and out.ignored == 0
    assert out.ticks == [
        Tick(
            id="sb_42:3:1187",
            org_id="org_7",
            sandbox_id="sb_42",
            worker_id="w-3",
            cell_id="eu-1",
            memory_mb=4096,
            cpu_count=2,
            interval_s=20,
            ts_ms=1781564412000,
        )
    ]
    assert out.ticks[0].mb_seconds == 81920  # 80 GB-s


def test_array_of_envelopes_keeps_good_and_rejects_bad_individually() -> None:
    bad = env(id="")
    out = parse_record(orjson.dumps([env(id="a"), bad, env(id="b"), env(type="sandbox_started")]))
    assert [t.id for t in out.ticks] == ["a", "b"]
    assert out.ignored == 1
    assert len(out.rejected) == 1
    assert out.rejected[0].reason == "missing_id"
    assert out.rejected[0].index == 1
    assert orjson.loads(out.rejected[0].raw) == bad


def test_old_producer_without_dimensions_reads_as_zero() -> None:
    e = env(payload={"sandbox_id": "sb_42", "cost_cents": 10})
    (tick,) = parse_record(orjson.dumps(e)).ticks
    assert (tick.memory_mb, tick.interval_s, tick.cpu_count) == (0, 0, 0)
    (tick,) = parse_record(orjson.dumps({k: v for k, v in env().items() if k != "payload"})).ticks
    assert tick.mb_seconds == 0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json at all", "not_json"),
        (b"", "empty_record"),
        (b"[]", "empty_array"),
        (b'"a string"', "not_an_envelope"),
        (orjson.dumps(env(id=None)), "missing_id"),
        (orjson.dumps(env(org_id="")), "missing_org_id"),
        (orjson.dumps(env(timestamp="yesterday")), "bad_timestamp"),
        (orjson.dumps(env(timestamp="2026-06-15T23:00:12")), "bad_timestamp"),  # no offset
        (orjson.dumps(env(payload={"interval_s": -20, "memory_mb": 1024})), "negative_interval_s"),
        (orjson.dumps(env(payload={"interval_s": 20, "memory_mb": -1})), "negative_memory_mb"),
        (orjson.dumps(env(payload={"interval_s": "20"})), "bad_interval_s"),
        (orjson.dumps(env(payload={"interval_s": 20.5})), "bad_interval_s"),
        (orjson.dumps(env(payload={"interval_s": True})), "bad_interval_s"),
        (orjson.dumps(env(payload={"interval_s": 10**9})), "interval_s_out_of_range"),
        (orjson.dumps(env(payload="oops")), "bad_payload"),
        (orjson.dumps(env(id="x" * 256)), "id_too_long"),
        (orjson.dumps(env(type=5)), "bad_type"),
    ],
)
def test_rejections_carry_reason_and_original_bytes(raw: bytes, reason: str) -> None:
    out = parse_record(raw)
    assert out.ticks == []
    assert [r.reason for r in out.rejected] == [reason]
    assert out.rejected[0].raw == raw


def test_future_timestamp_rejected_only_when_a_limit_is_given() -> None:
    raw = orjson.dumps(env(timestamp="2030-01-01T00:00:00Z"))
    assert parse_record(raw).ticks
    out = parse_record(raw, max_ts_ms=1781564412000)
    assert [r.reason for r in out.rejected] == ["timestamp_in_future"]


def test_timestamps_with_offsets_and_fractions() -> None:
    assert parse_timestamp_ms("2026-06-15T23:00:12.345Z") == 1781564412345
    assert parse_timestamp_ms("2026-06-16T01:00:12+02:00") == 1781564412000
    assert parse_timestamp_ms("1781564412") is None
    assert parse_timestamp_ms(1781564412) is None


def test_integral_float_dimensions_are_accepted() -> None:
    (tick,) = parse_record(orjson.dumps(env(payload={"interval_s": 20.0, "memory_mb": 1024.0}))).ticks
    assert (tick.interval_s, tick.memory_mb) == (20, 1024)


_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:_-", min_size=1, max_size=40)


@given(
    tick_id=_ids,
    org=_ids,
    memory=st.integers(0, 65536),
    interval=st.integers(0, 86_400),
    cpus=st.integers(0, 64),
    offset_s=st.integers(0, 10 * 365 * 86_400),
    ms=st.integers(0, 999),
)
def test_fast_parser_agrees_with_the_pydantic_wire_model(
    tick_id: str, org: str, memory: int, interval: int, cpus: int, offset_s: int, ms: int
) -> None:
    ts = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(seconds=offset_s, milliseconds=ms)
    model = UsageTickEnvelope.model_validate(
        {
            "id": tick_id,
            "org_id": org,
            "sandbox_id": "sb",
            "payload": {"interval_s": interval, "memory_mb": memory, "cpu_count": cpus},
            "timestamp": ts,
        }
    )
    (fast,) = parse_record(model.to_json()).ticks
    assert fast == model.to_tick()


@given(st.integers(0, 200 * 365 * 86_400_000), st.booleans())
def test_fast_timestamp_path_agrees_with_datetime(ms: int, with_millis: bool) -> None:
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    text = dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{dt.microsecond // 1000:03d}" if with_millis else "") + "Z"
    assert parse_timestamp_ms(text) == (ms if with_millis else ms // 1000 * 1000)


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-30T00:00:00Z",
        "2026-06-15T24:00:00Z",
        "2026-06-15T23:60:00Z",
        "2026-06-15T23:00:6xZ",
        "2026-06-15T23:00:00.12xZ",
        "2026-06-15T23:00:00.1234",
    ],
)
def test_fast_timestamp_path_rejects_what_datetime_rejects(text: str) -> None:
    assert parse_timestamp_ms(text) is None


@pytest.mark.parametrize("depth", [254, 255, 1022])
def test_an_element_nested_deeper_than_orjson_writes_is_rejected_without_raising(depth: int) -> None:
    """orjson reads 1024 levels but writes 254: such an element is dead-lettered with the whole record."""
    deep = b"[" * depth + b"]" * depth
    raw = b"[" + orjson.dumps(env(id="a")) + b"," + deep + b"]"
    out = parse_record(raw)
    assert [t.id for t in out.ticks] == ["a"]
    assert [(r.reason, r.index) for r in out.rejected] == [("not_an_envelope", 1)]
    assert out.rejected[0].raw == (deep if depth < 255 else raw)
    tick = orjson.dumps(env(id="b"))[:-1] + b',"extra":' + deep + b"}"
    assert locate_envelope(b"[" + tick + b"]", "b")[1] == 0
