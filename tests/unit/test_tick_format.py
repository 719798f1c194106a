"""The tick format as a product surface: ``edgebill schema`` and the line check of ``produce --file``."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from infra.cli.ticks import EXAMPLE_ARRAY, EXAMPLE_TICK, check_tick_lines, tick_record_schema
from infra.devkit.cli import cli
from models.ticks import TickPayload, UsageTickEnvelope, parse_record

NOW_MS = 1_781_568_000_000  # 2026-06-16T00:00:00Z


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("EDGEBILL_"):
            monkeypatch.delenv(k)


def test_schema_is_the_models_with_every_field_described() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    env = doc["$defs"]["UsageTickEnvelope"]
    payload = doc["$defs"]["TickPayload"]
    assert set(env["properties"]) == set(UsageTickEnvelope.model_fields)
    assert set(payload["properties"]) == set(TickPayload.model_fields)
    assert env["required"] == ["id", "org_id", "timestamp"]
    for field in (*env["properties"].values(), *payload["properties"].values()):
        assert field.get("description"), field
    # The limits are the model's (and the parser's).
    assert env["properties"]["id"]["maxLength"] == 255
    assert payload["properties"]["interval_s"]["maximum"] == 86_400
    assert payload["properties"]["cpu_count"]["maximum"] == 1_000_000
    assert env["properties"]["timestamp"]["format"] == "date-time"
    # A record value is one envelope or a non-empty array of them.
    assert doc["oneOf"][1] == {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/UsageTickEnvelope"}}
    assert "DESIGN" not in result.output


def test_schema_envelope_only() -> None:
    result = CliRunner().invoke(cli, ["schema", "--envelope"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["title"] == "UsageTickEnvelope" and doc["properties"]["payload"]["$ref"] == "#/$defs/TickPayload"


def test_schema_examples_carry_every_field_and_are_billed_by_the_parser() -> None:
    doc = tick_record_schema()
    assert doc["examples"] == [EXAMPLE_TICK, EXAMPLE_ARRAY]
    for env in (EXAMPLE_TICK, *EXAMPLE_ARRAY):
        assert set(env) == set(UsageTickEnvelope.model_fields)
        assert set(env["payload"]) == set(TickPayload.model_fields)
        UsageTickEnvelope.model_validate(env)
    one = parse_record(orjson.dumps(EXAMPLE_TICK), max_ts_ms=NOW_MS)
    many = parse_record(orjson.dumps(EXAMPLE_ARRAY), max_ts_ms=NOW_MS)
    assert (len(one.ticks), one.rejected, len(many.ticks), many.rejected) == (1, [], 2, [])
    assert one.ticks[0].mb_seconds == 4096 * 20


GOOD = orjson.dumps(EXAMPLE_TICK)
LINES = [
    GOOD,  # 1
    b"",  # 2: blank lines are skipped
    b"not json at all",  # 3
    orjson.dumps([EXAMPLE_TICK, {**EXAMPLE_TICK, "id": ""}, {**EXAMPLE_TICK, "timestamp": "yesterday"}]),  # 4
    orjson.dumps({**EXAMPLE_TICK, "payload": {"interval_s": -20}}),  # 5
    orjson.dumps({**EXAMPLE_TICK, "type": "heartbeat"}),  # 6: another type, ignored (not bad)
    b"[]",  # 7
    orjson.dumps({**EXAMPLE_TICK, "timestamp": "2026-06-16T02:00:00Z"}),  # 8: 2 h ahead of NOW_MS
]


def test_check_tick_lines_reports_line_numbers_and_reasons() -> None:
    checked = check_tick_lines(LINES, NOW_MS)
    assert [str(b) for b in checked.bad] == [
        "line 3: not_json",
        "line 4 [1]: missing_id",
        "line 4 [2]: bad_timestamp",
        "line 5: negative_interval_s",
        "line 7: empty_array",
        "line 8: timestamp_in_future",
    ]
    assert (checked.ticks, checked.ignored, len(checked.messages)) == (2, 1, 7)
    assert checked.messages[0] == (b"org_7", GOOD)
    assert checked.messages[1] == (None, b"not json at all")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_produce_file_with_bad_lines_publishes_nothing_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ticks.jsonl"
    path.write_bytes(b"\n".join(LINES[:5]) + b"\n")
    # No broker: the check runs (and refuses) before anything would be published.
    monkeypatch.setenv("EDGEBILL_KAFKA_BOOTSTRAP", f"127.0.0.1:{_closed_port()}")
    result = CliRunner().invoke(cli, ["produce", "--file", str(path)])
    assert result.exit_code == 1, result.output
    assert f"{path}: line 3: not_json" in result.stderr
    assert f"{path}: line 4 [1]: missing_id" in result.stderr
    assert f"{path}: line 5: negative_interval_s" in result.stderr
    assert "4 tick(s) on 3 line(s) would be dead-lettered; nothing published" in result.stderr
    assert "published" not in result.stdout


def test_produce_file_good_lines_need_a_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ticks.jsonl"
    path.write_bytes(GOOD + b"\n")
    monkeypatch.setenv("EDGEBILL_KAFKA_BOOTSTRAP", f"127.0.0.1:{_closed_port()}")
    result = CliRunner().invoke(cli, ["produce", "--file", str(path)])
    assert result.exit_code == 2, result.output
    assert "cannot reach a Kafka broker" in result.stderr
