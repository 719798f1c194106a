"""Time and money math: buckets, GB-s, meters, value strings, the rounding carry."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.billing import (
    ID_SCHEME,
    LEGACY_TIER_METERS,
    MAX_IDENTIFIER_LENGTH,
    ORG_HASH_MARK,
    UNIFIED_METER,
    BillingMode,
    bucket_start,
    carry_rounded_delta,
    format_value,
    gb_seconds,
    meter_amounts,
    meter_row_id,
    org_token,
    round_value,
    short_org,
    significant_digits,
)

EXAMPLE_HOUR = 1781564400  # 2026-06-15T23:00:00Z: the hour of the README's example tick (hour aligned)


def test_bucket_of_the_readme_example_tick() -> None:
    # "timestamp": "2026-06-15T23:00:12Z" counts whole in the bucket [23:00, 00:00)
    assert bucket_start(1781564412000, 3600) == EXAMPLE_HOUR
    assert bucket_start(EXAMPLE_HOUR * 1000 - 1, 3600) == EXAMPLE_HOUR - 3600
    assert EXAMPLE_HOUR % 3600 == 0


@given(st.integers(-(10**15), 10**15), st.sampled_from([60, 300, 900, 3600, 86400]))
def test_bucket_contains_its_tick_and_is_epoch_aligned(ts_ms: int, size: int) -> None:
    start = bucket_start(ts_ms, size)
    assert start % size == 0
    assert start * 1000 <= ts_ms < (start + size) * 1000


def test_gb_seconds_is_exact() -> None:
    assert gb_seconds(4096, 20) == Decimal(80)  # a typical tick: 4 GB for 20 s (producers tick every 20 s)
    assert gb_seconds(3000, 21) == Decimal("61.5234375")
    assert gb_seconds(0, 20) == 0 and gb_seconds(1024, 0) == 0


def test_meters_per_mode() -> None:
    unified = meter_amounts(BillingMode.UNIFIED, 3000, 21, 63000)
    assert unified is not None and (unified.meter, unified.units) == (UNIFIED_METER, 63000)
    legacy = meter_amounts(BillingMode.LEGACY, 4096, 40, 4096 * 40)
    assert legacy is not None and (legacy.meter, legacy.units) == ("sandbox_compute_sandbox_4gb", 40)
    assert meter_amounts(BillingMode.LEGACY, 2048, 40, 2048 * 40) is None  # not a legacy tier
    assert sorted(LEGACY_TIER_METERS) == [1024, 4096, 8192, 16384, 32768, 65536]
    assert all(m.startswith("sandbox_compute_sandbox_") for m in LEGACY_TIER_METERS.values())


def test_row_ids_and_stripe_identifier_limit() -> None:
    assert meter_row_id("org_7", EXAMPLE_HOUR, UNIFIED_METER) == f"org_7:{EXAMPLE_HOUR}:{UNIFIED_METER}"
    assert meter_row_id("org_7", EXAMPLE_HOUR, UNIFIED_METER, 2).endswith(":r2")
    assert len(meter_row_id("o" * 50, EXAMPLE_HOUR, "sandbox_compute_sandbox_64gb", 99)) <= 100


@given(
    st.text(min_size=1, max_size=255),
    st.integers(0, 4_000_000_000),
    st.sampled_from([UNIFIED_METER, *LEGACY_TIER_METERS.values()]),
    st.integers(0, 99_999),
)
def test_no_identifier_exceeds_100_characters_and_each_is_a_pure_function(
    org: str, start: int, meter: str, revision: int
) -> None:
    got = meter_row_id(org, start, meter, revision)
    assert len(got) <= MAX_IDENTIFIER_LENGTH
    assert got == meter_row_id(org, start, meter, revision)  # stable: every process, every restart
    tail = f":{start}:{meter}" + (f":r{revision}" if revision else "")
    assert got.endswith(tail)
    if len(org) + len(tail) <= MAX_IDENTIFIER_LENGTH and ORG_HASH_MARK not in org:
        assert got == org + tail  # identifiers that fit keep their plain form


def test_long_org_ids_get_a_short_form_unique_per_org_bucket_meter_and_revision() -> None:
    a, b = "a" * 255, "a" * 254 + "b"  # the same readable prefix, different orgs
    ids = {
        meter_row_id(org, EXAMPLE_HOUR + k * 3600, meter, rev)
        for org in (a, b, "x" * 60)
        for k in range(3)
        for meter in (UNIFIED_METER, "sandbox_compute_sandbox_64gb")
        for rev in (0, 1, 12)
    }
    assert len(ids) == 3 * 3 * 2 * 3
    assert all(len(i) <= MAX_IDENTIFIER_LENGTH for i in ids)
    assert meter_row_id(a, EXAMPLE_HOUR, UNIFIED_METER).startswith(a[:24] + "~")
    assert meter_row_id(a, EXAMPLE_HOUR, UNIFIED_METER) != meter_row_id(b, EXAMPLE_HOUR, UNIFIED_METER)


METERS = [UNIFIED_METER, *LEGACY_TIER_METERS.values()]


def test_an_org_whose_id_is_another_orgs_short_form_gets_its_own_identifiers() -> None:
    v = "org_" + "v" * 120
    twin = short_org(v)  # 49 characters: its plain identifier would fit
    for meter in METERS:
        for rev in (0, 1, 7):
            assert meter_row_id(v, EXAMPLE_HOUR, meter, rev) != meter_row_id(twin, EXAMPLE_HOUR, meter, rev)
    assert meter_row_id(v, EXAMPLE_HOUR, UNIFIED_METER) != meter_row_id(short_org(v), EXAMPLE_HOUR, UNIFIED_METER)
    # what scheme 1 wrote: the very pair collided
    assert meter_row_id(v, EXAMPLE_HOUR, UNIFIED_METER, scheme=1) == meter_row_id(
        twin, EXAMPLE_HOUR, UNIFIED_METER, scheme=1
    )


@pytest.mark.parametrize(
    ("org", "meter", "revision", "written"),
    [
        ("org_7", UNIFIED_METER, 0, "org_7:1717200000:sandbox_compute_sandbox_overage"),
        ("org_7", "sandbox_compute_sandbox_64gb", 3, "org_7:1717200000:sandbox_compute_sandbox_64gb:r3"),
        ("Ünïcødé-org", UNIFIED_METER, 0, "Ünïcødé-org:1717200000:sandbox_compute_sandbox_overage"),
        ("o" * 53, UNIFIED_METER, 0, "o" * 53 + ":1717200000:sandbox_compute_sandbox_overage"),
        (
            ("org-" + "0123456789abcdef" * 16)[:255],
            UNIFIED_METER,
            0,
            "org-0123456789abcdef0123~56246641fd1cf1b8de2bc669:1717200000:sandbox_compute_sandbox_overage",
        ),
        (
            ("org-" + "0123456789abcdef" * 16)[:255],
            "sandbox_compute_sandbox_64gb",
            3,
            "org-0123456789abcdef0123~56246641fd1cf1b8de2bc669:1717200000:sandbox_compute_sandbox_64gb:r3",
        ),
    ],
)
def test_an_org_id_without_the_mark_keeps_the_identifiers_scheme_1_wrote(
    org: str, meter: str, revision: int, written: str
) -> None:
    # the identifiers the release before scheme 2 computed (pinned): only org ids holding "~" change
    assert meter_row_id(org, 1717200000, meter, revision) == written
    assert meter_row_id(org, 1717200000, meter, revision, scheme=1) == written


@given(st.text(min_size=1, max_size=255), st.sampled_from(METERS), st.integers(0, 99))
def test_the_schemes_differ_only_for_org_ids_holding_the_mark(org: str, meter: str, revision: int) -> None:
    new = meter_row_id(org, EXAMPLE_HOUR, meter, revision)
    old = meter_row_id(org, EXAMPLE_HOUR, meter, revision, scheme=1)
    assert (new == old) or ORG_HASH_MARK in org
    assert ID_SCHEME == 2


# Adversarial org ids: the characters the identifier is built from (the separator, the mark, hex digits,
# "r" and digits), any unicode (lone surrogates included), up to 255 characters, and ids derived from
# one another: prefixes, another org's short form (with every prefix length), an id with a tail glued on.
_ALPHABET = st.sampled_from([*":~r0123456789abcdef_-", "é", "~", "\u200b", "\ud800", "𝔬"])
_ORG = st.one_of(
    st.text(_ALPHABET, min_size=1, max_size=255),
    st.text(st.characters(codec=None), min_size=1, max_size=255),
    st.text(_ALPHABET, min_size=200, max_size=255),
)


@st.composite
def _adversarial_orgs(draw: st.DrawFn) -> list[str]:
    base = draw(st.lists(_ORG, min_size=1, max_size=5))
    out = set(base)
    for org in base:
        out.add(short_org(org))
        out.add(short_org(org, draw(st.integers(0, 30))))
        out.add(org_token(org, draw(st.integers(25, 100))))
        out.add(org[: draw(st.integers(1, len(org)))])
        out.add(f"{org}:{EXAMPLE_HOUR}:{UNIFIED_METER}")
        out.add(f"{org}:{EXAMPLE_HOUR}")
        out.add((org + ORG_HASH_MARK + org)[:255])
    return sorted(o for o in out if o and len(o) <= 255)


@given(_adversarial_orgs(), st.lists(st.sampled_from(METERS), min_size=1, max_size=3, unique=True))
def test_no_two_distinct_rows_share_an_identifier(orgs: list[str], meters: list[str]) -> None:
    buckets = (EXAMPLE_HOUR, EXAMPLE_HOUR + 3600, 0, -3600)
    revisions = (0, 1, 2, 10, 12)
    seen: dict[str, tuple[str, int, str, int]] = {}
    for org in orgs:
        for b in buckets:
            for meter in meters:
                for rev in revisions:
                    got = meter_row_id(org, b, meter, rev)
                    assert len(got) <= MAX_IDENTIFIER_LENGTH
                    assert seen.setdefault(got, (org, b, meter, rev)) == (org, b, meter, rev), got


@pytest.mark.parametrize("meter", ["a:b", "r1", "r12", ""])
def test_a_meter_name_that_could_not_be_read_back_is_refused(meter: str) -> None:
    with pytest.raises(ValueError):
        meter_row_id("org_7", EXAMPLE_HOUR, meter)
    with pytest.raises(ValueError):
        meter_row_id("org_7", EXAMPLE_HOUR, UNIFIED_METER, -1)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("80"), "80"),
        (Decimal("61.5234375"), "61.523438"),  # half up at the 7th decimal
        (Decimal("0.0000004"), "0"),
        (Decimal("1E+3"), "1000"),
        (Decimal("123456789.123456"), "123456789.123456"),
    ],
)
def test_value_strings(value: Decimal, text: str) -> None:
    assert format_value(value) == text


def test_value_with_more_than_15_significant_digits_is_refused() -> None:
    with pytest.raises(ValueError, match="15 significant digits"):
        format_value(Decimal("1234567890.123456"))
    assert significant_digits(Decimal("1234567890.12345")) == 15
    assert significant_digits(Decimal("100.000")) == 3


def test_carry_rounds_the_running_total_once() -> None:
    # 3000 MB x 21 s = 61.5234375 GB-s per tick; per-row rounding would send 61.523438 each time.
    units = 3000 * 21
    sent = Decimal(0)
    values = []
    for i in range(1, 9):
        v, sent = carry_rounded_delta(units * (i - 1), sent, units, 1024)
        values.append(v)
    assert sum(values) == round_value(units * 8, 1024) == Decimal("492.1875")
    assert values[0] == Decimal("61.523438") and values[1] == Decimal("61.523437")


@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=60), st.sampled_from([1, 1024]))
def test_sum_of_sent_values_equals_exact_total_rounded_once(chunks: list[int], divisor: int) -> None:
    sent = Decimal(0)
    total = 0
    parts = []
    for units in chunks:
        v, sent = carry_rounded_delta(total, sent, units, divisor)
        total += units
        assert v >= 0
        parts.append(v)
    exact = Fraction(total, divisor)
    assert sum(parts) == sent == round_value(total, divisor)
    assert abs(Fraction(str(sent)) - exact) <= Fraction(1, 2 * 10**6)
