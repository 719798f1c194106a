"""Shared pytest fixtures.

Sections:
  * Kafka broker — which broker the session talks to (``kafka_bootstrap``, ``kafka_kind``), the
    testcontainers variant, unique topics, and a produce/consume round-trip helper.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.devkit.broker import EmbeddedBroker, free_port
from infra.devkit.stack import WorkerStack
from infra.kafka_admin import ensure_topics
from infra.settings import KafkaSettings

# ==================================================================================== Kafka broker
#
# Which broker the session uses, in order:
#   1. EDGEBILL_KAFKA_BOOTSTRAP set            -> that broker (kind "external"; read via KafkaSettings)
#   2. EDGEBILL_TEST_KAFKA=testcontainers      -> a KafkaContainer (kind "testcontainers"; skips the
#                                                 Kafka tests when no Docker engine is reachable)
#   3. otherwise                               -> an EmbeddedBroker (Tansu) on a free 127.0.0.1 port
#                                                 for the whole session (kind "embedded")
# Tests that demonstrate a *Tansu* defect check ``kafka_kind == "embedded"`` and skip otherwise.

KafkaKind = Literal["embedded", "external", "testcontainers"]
TESTCONTAINERS_KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"


class _TestEnv(BaseSettings):
    """Test-only switches (``EDGEBILL_TEST_*``); runtime settings stay in infra.settings."""

    model_config = SettingsConfigDict(env_prefix="EDGEBILL_TEST_", frozen=True, extra="ignore")

    kafka: Literal["embedded", "testcontainers"] = "embedded"
    # PostgreSQL for the DB tests (they skip with a reason when it does not answer).
    pg_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class _DockerEnv(BaseSettings):
    """Where the Docker engine is, as docker-py / testcontainers would look for it."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    docker_host: str | None = None


@dataclass(frozen=True)
class KafkaTarget:
    bootstrap: str
    kind: KafkaKind


def _docker_unavailable_reason() -> str | None:
    """Why no Docker engine is reachable (None if one answers /_ping).

    Probed with a plain socket: docker-py leaks its socket on a failed connect, and the resulting
    ResourceWarning would fail an unrelated test under ``-W error``.
    """
    host = _DockerEnv().docker_host or "unix:///var/run/docker.sock"
    try:
        if host.startswith("unix://"):
            path = host.removeprefix("unix://")
            if not Path(path).exists():
                return f"no Docker engine: {path} does not exist"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(path)
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                answer = sock.recv(256)
        elif host.startswith("tcp://"):
            addr, _, port = host.removeprefix("tcp://").rstrip("/").rpartition(":")
            with socket.create_connection((addr, int(port)), timeout=2.0) as sock:
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                answer = sock.recv(256)
        else:
            return None  # ssh:// etc.: let testcontainers try
    except OSError as exc:
        return f"no Docker engine answering at {host}: {exc}"
    if b" 200 " not in answer.split(b"\r\n", 1)[0]:
        return f"Docker engine at {host} did not answer /_ping with 200"
    return None


@pytest.fixture(scope="session")
def testcontainers_kafka_bootstrap() -> Iterator[str]:
    """Bootstrap of a real Apache Kafka in Docker (testcontainers); skips without a Docker engine."""
    reason = _docker_unavailable_reason()
    if reason is not None:
        pytest.skip(f"testcontainers Kafka needs Docker: {reason}")
    # testcontainers.kafka is a deprecated alias (DeprecationWarning = error here); use the new path.
    from testcontainers.community.kafka import KafkaContainer

    with KafkaContainer(TESTCONTAINERS_KAFKA_IMAGE).with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


@pytest.fixture(scope="session")
def kafka_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaTarget]:
    external = KafkaSettings().bootstrap
    if external:
        yield KafkaTarget(external, "external")
        return
    if _TestEnv().kafka == "testcontainers":
        yield KafkaTarget(request.getfixturevalue("testcontainers_kafka_bootstrap"), "testcontainers")
        return
    with EmbeddedBroker(free_port(), log_dir=tmp_path_factory.mktemp("tansu")) as broker:
        yield KafkaTarget(broker.bootstrap, "embedded")


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_target: KafkaTarget) -> str:
    """``host:port`` of the session's Kafka-compatible broker (see the table above)."""
    return kafka_target.bootstrap


@pytest.fixture(scope="session")
def kafka_kind(kafka_target: KafkaTarget) -> KafkaKind:
    """``"embedded"`` (Tansu started by the session), ``"external"`` or ``"testcontainers"``."""
    return kafka_target.kind


@pytest.fixture
def topic_name() -> str:
    """A unique topic name (not created; see ``create_topic``)."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def create_topic(kafka_bootstrap: str) -> Callable[..., str]:
    """``create_topic(name, partitions=1) -> name`` on the session broker (idempotent)."""

    def create(name: str, partitions: int = 1) -> str:
        ensure_topics(kafka_bootstrap, {name: partitions})
        return name

    return create


async def _round_trip(bootstrap: str, topic: str, count: int = 10) -> list[bytes]:
    """Produce ``count`` records to ``topic`` and read them back from the beginning (group-less)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    sent = [f"record-{i}".encode() for i in range(count)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in sent:
            await producer.send(topic, value, key=b"k", partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[bytes] = []
        async with asyncio.timeout(10):
            while len(got) < count:
                batch = await consumer.getmany(tp, timeout_ms=500)
                got.extend(bytes(msg.value) for msg in batch.get(tp, []))
        return got
    finally:
        await consumer.stop()


@pytest.fixture
def round_trip() -> Callable[[str, str, int], Coroutine[Any, Any, list[bytes]]]:
    """``await round_trip(bootstrap, topic, n)``: produce n records, return the values read back."""
    return _round_trip


# ======================================================================================= Databases
#
# ``db_url`` runs a test once on SQLite (a fresh file) and once on PostgreSQL (a fresh schema in the
# database of EDGEBILL_TEST_PG_URL, dropped afterwards); the PostgreSQL run skips with the reason when
# nothing answers on 127.0.0.1:5432.


def _pg_unavailable_reason(url: str) -> str | None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL not available at {url}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    url = _TestEnv().pg_url
    reason = _pg_unavailable_reason(url)
    if reason:
        pytest.skip(reason)
    return url


def _pg_schema_url(base: str) -> Iterator[str]:
    import sqlalchemy

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    base = request.getfixturevalue("pg_base_url")
    yield from _pg_schema_url(base)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


# ======================================================================================= Pipeline
#
# ``stack``: a fresh pipeline on the session broker — unique topic prefix and consumer group, a SQLite
# ledger in the test's tmp dir, a local Stripe server thread — and the dev kit's worker harness to run
# `edgebill worker` processes against it (started/stopped by PID; every one left running is stopped at
# teardown).


class Stack(WorkerStack):
    """The worker harness plus the local Stripe server its workers send to and an SDK client for it."""

    def __init__(self, *, stripe: Any, client: Any, **harness: Any) -> None:
        super().__init__(**harness)
        self.stripe = stripe
        self.client = client


@pytest.fixture
def make_stack(kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    """Factory: ``make_stack(stripe_faults=None, database="sqlite"|"postgresql", **EDGEBILL_env)`` -> Stack.

    ``database="postgresql"`` gives the stack a fresh schema on the PostgreSQL of ``pg_base_url`` (the test
    skips with the reason when none answers), as several workers in one group need.
    """
    from infra.devkit.stripe_fake import StripeServerThread
    from sinks.stripe.v1 import make_client

    made: list[Stack] = []
    servers: list[Any] = []
    schemas: list[Iterator[str]] = []

    def factory(stripe_faults: Any = None, database: str = "sqlite", **overrides: str) -> Stack:
        prefix = f"t{uuid.uuid4().hex[:8]}."
        if database == "postgresql":
            gen = _pg_schema_url(request.getfixturevalue("pg_base_url"))
            schemas.append(gen)
            db_url = next(gen)
        else:
            db_url = f"sqlite:///{tmp_path / f'ledger-{prefix}db'}"
        srv = StripeServerThread(faults=stripe_faults)
        srv.start()
        servers.append(srv)
        now = int(time.time())
        s = Stack(
            stripe=srv,
            client=make_client("sk_test_x", srv.base_url, timeout=10),
            bootstrap=kafka_bootstrap,
            database_url=db_url,
            logdir=tmp_path / f"logs-{prefix}",
            topic_prefix=prefix,
            env={
                "EDGEBILL_STRIPE_API_BASE": srv.base_url,
                "EDGEBILL_WEB_HOST": None,
                "EDGEBILL_SHADOW": "false",
                "EDGEBILL_PRO_BILLING_AUTHORITY": "edge",
                "EDGEBILL_BILL_FROM": str((now // 3600 - 48) * 3600),
                **overrides,
            },
            stop_grace=20,
            tail_lines=25,
        )
        made.append(s)
        return s

    yield factory
    for s in made:
        s.close(grace=15)
    for srv in servers:
        srv.stop()
    for gen in schemas:
        for _ in gen:  # runs the schema's DROP
            pass


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack()
