"""The same produce/consume round trip against the session broker and a real Apache Kafka.

The ``testcontainers`` case needs a Docker engine and skips (with the reason) without one; set
``EDGEBILL_TEST_KAFKA=testcontainers`` to run the whole suite against that container instead.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from infra.kafka_admin import ensure_topics

pytestmark = pytest.mark.integration

BROKERS = {
    "session": "kafka_bootstrap",  # embedded Tansu, or EDGEBILL_KAFKA_BOOTSTRAP
    "testcontainers": "testcontainers_kafka_bootstrap",  # confluentinc/cp-kafka in Docker
}


@pytest.mark.parametrize("broker", list(BROKERS))
def test_round_trip(
    broker: str,
    request: pytest.FixtureRequest,
    round_trip: Callable[[str, str, int], Coroutine[Any, Any, list[bytes]]],
) -> None:
    bootstrap: str = request.getfixturevalue(BROKERS[broker])
    topic = f"test-real-{uuid.uuid4().hex}"
    ensure_topics(bootstrap, {topic: 1})
    assert asyncio.run(round_trip(bootstrap, topic, 50)) == [f"record-{i}".encode() for i in range(50)]
