"""Parity end to end: `edgebill worker` on the session broker, the simulator's fleet and its scale events.

What must hold: with no injected drift the parity table is clean for every (org, bucket); each
injected drift kind is flagged for exactly the affected orgs and buckets; a sustained systemic drift is
one alert on the alerts topic; the parity endpoint refuses unsigned, stale and forged requests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from parity_stack import SECRET, ParityStack, parity_stack
from prometheus_client.parser import text_string_to_metric_families

from infra.devkit.simulator import FleetSpec, build_fleet, inject_drift, pick_drift_specs
from infra.kafka_io import publish_sync, read_topic_sync
from models.parity import ParityStatus

pytestmark = pytest.mark.integration

H = 3600


@pytest.fixture
def stack(kafka_bootstrap: str, tmp_path: Path) -> Iterator[ParityStack]:
    with parity_stack(kafka_bootstrap, tmp_path) as s:
        yield s


def _spec(seed: int, orgs: int) -> FleetSpec:
    now = int(time.time())
    return FleetSpec(orgs=orgs, hours=3, start=(now // H - 4) * H, seed=seed, free_orgs=1, duplicate_rate=0.1)


def test_clean_fleet_is_clean_for_every_org_and_bucket_and_the_endpoint_is_signed(stack: ParityStack) -> None:
    fleet = build_fleet(_spec(seed=21, orgs=6))
    n_scale = stack.publish_fleet(fleet)
    stack.start_worker()
    stack.wait_parity(len(fleet.ticks), n_scale)

    rows = stack.store.rows(0, 2**40)
    pro = {o.org_id for o in fleet.orgs if o.plan == "pro"}
    expected = {(t.org_id, t.ts_ms // 1000 // H * H) for t in fleet.ticks if t.org_id in pro}
    assert {(r.org_id, r.bucket_start) for r in rows} >= expected
    assert {r.org_id for r in rows} == pro
    bad = [(r.org_id, r.bucket_start, r.status.value, str(r.drift)) for r in rows if r.status is not ParityStatus.OK]
    assert bad == []

    # ---- GET /internal/usage-parity: the shape existing callers read, exact figures, signed requests only
    start, end = fleet.spec.start, fleet.spec.start + 3 * H
    path = f"/internal/usage-parity?from={start}&to={end}"
    r = stack.signed_get(path)
    assert r.status == 200, r.body
    body = orjson.loads(r.body)
    assert body["window"] == {"from": start, "to": end} and body["as_of"].endswith("Z")
    got = {o["org_id"]: o for o in body["orgs"]}
    assert set(got) == pro
    for org in pro:
        mbs = sum(t.memory_mb * t.interval_s for t in fleet.ticks if t.org_id == org)
        assert Decimal(str(got[org]["gb_seconds"])) == (Decimal(mbs) / 1024).quantize(Decimal("0.000001"))
        assert got[org]["samples"] == sum(1 for t in fleet.ticks if t.org_id == org)
        assert got[org]["status"] == "ok" and abs(got[org]["drift"]) < 0.02
        assert set(got[org]) == {"org_id", "gb_seconds", "samples", "cell_gb_seconds", "drift", "status"}
    now = int(time.time())
    refused = {
        "unsigned": stack.get(path),
        "stale": stack.signed_get(path, ts=now - 301),
        "future": stack.signed_get(path, ts=now + 301),
        "forged": stack.signed_get(path, secret="not-the-secret"),
        "other query": stack.get(
            path.replace(f"to={end}", f"to={end + H}"),
            {"X-Timestamp": str(now), "X-Signature": _sig(path, now)},
        ),
    }
    assert {k: v.status for k, v in refused.items()} == dict.fromkeys(refused, 401)
    assert orjson.loads(refused["stale"].body)["reason"] == "stale"
    assert stack.signed_get(f"/internal/usage-parity?from={end}&to={start}").status == 400
    assert stack.signed_get(f"/internal/usage-parity?from={end}&to={end}").status == 400
    assert stack.signed_get("/internal/usage-parity?from=x").status == 400

    # ---- /metrics, /healthz, and the dashboard is closed without its link
    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        m = stack.get("/metrics")
        assert m.status == 200 and m.headers["Content-Type"].startswith("text/plain")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(m.body.decode())
            for s in f.samples
        }

    # The parity gauges describe the newest *settled* bucket, known once a refresh has stored a watermark
    # (under load that can be a refresh or two after the table itself is complete).
    deadline = time.monotonic() + 30
    samples = scrape()
    while samples.get(("edgebill_parity_rows", (("status", "ok"),)), 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        samples = scrape()
    assert samples[("edgebill_ticks_ingested_total", ())] == len(fleet.ticks)
    assert samples[("edgebill_ticks_duplicate_total", ())] > 0
    assert samples[("edgebill_parity_rows", (("status", "ok"),))] > 0
    assert samples[("edgebill_parity_rows", (("status", "drift"),))] == 0
    lags = [v for (name, labels), v in samples.items() if name == "edgebill_consumer_lag"]
    assert lags and all(v == 0 for v in lags)
    assert stack.get("/healthz").status == 200
    assert stack.get("/dashboard").status == 401
    assert stack.get("/dashboard/data.json").status == 401


def _sig(path: str, ts: int) -> str:
    from models.parity import sign_request

    return sign_request(SECRET.encode(), ts, path)


def test_each_drift_kind_is_flagged_for_exactly_the_affected_orgs_and_buckets(stack: ParityStack) -> None:
    fleet = build_fleet(_spec(seed=5, orgs=10))
    at = fleet.spec.start + H
    # three orgs lose ticks over two consecutive buckets (a systemic, sustained drift: one alert) ...
    missing = pick_drift_specs(fleet, ["missing"] * 3, seed=5, buckets=2, at=at)
    # ... one org has a zombie worker, one a worker whose clock is 30 min behind
    others = pick_drift_specs(fleet, ["zombie", "skew"], seed=6, exclude=[s.org_id for s in missing])
    case = inject_drift(fleet, [*missing, *others])
    assert {s.kind for s in case.specs} == {"missing", "zombie", "skew"}
    n_scale = stack.publish_fleet(fleet, case.ticks)
    bad = [(b"sb_x", b"{not json"), (b"sb_y", orjson.dumps({"id": "r", "sandbox_id": "sb_y", "org_id": "o"}))]
    publish_sync(stack.bootstrap, stack.topic("sandbox-scale-events"), bad)
    stack.start_worker()
    stack.wait_parity(len(set(case.ticks)), n_scale + len(bad))

    rows = stack.store.rows(0, 2**40)
    flagged = {(r.org_id, r.bucket_start) for r in rows if r.status is not ParityStatus.OK}
    assert flagged == case.affected
    drifted = {s.org_id for s in case.specs}
    assert all(r.status is ParityStatus.OK for r in rows if r.org_id not in drifted)
    by_key = {(r.org_id, r.bucket_start): r for r in rows}
    for (org, b), delta in case.effect_mb_s.items():
        assert (by_key[(org, b)].drift > 0) == (delta > 0), (org, b)  # missing < 0 < zombie; skew moves usage

    # the alert: once, on the alerts topic, and in the log
    stack.wait(lambda: any(a["published_ms"] for a in stack.store.alerts()), 30, "the alert to be published")
    (alert,) = read_topic_sync(stack.bootstrap, stack.topic("billing-alerts"), idle_timeout=1.5)
    assert alert.key == f"billing_drift:{at}".encode()
    body = orjson.loads(alert.value or b"")
    assert body["first_bucket"] == at and set(body["buckets"][0]["orgs"]) >= {s.org_id for s in missing}
    assert stack.log_text().count(f"usage_parity: ALERT billing_drift:{at}") == 1
    assert "usage_parity: DRIFT" in stack.log_text()

    # bad scale records are dead-lettered with their reason; nothing crashed
    dlq = read_topic_sync(stack.bootstrap, stack.topic("sandbox-scale-events-dlq"), idle_timeout=1.0)
    assert sorted((d.headers["edgebill-reason"], d.value) for d in dlq) == sorted(
        [(b"not_json", bad[0][1]), (b"missing_memory_mb", bad[1][1])]
    )
    assert stack.ledger.counters()["scale.rejected"] == 2
    assert all(p.poll() is None for p in stack.procs)


def test_produce_publishes_the_cell_side_and_injects_drift(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import uuid

    from click.testing import CliRunner

    from infra.devkit.cli import cli

    for k in list(os.environ):
        if k.startswith("EDGEBILL_"):
            monkeypatch.delenv(k)
    prefix = f"p{uuid.uuid4().hex[:8]}."
    env = {"EDGEBILL_KAFKA_BOOTSTRAP": kafka_bootstrap, "EDGEBILL_KAFKA_TOPIC_PREFIX": prefix}
    args = ["produce", "--orgs", "4", "--hours", "2", "--seed", "3", "--drift", "zombie", "--drift", "missing"]
    r = CliRunner().invoke(cli, args, env=env)
    assert r.exit_code == 0, r.output
    assert "drift zombie on" in r.output and "drift missing on" in r.output and "affects" in r.output
    n_rows = int(r.output.split("published ")[-1].split(" cell rows")[0])
    scale = read_topic_sync(kafka_bootstrap, f"{prefix}sandbox-scale-events", idle_timeout=1.0)
    assert len(scale) >= 2 * n_rows  # each row open then closed, plus repeats
    assert all(r.key == orjson.loads(r.value or b"")["sandbox_id"].encode() for r in scale)
    r = CliRunner().invoke(cli, ["produce", "--drift", "bogus"], env=env)
    assert r.exit_code != 0 and "bogus" in r.output
