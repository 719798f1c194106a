"""The embedded Tansu broker (infra.devkit.broker): start, answer Kafka, round trip, stop, foreground run."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from infra.devkit.broker import EmbeddedBroker, free_port
from infra.kafka_admin import ensure_topics, kafka_answers, wait_for_kafka
from models.errors import BrokerError

pytestmark = pytest.mark.integration

RoundTrip = Callable[[str, str, int], Coroutine[Any, Any, list[bytes]]]


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp{,6}) of TCP sockets LISTENing on ``port``."""
    out: list[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hexport, 16) == port:
                out.append(addr)
    return out


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie of someone else)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def broker(tmp_path: Path) -> EmbeddedBroker:
    return EmbeddedBroker(free_port(), log_dir=tmp_path)


def test_starts_answers_and_round_trips(
    broker: EmbeddedBroker, topic_name: str, round_trip: RoundTrip, record_property: Callable[..., None]
) -> None:
    assert not kafka_answers(broker.bootstrap, timeout=0.5)
    with broker:
        assert broker.running and broker.pid is not None
        assert broker.start_seconds is not None and broker.start_seconds < 5
        record_property("tansu_start_seconds", round(broker.start_seconds, 3))
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        assert kafka_answers(broker.bootstrap, timeout=2)
        wait_for_kafka(broker.bootstrap, timeout=2)
        ensure_topics(broker.bootstrap, {topic_name: 1})
        got = asyncio.run(round_trip(broker.bootstrap, topic_name, 25))
        assert got == [f"record-{i}".encode() for i in range(25)]
        assert broker.log_path is not None and "tansu broker" in broker.log_path.read_text()


def test_stop_leaves_no_process(broker: EmbeddedBroker) -> None:
    broker.start()
    pid = broker.pid
    assert pid is not None and not _gone(pid)
    broker.stop()
    assert broker.pid is None and not broker.running
    assert _gone(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the broker's own process group is empty
    assert _listeners(broker.port) == []
    assert not kafka_answers(broker.bootstrap, timeout=0.5)
    broker.stop()  # idempotent


def test_stop_escalates_to_sigkill(broker: EmbeddedBroker) -> None:
    broker.grace = 0.3
    broker.start()
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    t0 = time.monotonic()
    broker.stop()
    assert time.monotonic() - t0 < 3
    assert _gone(pid)


def test_forgotten_broker_is_killed_when_collected(tmp_path: Path) -> None:
    broker = EmbeddedBroker(free_port(), log_dir=tmp_path)
    broker.start()
    pid = broker.pid
    assert pid is not None
    del broker
    gc.collect()
    assert _gone(pid)


def test_port_in_use_is_refused(broker: EmbeddedBroker) -> None:
    # Tansu itself exits 0 on EADDRINUSE; the wrapper must not mistake another listener for itself.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", broker.port))
        holder.listen()
        with pytest.raises(BrokerError, match="already in use"):
            broker.start()
    assert broker.pid is None


def test_failed_start_reports_log_tail(tmp_path: Path) -> None:
    broker = EmbeddedBroker(free_port(), log_dir=tmp_path, storage="bogus://nowhere/")
    with pytest.raises(BrokerError, match=r"exited with status 1(.|\n)*UnsupportedStorageUrl"):
        broker.start(timeout=10)
    assert broker.pid is None


def test_wait_for_kafka_times_out_on_a_silent_port() -> None:
    with socket.socket() as silent:  # accepts TCP (backlog) but never speaks Kafka
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        bootstrap = f"127.0.0.1:{silent.getsockname()[1]}"
        assert not kafka_answers(bootstrap, timeout=0.3)
        with pytest.raises(BrokerError, match="no Kafka broker answered"):
            wait_for_kafka(bootstrap, timeout=0.5)


def test_ensure_topics_is_idempotent_and_warns_on_partition_mismatch(
    kafka_bootstrap: str, topic_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    other = topic_name + "-b"
    ensure_topics(kafka_bootstrap, {topic_name: 3, other: 1})
    ensure_topics(kafka_bootstrap, {topic_name: 3, other: 1})
    with caplog.at_level(logging.WARNING, logger="infra.devkit.broker"):
        ensure_topics(kafka_bootstrap, {topic_name: 2})
    assert f"topic {topic_name} exists with 3 partitions, wanted 2" in caplog.text

    async def partitions() -> set[int] | None:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
        await consumer.start()
        try:
            await consumer.topics()  # refreshes metadata for all topics
            return consumer.partitions_for_topic(topic_name)  # type: ignore[no-any-return]
        finally:
            await consumer.stop()

    assert asyncio.run(partitions()) == {0, 1, 2}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_foreground_binds_loopback_and_exits_0_on_signal(sig: signal.Signals) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    code = f"from infra.devkit.broker import run_foreground; raise SystemExit(run_foreground({port}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for_kafka(bootstrap, timeout=20)
        listeners = _listeners(port)
        assert listeners == ["0100007F"], f"expected only 127.0.0.1:{port}, got {listeners}"
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err.decode()
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert f"embedded broker ready on {bootstrap}" in err.decode()
    assert _listeners(port) == []
    assert not kafka_answers(bootstrap, timeout=0.5)
