"""Fuzzing the ingest parser (hypothesis, bounded): no input crashes it, and whatever it accepts, every
database can store; whatever it rejects becomes a dead letter that fits a producer request."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.ticks import INT_LIMITS, STRING_LIMITS, Tick, parse_record
from streams.pipeline import prepare_ingest
from streams.records import DEAD_LETTER_MAX_BYTES, RawRecord

FUZZ = settings(
    max_examples=400,
    deadline=2000,  # ms per example, generous for a loaded 2-core machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Strings with what databases choke on: NUL, other controls, astral characters, long runs.
_weird_text = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.sampled_from(["\x00", "a", "é", "\U0001f600", "\n", "\\", '"']), max_size=300),
    st.builds(lambda n, c: c * n, st.integers(250, 260), st.sampled_from(["x", "é", "\x00"])),
)
_numbers = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 2**31, 2**31 - 1, 2**63 - 1, 20.0, 20.5, 1e300]),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, _weird_text)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_weird_text, inner, max_size=4)),
    max_leaves=12,
)
_timestamps = st.one_of(
    st.sampled_from(["2026-06-15T23:00:12Z", "2026-06-15T23:00:12.5+14:00", "9999-12-31T23:59:59-23:59"]),
    st.sampled_from(["1970-01-01T00:00:00+14:00", "2026-02-30T00:00:00Z", "yesterday", ""]),
    _scalars,
)
_payload = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "interval_s": _numbers,
            "memory_mb": _numbers,
            "cpu_count": _numbers,
            "sandbox_id": _scalars,
            "extra": _json,
        },
    ),
    _json,
)
_ids = st.text(min_size=1, max_size=40)
_wild_envelope = st.fixed_dictionaries(
    {  # mostly plausible, so that the accepting path is fuzzed as much as the refusing one
        "id": st.one_of(_ids, _ids, _weird_text, _scalars),
        "org_id": st.one_of(_ids, _ids, _weird_text, _scalars),
        "timestamp": st.one_of(st.just("2026-06-15T23:00:12Z"), _timestamps),
    },
    optional={
        "type": st.one_of(st.just("usage_tick"), _scalars),
        "sandbox_id": st.one_of(_weird_text, _scalars),
        "worker_id": st.one_of(_weird_text, _scalars),
        "cell_id": st.one_of(_weird_text, _scalars),
        "plan": _scalars,
        "payload": _payload,
    },
)
# A plausible envelope with up to two fields replaced by anything: most are accepted, the rest are refused
# for one precise reason.
_plausible = st.fixed_dictionaries(
    {
        "id": _ids,
        "org_id": _ids,
        "timestamp": st.sampled_from(["2026-06-15T23:00:12Z", "2026-06-15T23:00:12.123+02:00"]),
        "sandbox_id": _ids,
        "worker_id": _ids,
        "cell_id": _ids,
        "payload": st.fixed_dictionaries(
            {"interval_s": st.integers(0, 86_400), "memory_mb": st.integers(0, 65_536), "cpu_count": st.integers(0, 64)}
        ),
    }
)
_envelope = st.builds(
    lambda base, over: {**base, **over},
    _plausible,
    st.dictionaries(
        st.sampled_from(["id", "org_id", "timestamp", "sandbox_id", "worker_id", "cell_id", "payload", "type"]),
        st.one_of(_weird_text, _scalars, _payload),
        max_size=2,
    ),
)
_documents = st.one_of(_wild_envelope, st.lists(st.one_of(_envelope, _wild_envelope, _json), max_size=6), _json)


def _storable(t: Tick) -> None:
    for name, limit in STRING_LIMITS.items():
        v = getattr(t, name)
        assert isinstance(v, str) and len(v) <= limit and "\x00" not in v, (name, v)
        v.encode("utf-8")  # no lone surrogate: every driver can encode it
    for name, limit in INT_LIMITS.items():
        v = getattr(t, name)
        assert type(v) is int and v <= limit, (name, v)
        if name != "ts_ms":
            assert v >= 0, (name, v)
    assert t.id and t.org_id


def _check(raw: bytes) -> None:
    out = parse_record(raw, max_ts_ms=4_000_000_000_000)
    for t in out.ticks:
        _storable(t)
    for r in out.rejected:
        assert isinstance(r.reason, str) and r.reason and r.reason.isascii()
    batch = prepare_ingest([RawRecord(0, 42, b"k", raw)], "usage-ticks", 1_790_000_000_000)
    assert len(batch.ticks) == len(out.ticks) and len(batch.dead) == len(out.rejected)
    for d in batch.dead:
        assert len(d.value) + len(d.key or b"") <= DEAD_LETTER_MAX_BYTES
        assert d.headers["edgebill-source"] == b"usage-ticks/0/42"


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes(raw: bytes) -> None:
    _check(raw)


@FUZZ
@given(_documents)
def test_any_json_document(doc: Any) -> None:
    _check(orjson.dumps(doc))


@FUZZ
@given(_documents, st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_json_with_bytes_spliced_in(doc: Any, at: int, junk: bytes) -> None:
    raw = orjson.dumps(doc)
    _check(raw[:at] + junk + raw[at:])


@FUZZ
@given(st.one_of(_envelope, st.lists(_envelope, min_size=1, max_size=5)))
def test_any_envelope_or_array_of_envelopes(doc: Any) -> None:
    _check(orjson.dumps(doc))
