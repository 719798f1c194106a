"""A backfill of closed hours is billed, the newest hour included, although no new tick arrives after it.

The worker's group skipped every other tick (they are in the topic, not in the ledger);
every hour closed and billed short. ``replay --apply`` writes the missing ticks; then, with no tick moving
the watermark (none at all, or one that no longer reaches the newest hour), the next close run re-closes
every hour that gained ticks, so the ledger ends exactly at what all the ticks derive, hour by hour. Until
then replay reports those hours ``pending_close`` (exit 4), never clean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_replay import (  # the replay tests' fleet and helpers, and their fixtures
    LIVE,
    NOW_S,
    _fleet,
    _publish,
    _replay,
    _ticks,
    _units,
    _write,
    make_ledger,  # noqa: F401 - a fixture
    truth,  # noqa: F401 - a fixture
)

from infra.replay import apply_missing
from infra.replay.report import EXIT_PENDING_CLOSE, PENDING_CLOSE

pytestmark = pytest.mark.integration

H = 3600


@pytest.mark.parametrize("watermark", ["none", "behind_the_newest_hour"])
def test_a_backfilled_newest_hour_is_closed_again_with_no_new_tick(
    db_url: str,
    kafka_bootstrap: str,
    create_topic: Callable[..., str],
    topic_name: str,
    make_ledger: Any,  # noqa: F811 - the fixture imported above
    truth: Any,  # noqa: F811 - the fixture imported above
    watermark: str,
) -> None:
    topic = create_topic(topic_name, 4)
    ticks = _ticks(_publish(kafka_bootstrap, topic, _fleet()))
    expected = truth(ticks)
    led = make_ledger(db_url)
    skipped = {st.tick.id for st in ticks[1::2]}  # every other tick: every hour and org loses some
    _write(led, ticks, skip=skipped)
    first = led.close(NOW_S * 1000, LIVE)
    hours = sorted({b for _, b, _ in expected})
    assert len(hours) == 3 and first.buckets == hours
    assert led.open_samples() == 0 and _units(led) != expected  # billed short

    result = _replay(led, kafka_bootstrap, topic)
    assert not result.report.clean and {st.tick.id for st in result.missing} == skipped
    applied = apply_missing(led, result)
    assert applied.inserted == len(result.missing) and led.open_samples() == applied.inserted
    before = _units(led)

    # Before the re-close, replay says the ticks are all there but not billed: pending_close, never clean.
    waiting = _replay(led, kafka_bootstrap, topic).report
    assert not waiting.clean and waiting.exit_code == EXIT_PENDING_CLOSE
    assert not waiting.missing_ids and not waiting.differing_keys
    pending = {(k.org_id, k.bucket_start, k.meter): k.pending_units for k in waiting.pending_keys}
    assert pending == {k: v - before.get(k, 0) for k, v in expected.items() if v != before.get(k, 0)}
    assert waiting.labels[PENDING_CLOSE] == len(pending) and hours[-1] in {b for _, b, _ in pending}
    assert waiting.to_wire()["counts"]["pending_close_keys"] == len(pending)

    # No tick after the backfill: the watermark is gone, or it stands before the newest hour.
    wm = None if watermark == "none" else (hours[1] + H + LIVE.grace_seconds) * 1000
    again = led.close(wm, LIVE)
    assert hours[-1] in again.buckets and again.corrections > 0
    assert led.open_samples() == 0
    assert _units(led) == expected  # every hour, the newest included, exactly what the ticks derive
    done = _replay(led, kafka_bootstrap, topic).report
    assert done.clean and done.exit_code == 0
