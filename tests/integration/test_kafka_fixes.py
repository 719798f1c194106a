"""infra.kafka_fixes: each Tansu defect is shown on the raw client, then shown fixed.

The "defect exists" assertions only hold on Tansu, so they skip when the session broker is not
the embedded one (EDGEBILL_KAFKA_BOOTSTRAP / testcontainers); the "fixed" assertions run anywhere.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from infra import kafka_fixes
from infra.kafka_admin import ensure_topics

pytestmark = pytest.mark.integration

ONLY_TANSU = "the defect is Tansu's and the session broker is {kind}, not the embedded Tansu"

# ---------------------------------------------------------------------------------------- helpers


@pytest.fixture
def fixes() -> Iterator[Callable[..., None]]:
    """``fixes(true_end_offsets=bool, leave_group_gen0=bool)``; the global state is restored after."""
    toggles = {
        "true_end_offsets": (kafka_fixes.apply_true_end_offsets, kafka_fixes.revert_true_end_offsets),
        "leave_group_gen0": (kafka_fixes.apply_leave_group_gen0, kafka_fixes.revert_leave_group_gen0),
    }
    before = kafka_fixes.status()

    def set_state(**wanted: bool) -> None:
        for name, on in wanted.items():
            apply, revert = toggles[name]
            apply() if on else revert()
        assert {k: v for k, v in kafka_fixes.status().items() if k in wanted} == wanted

    yield set_state
    set_state(**before)


async def _produce_batches(bootstrap: str, topic: str, batches: list[list[tuple[bytes, bytes]]]) -> None:
    """Each inner list goes to partition 0 as exactly one record batch."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for records in batches:
            batch = producer.create_batch()
            for key, value in records:
                assert batch.append(key=key, value=value, timestamp=None) is not None
            batch.close()
            await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()


@pytest.fixture(scope="module")
def two_batches(kafka_bootstrap: str) -> str:
    """A 2-partition topic; partition 0 holds a 1000-record batch then a 10-record batch (0..1009)."""
    topic = f"test-batches-{uuid.uuid4().hex}"
    ensure_topics(kafka_bootstrap, {topic: 2})
    big = [(b"k", b"%d" % i) for i in range(1000)]
    small = [(b"k", b"%d" % i) for i in range(1000, 1010)]
    asyncio.run(_produce_batches(kafka_bootstrap, topic, [big, small]))
    return topic


async def _raw_offsets(bootstrap: str, tp: TopicPartition) -> tuple[int, int]:
    """(ListOffsets latest, Fetch high watermark) for ``tp`` with plain aiokafka."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.assign([tp])
        consumer.seek(tp, 0)
        await consumer.getmany(tp, timeout_ms=2000)
        return int(end), int(consumer.highwater(tp))
    finally:
        await consumer.stop()


# ------------------------------------------------------------------- (a) short end_offsets on Tansu


def test_raw_end_offsets_are_short_on_tansu(kafka_bootstrap: str, kafka_kind: str, two_batches: str) -> None:
    end, highwater = asyncio.run(_raw_offsets(kafka_bootstrap, TopicPartition(two_batches, 0)))
    assert highwater == 1010
    if kafka_kind != "embedded":
        pytest.skip(ONLY_TANSU.format(kind=kafka_kind))
    assert end == 1001  # Tansu answers ListOffsets(latest) with the last batch's base offset + 1


def test_true_end_offsets(kafka_bootstrap: str, two_batches: str) -> None:
    from faust.types import TP

    tp0, tp1 = TopicPartition(two_batches, 0), TopicPartition(two_batches, 1)

    async def via_consumer() -> dict[TopicPartition, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
        await consumer.start()
        try:
            return await kafka_fixes.true_end_offsets(consumer, [tp0, tp1])
        finally:
            await consumer.stop()

    assert asyncio.run(via_consumer()) == {tp0: 1010, tp1: 0}
    by_bootstrap = asyncio.run(kafka_fixes.true_end_offsets(kafka_bootstrap, [TP(two_batches, 0)]))
    assert by_bootstrap == {tp0: 1010}
    assert type(next(iter(by_bootstrap))) is TopicPartition
    assert asyncio.run(kafka_fixes.true_end_offsets(kafka_bootstrap, [])) == {}


def test_faust_highwaters_patch(
    kafka_bootstrap: str, kafka_kind: str, two_batches: str, fixes: Callable[..., None]
) -> None:
    """Drive ``AIOKafkaConsumerThread._highwaters`` (what Faust's recovery calls) with a real consumer."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    from faust.types import TP

    tp = TP(two_batches, 0)

    async def highwaters() -> dict[Any, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
        await consumer.start()
        thread: Any = SimpleNamespace(  # the two attributes _highwaters uses
            _ensure_consumer=lambda: consumer, consumer=SimpleNamespace(in_transaction=False)
        )
        try:
            return dict(await AIOKafkaConsumerThread._highwaters(thread, [tp]))
        finally:
            await consumer.stop()

    original = AIOKafkaConsumerThread.__dict__["_highwaters"]
    fixes(true_end_offsets=True)
    assert kafka_fixes.apply_true_end_offsets() is False  # idempotent
    fixed = asyncio.run(highwaters())
    assert fixed == {tp: 1010}
    assert type(next(iter(fixed))) is TP
    fixes(true_end_offsets=False)
    assert AIOKafkaConsumerThread.__dict__["_highwaters"] is original
    unfixed = asyncio.run(highwaters())
    if kafka_kind != "embedded":
        pytest.skip(ONLY_TANSU.format(kind=kafka_kind))
    assert unfixed == {tp: 1001}


_FAUST_APP = """
import json, sys
import faust

bootstrap, app_id, mode = sys.argv[1:4]
if mode == "fixed":
    from infra import kafka_fixes
    kafka_fixes.apply_true_end_offsets()

app = faust.App(
    app_id,
    broker=f"kafka://{bootstrap}",
    store="memory://",
    topic_partitions=1,
    key_serializer="json",
    value_serializer="json",
    broker_session_timeout=2,
    broker_heartbeat_interval=0.2,
    broker_rebalance_timeout=2,
    web_enabled=False,
    datadir=f"{app_id}-data",
)
table = app.Table("totals", default=float, partitions=1)
source = app.topic(f"{app_id}-src", partitions=1)


@app.agent(source)
async def consume(stream):
    async for _ in stream:
        pass


@table.on_recover
async def report():
    print("RECOVERED " + json.dumps(dict(table.items()), sort_keys=True), flush=True)


sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
app.main()
"""


def _recovered(kafka_bootstrap: str, tmp_path: Path, modes: list[str]) -> dict[str, dict[str, float]]:
    """Seed one changelog per mode (orgB: 5 updates, then orgA: 10 updates, one batch each), start
    a Faust worker per mode concurrently, return what each worker's table recovered."""
    script = tmp_path / "recovery_app.py"
    script.write_text(_FAUST_APP)
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        for mode in modes:
            app_id = f"test-recovery-{mode}-{uuid.uuid4().hex[:12]}"
            changelog = f"{app_id}-totals-changelog"
            ensure_topics(kafka_bootstrap, {f"{app_id}-src": 1, changelog: 1})
            org_b = [(b'"orgB"', json.dumps(float(i)).encode()) for i in range(1, 6)]
            org_a = [(b'"orgA"', json.dumps(float(i)).encode()) for i in range(1, 11)]
            asyncio.run(_produce_batches(kafka_bootstrap, changelog, [org_b, org_a]))
            out = tmp_path / f"{mode}.out"
            with out.open("wb") as sink:
                proc = subprocess.Popen(
                    [sys.executable, str(script), kafka_bootstrap, app_id, mode],
                    cwd=tmp_path,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            procs[mode] = (proc, out)
        results: dict[str, dict[str, float]] = {}
        deadline = time.monotonic() + 40
        while len(results) < len(procs):
            for mode, (proc, out) in procs.items():
                if mode in results:
                    continue
                match = re.search(r"RECOVERED (\{.*?\})", out.read_text(errors="replace"))
                if match:
                    results[mode] = json.loads(match.group(1))
                    proc.terminate()
                elif proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"faust worker ({mode}) never reported recovery:\n{out.read_text()[-3000:]}")
            time.sleep(0.1)
        return results
    finally:
        for proc, _ in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_faust_table_recovery_keeps_the_last_batch(kafka_bootstrap: str, kafka_kind: str, tmp_path: Path) -> None:
    results = _recovered(kafka_bootstrap, tmp_path, ["raw", "fixed"])
    assert results["fixed"] == {"orgA": 10.0, "orgB": 5.0}
    if kafka_kind != "embedded":
        pytest.skip(ONLY_TANSU.format(kind=kafka_kind))
    # Highwater from end_offsets = 6 (base of the orgA batch + 1): recovery stops after orgA's first update.
    assert results["raw"] == {"orgA": 1.0, "orgB": 5.0}


# ----------------------------------------------------------------- (b) LeaveGroup in generation 0

SESSION_TIMEOUT_MS = 10_000  # Tansu's join phase lasts ~session/2, so this costs ~5 s per join


async def _members(admin: AIOKafkaAdminClient, group: str) -> list[str]:
    (response,) = await admin.describe_consumer_groups([group])
    (description,) = response.groups
    return [member[0] for member in description[5]]


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def on_partitions_revoked(self, revoked: object) -> None:
        pass

    async def on_partitions_assigned(self, assigned: object) -> None:
        self.event.set()


async def _join_and_stop(bootstrap: str, topic: str, group: str) -> tuple[int, str, list[str]]:
    """Join ``group``, stop; returns (generation, member id, members up to 1 s after the stop)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=1000,
        rebalance_timeout_ms=SESSION_TIMEOUT_MS,
    )
    assigned = _Assigned()
    consumer.subscribe([topic], listener=assigned)
    try:
        await consumer.start()
        try:
            await asyncio.wait_for(assigned.event.wait(), SESSION_TIMEOUT_MS / 1000 + 10)
            generation, member = consumer._coordinator.generation, consumer._coordinator.member_id
            assert await _members(admin, group) == [member]
        finally:
            await consumer.stop()
        members = await _members(admin, group)
        for _ in range(20):  # 1 s: far below the 10 s session timeout
            if not members:
                break
            await asyncio.sleep(0.05)
            members = await _members(admin, group)
        return generation, member, members
    finally:
        await admin.close()


@pytest.mark.parametrize("fixed", [False, True], ids=["raw", "fixed"])
def test_stopped_generation_0_member_leaves_the_group(
    kafka_bootstrap: str,
    kafka_kind: str,
    topic_name: str,
    create_topic: Callable[..., str],
    fixes: Callable[..., None],
    fixed: bool,
) -> None:
    fixes(leave_group_gen0=fixed)
    create_topic(topic_name)
    group = f"test-group-{uuid.uuid4().hex}"
    generation, member, members = asyncio.run(_join_and_stop(kafka_bootstrap, topic_name, group))
    if fixed:
        assert members == []
        return
    if kafka_kind != "embedded":
        pytest.skip(ONLY_TANSU.format(kind=kafka_kind))
    assert generation == 0  # Tansu's first generation; aiokafka only leaves when generation > 0
    assert members == [member]  # still a member after a clean stop: the next join waits it out
