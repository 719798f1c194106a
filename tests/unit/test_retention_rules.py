"""The retention rule (models.retention), its setting, and ingest's refusal of ticks before the dedup horizon."""

from __future__ import annotations

import orjson
import pytest

from infra.settings import load_settings
from models.errors import ConfigError
from models.retention import (
    DEFAULT_RETENTION_DAYS,
    MIN_RETENTION_DAYS,
    OLDER_THAN_RETENTION,
    before_horizon,
    retention_problem,
    retire_before_s,
)
from models.stripe_window import STRIPE_MAX_AGE_SECONDS
from streams.pipeline import prepare_ingest
from streams.records import RawRecord

NOW_MS = 1_790_000_000_000
HORIZON = 1_786_000_000 // 3600 * 3600


def test_the_default_is_just_past_stripes_window_and_shorter_ones_are_refused() -> None:
    assert MIN_RETENTION_DAYS * 86_400 >= STRIPE_MAX_AGE_SECONDS > (MIN_RETENTION_DAYS - 1) * 86_400
    assert DEFAULT_RETENTION_DAYS == MIN_RETENTION_DAYS + 1 == 36
    assert retention_problem(0) is None and retention_problem(MIN_RETENTION_DAYS) is None
    assert "Stripe" in (retention_problem(MIN_RETENTION_DAYS - 1) or "")
    assert retire_before_s(NOW_MS, 36) == NOW_MS // 1000 - 36 * 86_400


def test_the_setting() -> None:
    assert load_settings().billing.retention_days == DEFAULT_RETENTION_DAYS
    assert load_settings(billing={"retention_days": 0}).billing.retention_days == 0
    with pytest.raises(ConfigError, match="EDGEBILL_RETENTION_DAYS: must be 0"):
        load_settings(billing={"retention_days": 7})


def test_no_horizon_refuses_nothing_and_a_horizon_refuses_what_is_before_it() -> None:
    assert not before_horizon(-5_000, 0)  # even a tick before 1970 (the parser takes those)
    assert before_horizon(HORIZON * 1000 - 1, HORIZON) and not before_horizon(HORIZON * 1000, HORIZON)


def _env(tid: str, ts: str) -> dict[str, object]:
    return {"id": tid, "org_id": "o", "payload": {"interval_s": 20, "memory_mb": 1024}, "timestamp": ts}


def test_ingest_dead_letters_ticks_before_the_horizon_it_was_given() -> None:
    before, after = "2026-07-01T10:00:00Z", "2026-09-20T10:00:00Z"  # either side of HORIZON (2026-08-05)
    array = [_env("a1", after), _env("a2", before), _env("a3", after)]
    records = [
        RawRecord(0, 7, b"k", orjson.dumps(_env("s1", before))),
        RawRecord(1, 3, b"k", orjson.dumps(array)),
        RawRecord(1, 4, b"k", orjson.dumps(_env("s2", after))),
    ]
    batch = prepare_ingest(records, "usage-ticks", NOW_MS, HORIZON)
    assert [st.tick.id for st in batch.ticks] == ["a1", "a3", "s2"]
    assert [(d.headers["edgebill-source"], d.headers["edgebill-reason"]) for d in batch.dead] == [
        (b"usage-ticks/0/7", OLDER_THAN_RETENTION.encode()),
        (b"usage-ticks/1/3", OLDER_THAN_RETENTION.encode()),
    ]
    assert batch.dead[1].value == orjson.dumps(array[1]) and batch.dead[1].headers["edgebill-array-index"] == b"1"
    assert b"dedup horizon" in batch.dead[0].headers["edgebill-detail"]
    assert batch.counts["ticks.older_than_retention"] == 2
    assert batch.progress == {0: (7, batch.progress[0][1]), 1: (4, batch.progress[1][1])}
    # Without a horizon (none yet, or retention off) nothing is refused.
    assert len(prepare_ingest(records, "usage-ticks", NOW_MS).ticks) == 5
