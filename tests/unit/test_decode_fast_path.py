"""The msgspec fast path of ``parse_record`` against the orjson validator it falls back to: the same ticks, the
same rejections (reasons, bytes, indexes) and the same ignored count on every input, whichever path answers.

The inputs are written as JSON *text* (not through a JSON encoder), so that they can hold what no encoder
writes: duplicate keys, lone surrogates, integers beyond 64 bits, NaN and Infinity, invalid UTF-8, raw
control characters, nesting past the decoders' limits, odd whitespace, trailing commas and garbage.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from infra.devkit.bench import tick_messages
from models.ticks import (
    MAX_CPUS,
    MAX_ID_LENGTH,
    MAX_INTERVAL_S,
    MAX_MEMORY_MB,
    ParsedRecord,
    UsageTickEnvelope,
    _parse_fast,
    locate_envelope,
    parse_record,
    parse_timestamp_ms,
    validate_record,
)

PROPS = settings(
    max_examples=600,
    deadline=2000,  # ms per example, generous for a loaded 2-core machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TS = "2026-06-15T23:00:12Z"
TS_MS = 1_781_564_412_000
# No limit, exactly the good timestamp (accepted), one ms before it (timestamp_in_future), far ahead.
MAX_TS = st.sampled_from([None, TS_MS, TS_MS - 1, 4_000_000_000_000])


def assert_same(raw: bytes, max_ts_ms: int | None) -> ParsedRecord:
    """parse_record == validate_record, value for value and type for type; notes which path answered."""
    want = validate_record(raw, max_ts_ms=max_ts_ms)
    got = parse_record(raw, max_ts_ms=max_ts_ms)
    assert got == want, raw[:300]
    assert [[type(v) for v in t] for t in got.ticks] == [[type(v) for v in t] for t in want.ticks]
    fast = _parse_fast(raw, max_ts_ms) if raw else None
    if currently_in_test_context():
        event("fast path" if fast is not None else "validator")
    if fast is not None:
        assert fast == want and not want.rejected
    return got


# ------------------------------------------------------------------------------------- JSON text strategies

_DEEP = [b"[" * n + b"]" * n for n in (2, 100, 1023, 1024, 1025, 3000)] + [b'{"a":' * 1100 + b"1" + b"}" * 1100]
_NUMBERS = [
    b"0",
    b"-0",
    b"1",
    b"-1",
    b"20",
    b"20.0",
    b"2e1",
    b"20.5",
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"0x10",
    b"1_0",
    str(MAX_INTERVAL_S).encode(),
    str(MAX_INTERVAL_S + 1).encode(),
    str(MAX_MEMORY_MB).encode(),
    str(MAX_MEMORY_MB + 1).encode(),
    str(MAX_CPUS).encode(),
    str(MAX_CPUS + 1).encode(),
    b"2147483648",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775808",
    b"-9223372036854775809",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1" + b"0" * 308,
    b"1" + b"0" * 400,
    b"-" + b"9" * 400,
    b"1e308",
    b"1e400",
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"nan",
    b"true",
    b"false",
    b"null",
    b"nul",
    b"True",
]
_STRINGS = [
    b'""',
    b'"a"',
    b'"\\ud800"',  # lone high surrogate
    b'"\\udc00"',  # lone low surrogate
    b'"a\\ud83dx"',
    b'"\\udc00\\ud800"',  # a pair in the wrong order
    b'"\\ud83d\\ude00"',  # a valid pair
    b'"\xf0\x9f\x98\x80"',
    b'"\xed\xa0\x80"',  # a surrogate encoded in UTF-8: not UTF-8
    b'"\xff"',
    b'"\xc3"',
    b'"\xc0\x80"',  # overlong NUL
    b'"\xf4\x90\x80\x80"',  # beyond U+10FFFF
    b'"\\u0000"',
    b'"a\\u0000b"',
    b'"\\\\u0000"',  # an escaped backslash, then "u0000": no NUL
    b'"a\x00"',  # raw NUL byte
    b'"a\x01"',
    b'"\t"',
    b'"\x7f"',
    b'"\\u00e9"',
    b'"\\/"',
    b'"\\x"',
    b'"unterminated',
    b'"' + b"x" * MAX_ID_LENGTH + b'"',
    b'"' + b"x" * (MAX_ID_LENGTH + 1) + b'"',
    b'"' + "é".encode() * MAX_ID_LENGTH + b'"',
    b'"' + "é".encode() * (MAX_ID_LENGTH + 1) + b'"',
    b'"' + "\U0001f600".encode() * MAX_ID_LENGTH + b'"',
    b'"' + b"\\ud83d\\ude00" * (MAX_ID_LENGTH + 1) + b'"',
    b'"' + TS.encode() + b'"',
    b'"2026-06-15T23:00:12.5+14:00"',
    b'"2026-06-15T23:00:12"',  # no offset
    b'"2026-02-30T00:00:00Z"',
    b'"1969-12-31T23:59:59Z"',
    b'"1970-01-01T00:00:00+14:00"',
    b'"9999-12-31T23:59:59-23:59"',
    b'"2026-06-15T23:00:12.1234567Z"',
    b'"2026-06-15 23:00:12Z"',
    b'"usage_tick"',
    b'"sandbox_started"',
]
_WHITESPACE = [b"", b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c", b"\xc2\xa0", b"\xef\xbb\xbf"]
# Mostly none, sometimes JSON's own, now and then what JSON does not allow.
_ws = st.one_of(st.just(b""), st.just(b""), st.sampled_from(_WHITESPACE[:5]), st.sampled_from(_WHITESPACE))
_KNOWN = ["id", "type", "sandbox_id", "org_id", "plan", "worker_id", "cell_id", "payload", "timestamp"]
_PAYLOAD_KNOWN = ["sandbox_id", "cost_cents", "interval_s", "memory_mb", "cpu_count"]


def _text(value: Any) -> bytes:
    return orjson.dumps(value)


_good_id = st.text(min_size=1, max_size=12).map(_text)
_scalar = st.one_of(
    st.sampled_from(_NUMBERS),
    st.sampled_from(_STRINGS),
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(_text),
    st.text(max_size=8).map(_text),
)
_any_value = st.one_of(
    _scalar,
    st.sampled_from(_DEEP),
    st.recursive(
        _scalar,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(lambda xs: b"[" + b",".join(xs) + b"]"),
            st.lists(st.tuples(st.sampled_from([*_STRINGS[:3], b'"k"', b'"id"']), inner), max_size=3).map(
                lambda kv: b"{" + b",".join(k + b":" + v for k, v in kv) + b"}"
            ),
        ),
        max_leaves=6,
    ),
)


def _obj(pairs: list[tuple[bytes, bytes]], ws: bytes) -> bytes:
    return b"{" + ws + b",".join(k + ws + b":" + ws + v for k, v in pairs) + ws + b"}"


@st.composite
def _payload_text(draw: st.DrawFn) -> bytes:
    good: dict[str, st.SearchStrategy[bytes]] = {
        "sandbox_id": _good_id,
        "cost_cents": st.integers(-5, 5).map(_text),
        "interval_s": st.integers(0, MAX_INTERVAL_S).map(_text),
        "memory_mb": st.integers(0, 65_536).map(_text),
        "cpu_count": st.integers(0, 64).map(_text),
    }
    pairs = []
    for key in draw(st.lists(st.sampled_from(_PAYLOAD_KNOWN), max_size=6)):  # repeats: duplicate keys
        value = draw(st.one_of(*[good[key]] * 8, _any_value))
        pairs.append((_text(key), value))
    if draw(st.integers(0, 20)) == 0:
        pairs.append((draw(st.sampled_from([b'"extra"', b'"\\u0069nterval_s"', b'"\\ud800"'])), draw(_any_value)))
    return _obj(pairs, draw(_ws))


@st.composite
def _envelope_text(draw: st.DrawFn) -> bytes:
    """A tick envelope written by hand: mostly plausible, with some fields replaced, repeated, or added."""
    good: dict[str, st.SearchStrategy[bytes]] = {
        "id": _good_id,
        "type": st.sampled_from([b'"usage_tick"', b'"usage_tick"', b'"sandbox_started"']),
        "sandbox_id": st.one_of(_good_id, st.just(b'""'), st.just(b"null")),
        "org_id": _good_id,
        "plan": st.sampled_from([b'"pro"', b"null"]),
        "worker_id": st.one_of(_good_id, st.just(b"null")),
        "cell_id": _good_id,
        "payload": st.one_of(_payload_text(), st.just(b"null")),
        "timestamp": st.sampled_from([b'"' + TS.encode() + b'"', b'"2026-06-15T23:00:12.123+02:00"']),
    }
    keys = ["id", "org_id", "timestamp", *draw(st.lists(st.sampled_from(_KNOWN), max_size=6))]
    keys = draw(st.permutations(keys))
    broken = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3]))  # how many values are drawn from anything at all
    pairs = []
    for i, key in enumerate(keys):
        value = draw(_any_value) if i < broken and draw(st.booleans()) else draw(good[key])
        pairs.append((_text(key), value))
    extra = draw(st.integers(0, 20))
    if extra == 0:
        pairs.append((b'"extra"', draw(_any_value)))
    elif extra == 1:
        pairs.append((draw(st.sampled_from([b'"\\u0069d"', b'"org\\u005fid"'])), draw(_good_id)))  # escaped names
    elif extra == 2:
        pairs.pop(draw(st.integers(0, len(pairs) - 1)))  # a required field missing
    return _obj(pairs, draw(_ws))


@st.composite
def _record_text(draw: st.DrawFn) -> bytes:
    """One envelope, or an array of them (sometimes with other values), with now and then a broken frame."""
    shape = draw(st.integers(0, 9))
    if shape < 4:
        body = draw(_envelope_text())
    else:
        items = draw(st.lists(st.one_of(*[_envelope_text()] * 8, _any_value), max_size=8))
        ws = draw(_ws)
        body = b"[" + ws + (b"," + ws).join(items) + ws + b"]"
    frame = draw(st.integers(0, 30))
    if frame == 0:
        body = draw(_ws) + body + draw(_ws)
    elif frame == 1:
        body = body[:-1] + b",]" if body.endswith(b"]") else body[:-1] + b",}"
    elif frame == 2:
        body += draw(st.sampled_from([b" x", b"}", b"]", b"\x00", b" {}"]))
    elif frame == 3:
        cut = draw(st.integers(0, len(body)))
        body = body[:cut]
    return body


# ----------------------------------------------------------------------------------------------- properties


@PROPS
@given(_record_text(), MAX_TS)
def test_hand_written_records_parse_the_same_on_both_paths(raw: bytes, max_ts_ms: int | None) -> None:
    assert_same(raw, max_ts_ms)


@PROPS
@given(st.binary(max_size=400), MAX_TS)
@example(b"", None)
@example(b"\xff\xfe", None)
@example(b"[]", None)
@example(b"null", None)
def test_any_bytes_parse_the_same_on_both_paths(raw: bytes, max_ts_ms: int | None) -> None:
    assert_same(raw, max_ts_ms)


@PROPS
@given(_record_text(), st.integers(0, 400), st.sampled_from(_NUMBERS + _STRINGS + _WHITESPACE + [b"\\", b",", b'"']))
def test_records_with_tokens_spliced_in_parse_the_same(raw: bytes, at: int, junk: bytes) -> None:
    assert_same(raw[:at] + junk + raw[at:], None)


_plain_envelope = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=MAX_ID_LENGTH + 2),
        "org_id": st.text(min_size=1, max_size=20),
        # Beside good times: offset-free, a 1969 local year on the 1970 side of the epoch, a 1970 local year
        # before the epoch, and one a character too long: the fast path reads a whole array's times at once.
        "timestamp": st.sampled_from(
            [
                TS,
                "2026-06-15T23:00:12.999-05:30",
                "not a time",
                "2026-06-15T23:00:12.000",
                "1969-12-31T23:30:00-01:00",
                "1970-01-01T00:30:00+01:00",
                "2026-06-15T23:00:12.12345678901234567891Z",
            ]
        ),
    },
    optional={
        "type": st.sampled_from(["usage_tick", "other"]),
        "sandbox_id": st.one_of(st.none(), st.text(max_size=MAX_ID_LENGTH + 2)),
        "worker_id": st.text(max_size=20),
        "cell_id": st.text(max_size=20),
        "plan": st.one_of(st.none(), st.just("pro")),
        "payload": st.fixed_dictionaries(
            {},
            optional={
                "interval_s": st.integers(-2, MAX_INTERVAL_S + 2),
                "memory_mb": st.one_of(st.integers(-2, MAX_MEMORY_MB + 2), st.just(1024.0)),
                "cpu_count": st.integers(-2, MAX_CPUS + 2),
                "cost_cents": st.integers(-(2**63), 2**63 - 1),
                "sandbox_id": st.text(max_size=MAX_ID_LENGTH + 2),
            },
        ),
    },
)


@PROPS
@given(st.one_of(_plain_envelope, st.lists(_plain_envelope, min_size=0, max_size=120)), MAX_TS)
def test_encoder_written_records_parse_the_same(doc: Any, max_ts_ms: int | None) -> None:
    """Documents an encoder writes (orjson escapes nothing it need not): every limit on both sides of its edge."""
    assert_same(orjson.dumps(doc), max_ts_ms)


# ---------------------------------------------------------------------------------------------- named cases


def _env(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "sb_42:3:1187",
        "type": "usage_tick",
        "sandbox_id": "sb_42",
        "org_id": "org_7",
        "plan": "pro",
        "worker_id": "w-3",
        "cell_id": "eu-1",
        "payload": {"sandbox_id": "sb_42", "cost_cents": 10, "interval_s": 20, "memory_mb": 4096, "cpu_count": 2},
        "timestamp": TS,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()
_GOOD = orjson.dumps(_env())[1:-1]  # the good envelope's fields, to write variants of by hand


def _with(field: bytes) -> bytes:
    """The good envelope with one more ``"name":value`` text appended (a duplicate key overrides)."""
    return b"{" + _GOOD + b"," + field + b"}"


# Every reason the validator gives, each from an envelope the fast path must leave to it.
_REASONS: dict[str, Any] = {
    "not_an_envelope": 5,
    "bad_type": _env(type=7),
    "missing_id": _env(id=""),
    "id_too_long": _env(id="x" * (MAX_ID_LENGTH + 1)),
    "id_contains_nul": _env(id="a\x00"),
    "missing_org_id": _env(org_id=_DROP),
    "org_id_too_long": _env(org_id="é" * (MAX_ID_LENGTH + 1)),
    "org_id_contains_nul": _env(org_id="\x00"),
    "bad_timestamp": _env(timestamp="2026-06-15T23:00:12"),
    "timestamp_in_future": _env(timestamp="2026-06-15T23:00:12.001Z"),
    "bad_payload": _env(payload=[1]),
    "bad_interval_s": _env(payload={"interval_s": 20.5}),
    "negative_interval_s": _env(payload={"interval_s": -1}),
    "interval_s_out_of_range": _env(payload={"interval_s": MAX_INTERVAL_S + 1}),
    "bad_memory_mb": _env(payload={"memory_mb": "1024"}),
    "negative_memory_mb": _env(payload={"memory_mb": -1.0}),
    "memory_mb_out_of_range": _env(payload={"memory_mb": 2**64 - 1}),
    "bad_cpu_count": _env(payload={"cpu_count": True}),
    "negative_cpu_count": _env(payload={"cpu_count": -(2**63)}),
    "cpu_count_out_of_range": _env(payload={"cpu_count": MAX_CPUS + 1}),
    "sandbox_id_too_long": _env(sandbox_id=None, payload={"sandbox_id": "s" * (MAX_ID_LENGTH + 1)}),
    "sandbox_id_contains_nul": _env(sandbox_id="s\x00"),
    "worker_id_too_long": _env(worker_id="\U0001f600" * (MAX_ID_LENGTH + 1)),
    "worker_id_contains_nul": _env(worker_id="\x00w"),
    "cell_id_too_long": _env(cell_id="c" * (MAX_ID_LENGTH + 1)),
    "cell_id_contains_nul": _env(cell_id="c\x00"),
}


@pytest.mark.parametrize("reason", sorted(_REASONS))
def test_every_rejection_reason_alone_and_inside_an_array(reason: str) -> None:
    bad = _REASONS[reason]
    one = assert_same(orjson.dumps(bad), TS_MS)
    assert [r.reason for r in one.rejected] == [reason]
    many = assert_same(orjson.dumps([_env(id="a"), bad, _env(id="b"), _env(type="sandbox_started")]), TS_MS)
    assert [t.id for t in many.ticks] == ["a", "b"] and many.ignored == 1
    assert [(r.reason, r.index) for r in many.rejected] == [(reason, 1)]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"[]",
        b"null",
        b"{}",
        b"[[]]",
        b"\xef\xbb\xbf" + orjson.dumps(_env()),  # a byte order mark
        orjson.dumps(_env()) + b"\x00",
        orjson.dumps(_env()).replace(b"sb_42:3:1187", b"\\ud800"),  # lone surrogate in the id
        orjson.dumps(_env()).replace(b"org_7", b"org_7\\udfff"),
        orjson.dumps(_env()).replace(b"sb_42:3:1187", b"\xed\xa0\x80"),  # surrogate in UTF-8
        orjson.dumps(_env()).replace(b"org_7", b"org_\xff"),  # not UTF-8
        orjson.dumps(_env()).replace(b"eu-1", b"eu-\x01"),  # raw control character
        _with(b'"id":"second"'),  # duplicate key: the last one counts
        _with(b'"id":5'),
        b'{"id":5,' + _GOOD + b"}",
        _with(b'"payload":{"interval_s":1,"interval_s":86401}'),
        _with(b'"payload":{"interval_s":86401,"interval_s":1}'),
        _with(b'"payload":null'),
        _with(b'"type":null'),
        _with(b'"type":"usage_tick","type":"other"'),
        _with(b'"\\u0069d":"escaped-name"'),
        _with(b'"payload":{"memory_mb":18446744073709551616}'),  # beyond 64 bits: a float in orjson
        _with(b'"payload":{"memory_mb":' + b"9" * 400 + b"}"),  # beyond a double
        _with(b'"payload":{"cost_cents":' + b"9" * 400 + b"}"),  # not billed, but not JSON orjson reads
        _with(b'"payload":{"cost_cents":18446744073709551615}'),
        _with(b'"payload":{"memory_mb":1024.0}'),
        _with(b'"payload":{"memory_mb":1e3}'),
        _with(b'"payload":{"memory_mb":-0}'),
        _with(b'"payload":{"memory_mb":NaN}'),
        _with(b'"payload":{"memory_mb":Infinity}'),
        _with(b'"payload":{"memory_mb":-Infinity}'),
        _with(b'"payload":{"memory_mb":1e400}'),
        _with(b'"extra":' + b"[" * 1025 + b"]" * 1025),  # deeper than orjson reads
        _with(b'"extra":' + b"[" * 1000 + b"]" * 1000),
        _with(b'"plan":' + b"[" * 5000 + b"]" * 5000),
        _with(b'"extra":"\\ud800"'),  # an unread field orjson refuses
        _with(b'"extra":"\xff"'),
        _with(b'"sandbox_id":"\\\\u0000"'),  # an escaped backslash: no NUL, but looks like one
        _with(b'"timestamp":"2026-06-15T23:00:12.1234567Z"'),
        _with(b'"timestamp":"+2026-06-15T23:00:12Z"'),
        orjson.dumps([_env(id=f"t{i}") for i in range(3)]).replace(b"}]", b"},]"),  # trailing comma
        b"[" + b",".join([orjson.dumps(_env(id=f"t{i}")) for i in range(3)] + [b"\\ud800"]) + b"]",
    ],
)
def test_named_inputs_parse_the_same(raw: bytes) -> None:
    for max_ts in (None, TS_MS, TS_MS - 1):
        assert_same(raw, max_ts)


@pytest.mark.parametrize("depth", [253, 254, 255, 1022])
def test_elements_nested_deeper_than_orjson_writes_are_rejected_without_raising(depth: int) -> None:
    deep = b"[" * depth + b"]" * depth
    raw = b"[" + orjson.dumps(_env(id="a")) + b"," + deep + b"]"
    out = assert_same(raw, None)
    assert [t.id for t in out.ticks] == ["a"]
    ((reason, bad, index),) = [(r.reason, r.raw, r.index) for r in out.rejected]
    assert (reason, index) == ("not_an_envelope", 1)
    assert bad == (deep if depth < 255 else raw)  # written back when orjson can, else the whole record
    tick = _with(b'"extra":' + deep)
    assert locate_envelope(b"[" + tick + b"]", "sb_42:3:1187") == (
        (orjson.dumps(orjson.loads(tick)), 0) if depth < 254 else (b"[" + tick + b"]", 0)
    )


def test_huge_arrays_parse_the_same_with_one_bad_element_anywhere() -> None:
    good = [_env(id=f"t{i}") for i in range(20_000)]
    out = assert_same(orjson.dumps(good), None)
    assert len(out.ticks) == 20_000
    for at in (0, 9_999, 19_999):
        doc: list[Any] = list(good)
        doc[at] = _env(id=f"t{at}", payload={"memory_mb": -1})
        out = assert_same(orjson.dumps(doc), None)
        assert len(out.ticks) == 19_999 and [(r.reason, r.index) for r in out.rejected] == [("negative_memory_mb", at)]


def test_the_fast_path_answers_for_well_formed_records() -> None:
    """What producers send takes the fast path (else it would only ever be tested, never used)."""
    for _, raw in tick_messages(300, 1) + tick_messages(1000, 100):
        assert _parse_fast(raw, None) is not None
        assert_same(raw, None)
    model = UsageTickEnvelope.model_validate(_env())
    assert _parse_fast(model.to_json(), None) == validate_record(model.to_json())
    partial = {"id": "a", "org_id": "o", "timestamp": TS}  # old producers: no dimensions, no sandbox
    assert _parse_fast(orjson.dumps(partial), None) == validate_record(orjson.dumps(partial))
    other = orjson.dumps([_env(), _env(type="sandbox_started")])
    assert _parse_fast(other, None) == validate_record(other) == ParsedRecord(validate_record(other).ticks, [], 1)


@given(st.datetimes(timezones=st.timezones()), st.sampled_from(["seconds", "milliseconds", "microseconds"]))
def test_timestamps_are_exact_milliseconds(dt: Any, spec: str) -> None:
    from datetime import UTC, datetime, timedelta

    text = dt.isoformat(timespec=spec)
    got = parse_timestamp_ms(text)
    parsed = datetime.fromisoformat(text) if 20 <= len(text) <= 40 else None
    if parsed is None or parsed.tzinfo is None or not 1970 <= parsed.year <= 9999:
        assert got is None
    else:
        assert got == (parsed - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
