"""The operator's commands against a running stack: ``produce --file --as-is`` -> the worker dead-letters the bad
lines -> ``edgebill dlq`` lists them by reason with the offsets of the records they came from;
``check-config --probe`` reaches the broker, the ledger and Stripe."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from infra.devkit.cli import cli
from infra.kafka_io import read_to_end_sync

pytestmark = pytest.mark.integration


def _invoke(stack: Any, *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env=stack.env)


def test_dlq_lists_dead_letters_by_reason_with_source_offsets(stack: Any, tmp_path: Path) -> None:
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7200))
    good = {"id": "sb:0:1", "org_id": "o1", "payload": {"interval_s": 20, "memory_mb": 1024}, "timestamp": ts}
    bad_elem = {**good, "id": "sb:0:3", "payload": {"interval_s": -5}}
    lines = [
        orjson.dumps(good),
        b"{this is not json",
        orjson.dumps([{**good, "id": "sb:0:2"}, bad_elem]),
        orjson.dumps({"id": "sb:0:4", "payload": {}, "timestamp": ts}),  # no org_id
        orjson.dumps({**good, "id": "sb:0:5", "timestamp": "not a time"}),
    ]
    path = tmp_path / "ticks.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    refused = _invoke(stack, "produce", "--file", str(path))
    assert refused.exit_code == 1 and "nothing published" in refused.stderr
    published = _invoke(stack, "produce", "--file", str(path), "--as-is")
    assert published.exit_code == 0, published.output
    assert "published 5 message(s)" in published.stdout and "4 the worker will dead-letter" in published.stdout

    source = read_to_end_sync(stack.bootstrap, stack.topic("usage-ticks"), max_wait=20)
    offset_of = {r.value: f"{stack.topic('usage-ticks')}/{r.partition}/{r.offset}" for r in source.records}
    assert len(offset_of) == 5

    stack.start_worker()
    stack.wait(lambda: stack.ledger.counters().get("records.read", 0) >= 5, 60, "the records to be read")
    deadline = time.monotonic() + 30
    while True:
        r = _invoke(stack, "dlq", "--json", "--topic", "ticks")
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        if len(doc["dead_letters"]) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    dlq_topic = stack.topic("usage-ticks-dlq")
    assert doc["topics"][dlq_topic]["count"] == 4
    assert doc["topics"][dlq_topic]["by_reason"] == {
        "not_json": 1,
        "negative_interval_s": 1,
        "missing_org_id": 1,
        "bad_timestamp": 1,
    }
    got = {(d["reason"], d["source"], d["array_index"]) for d in doc["dead_letters"]}
    assert got == {
        ("not_json", offset_of[lines[1]], None),
        ("negative_interval_s", offset_of[lines[2]], 1),
        ("missing_org_id", offset_of[lines[3]], None),
        ("bad_timestamp", offset_of[lines[4]], None),
    }
    for d in doc["dead_letters"]:
        assert d["topic"] == dlq_topic and d["time"].endswith("Z") and d["truncated_from"] is None
        assert d["source_topic"] == stack.topic("usage-ticks") and isinstance(d["source_offset"], int)
    not_json = next(d for d in doc["dead_letters"] if d["reason"] == "not_json")
    assert not_json["preview"] == "{this is not json" and not_json["bytes"] == len(lines[1])

    human = _invoke(stack, "dlq", "--reason", "negative_interval_s")
    assert human.exit_code == 0, human.output
    assert f"{dlq_topic}: 1 dead letter(s)" in human.stdout
    assert "  negative_interval_s: 1" in human.stdout
    assert offset_of[lines[2]] in human.stdout
    # The other dead-letter topics are listed too (the worker created them empty).
    every = _invoke(stack, "dlq")
    assert every.exit_code == 0, every.output
    assert f"{stack.topic('org-policy-dlq')}: 0 dead letter(s)" in every.stdout
    assert f"{stack.topic('sandbox-scale-events-dlq')}: 0 dead letter(s)" in every.stdout
    assert stack.ledger.sample_totals() == {"o1": (2, 40960)}


def test_dlq_of_a_topic_that_does_not_exist(make_stack: Any) -> None:
    stack = make_stack()
    r = _invoke(stack, "dlq", "--topic", "policy")
    assert r.exit_code == 0, r.output
    assert "no such topic" in r.stdout


def test_check_config_probe_reaches_broker_ledger_and_stripe(stack: Any) -> None:
    r = _invoke(stack, "check-config", "--probe")
    assert r.exit_code == 0, r.output
    for name in ("broker", "database", "stripe"):
        assert f"probe {name}: ok" in r.stdout
    bad_key = CliRunner().invoke(
        cli, ["check-config", "--probe"], env={**stack.env, "EDGEBILL_STRIPE_API_KEY": "sk_test_"}
    )
    assert bad_key.exit_code == 2
    assert "refused EDGEBILL_STRIPE_API_KEY" in bad_key.stderr


def test_org_set_then_show_reads_what_the_worker_stored(stack: Any) -> None:
    r = _invoke(stack, "org", "set", "org_cli", "--plan", "pro", "--effective-at", "2026-01-01T00:00:00Z")
    assert r.exit_code == 0, r.output
    stack.start_worker()
    stack.wait(lambda: bool(stack.ledger.policies("org_cli")), 60, "the policy")
    shown = _invoke(stack, "org", "show", "org_cli")
    assert shown.exit_code == 0, shown.output
    assert "2026-01-01T00:00:00Z" in shown.stdout and "org_cli" in shown.stdout
