"""The cutover's pure rules: the per-bucket decision, the interlocks, and a SHADOW that only an explicit
false turns off."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.billing import Authority
from models.cutover import CutoverState, Decision, decide, interlock_problems, parse_shadow

H = 3600
T = 1_781_564_400  # an hour boundary


def _state(**kw: object) -> CutoverState:
    return CutoverState.model_validate(kw)


@pytest.mark.parametrize("text", ["0", "no", "off", "", "flase", "False ", "true", "1", "yes"])
def test_only_an_explicit_false_turns_shadow_off(text: str) -> None:
    expected = text.strip().lower() != "false"
    assert parse_shadow(text) is expected
    assert _state(shadow=text).shadow is expected


def test_shadow_defaults_on_and_a_non_text_value_keeps_it_on() -> None:
    assert CutoverState().shadow is True
    assert parse_shadow(None) is True and parse_shadow(0) is True and parse_shadow(False) is False


def test_decision_per_bucket_at_the_seam() -> None:
    live = _state(shadow=False, bill_from=T, authority="edge")
    assert decide(live, T - H) is Decision.SKIPPED_BEFORE_BILL_FROM
    assert decide(live, T) is Decision.BILLED
    shadow = _state(shadow=True, bill_from=T, authority="cell")
    assert decide(shadow, T - H) is Decision.SKIPPED_BEFORE_BILL_FROM
    assert decide(shadow, T) is Decision.SHADOW
    rolled = _state(shadow=False, bill_from=T, bill_until=T + 5 * H, authority="cell")
    assert decide(rolled, T + 4 * H) is Decision.BILLED
    assert decide(rolled, T + 5 * H) is Decision.SKIPPED_ROLLED_BACK


@given(st.booleans(), st.integers(0, 100), st.one_of(st.none(), st.integers(0, 100)), st.integers(0, 200))
def test_no_bucket_outside_the_billing_range_is_ever_billed(
    shadow: bool, frm: int, until: int | None, bucket: int
) -> None:
    s = _state(shadow="true" if shadow else "false", bill_from=frm * H, bill_until=None if until is None else until * H)
    d = decide(s, bucket * H)
    in_range = bucket * H >= s.bill_from and (s.bill_until is None or bucket * H < s.bill_until)
    assert (d is Decision.BILLED) == (in_range and not shadow)


def test_interlocks_refuse_what_could_double_bill_or_leave_a_gap() -> None:
    assert interlock_problems(_state(shadow=False, bill_from=T, authority="edge"), H) == []
    assert interlock_problems(_state(shadow=True, bill_from=T, authority="cell"), H) == []
    assert any("authority edge" in p for p in interlock_problems(_state(shadow=False, bill_from=T), H))
    assert any("bill_from > 0" in p for p in interlock_problems(_state(shadow=False, authority="edge"), H))
    assert any("not aligned" in p for p in interlock_problems(_state(bill_from=T + 60), H))
    assert any("billed by nobody" in p for p in interlock_problems(_state(shadow=True, authority="edge"), H))
    # After a rollback the edge still sends the hours in [T, R) while the cell bills from R.
    rolled = _state(shadow=False, bill_from=T, bill_until=T + 2 * H, authority="cell")
    assert interlock_problems(rolled, H) == []
    assert interlock_problems(_state(shadow=False, bill_from=T, bill_until=T - H, authority="cell"), H)


def test_the_wire_form_round_trips_and_a_change_has_a_stable_id() -> None:
    s = _state(
        shadow=False, bill_from=T, authority=Authority.EDGE, changed_at=1_781_560_000_123, by="ops", reason="soak ok"
    )
    again = CutoverState.from_json(s.to_json())
    assert again == s and again.change_id == s.change_id
    assert s.to_wire()["changed_at"] == "2026-06-15T21:46:40.123Z"
    assert _state(changed_at="2026-06-15T21:46:40.123Z").changed_at_ms == 1_781_560_000_123
