"""Kafka administration the worker and the commands need on any cluster: is a broker there, create topics.

:func:`kafka_answers` probes with an ApiVersions and a Metadata round trip over a raw socket, so "up"
means "answers Kafka", not merely "accepts a TCP connection". :func:`ensure_topics` creates the topics
the worker uses, with their partition counts and replication factor, and leaves existing ones alone.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

from models.errors import BrokerError

__all__ = ["ensure_topics", "ensure_topics_async", "kafka_answers", "wait_for_kafka"]

log = logging.getLogger(__name__)

_API_VERSIONS = 18
_METADATA = 3
_MAX_RESPONSE = 64 * 1024 * 1024


# ----------------------------------------------------------------------------------- Kafka probing


def _parse_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        item = item.strip()
        item = item.split("://", 1)[-1]  # tolerate kafka://host:port
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise BrokerError(f"invalid bootstrap address {item!r} (expected host:port)")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise BrokerError("empty bootstrap server list")
    return out


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        buf += chunk
    return bytes(buf)


def _round_trip(sock: socket.socket, api_key: int, correlation_id: int, body: bytes) -> bytes:
    """One version-0 request; returns the response body after the correlation id."""
    client_id = b"edgebill-probe"
    header = struct.pack(">hhih", api_key, 0, correlation_id, len(client_id)) + client_id
    message = header + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    if not 4 <= size <= _MAX_RESPONSE:
        raise ValueError(f"implausible response size {size}")
    payload = _recv_exact(sock, size)
    (got,) = struct.unpack_from(">i", payload)
    if got != correlation_id:
        raise ValueError(f"correlation id {got} != {correlation_id}")
    return payload[4:]


def _answers_one(host: str, port: int, timeout: float) -> bool:
    """ApiVersions v0 (error_code 0, non-empty key list) then Metadata v0 (at least one broker)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            body = _round_trip(sock, _API_VERSIONS, 1, b"")
            error_code, n_keys = struct.unpack_from(">hi", body)
            if error_code != 0 or n_keys <= 0:
                return False
            body = _round_trip(sock, _METADATA, 2, struct.pack(">i", 0))  # v0: empty list = all topics
            (n_brokers,) = struct.unpack_from(">i", body)
            return int(n_brokers) > 0
    except (OSError, ValueError, struct.error):
        return False


def kafka_answers(bootstrap: str, timeout: float = 1.0) -> bool:
    """True when some server in ``bootstrap`` answers ApiVersions and Metadata within ``timeout`` s.

    ``bootstrap`` is ``host:port[,host:port…]``; a malformed one raises :class:`BrokerError`.
    """
    deadline = time.monotonic() + timeout
    for host, port in _parse_bootstrap(bootstrap):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if _answers_one(host, port, left):
            return True
    return False


def wait_for_kafka(bootstrap: str, timeout: float) -> None:
    """Block until :func:`kafka_answers`; raise :class:`BrokerError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if kafka_answers(bootstrap, max(0.05, min(1.0, left))):
            return
        if time.monotonic() >= deadline:
            raise BrokerError(f"no Kafka broker answered at {bootstrap} within {timeout:g}s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------- topics


async def ensure_topics_async(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    request_timeout: float = 30.0,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, int]:
    """Create each missing topic with its partition count; async twin of :func:`ensure_topics`.

    ``request_timeout`` bounds each admin request and the whole operation. ``configs``: topic configs to
    create a topic with (e.g. ``cleanup.policy=compact``), by name; a broker that does not implement one
    (Tansu keeps every record) still creates the topic. Returns the partition count each named topic has
    now (an existing topic keeps its own count and configs).
    """
    timeout = request_timeout
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

    if not topics:
        return {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            existing = await _partition_counts(admin)
            missing = {name: n for name, n in topics.items() if name not in existing}
            for name, n in topics.items():
                have = existing.get(name)
                if have is not None and have != n:
                    log.warning(
                        "topic %s exists with %d partitions, wanted %d; leaving it (Tansu cannot add "
                        "partitions; delete and recreate the topic to change it)",
                        name,
                        have,
                        n,
                    )
            if not missing:
                return {name: existing[name] for name in topics}
            wanted = configs or {}
            response = await admin.create_topics(
                [
                    NewTopic(name, n, replication_factor, topic_configs=dict(wanted.get(name, {})))
                    for name, n in missing.items()
                ]
            )
            problems: list[str] = []
            for entry in response.topic_errors:
                name, code = entry[0], entry[1]
                error = for_code(code)
                if code == 0 or error is TopicAlreadyExistsError:
                    log.info("topic %s: %d partitions", name, missing.get(name, -1))
                    continue
                message = entry[2] if len(entry) > 2 and entry[2] else error.__name__
                problems.append(f"{name}: {message}")
            if problems:
                raise BrokerError(f"could not create topics on {bootstrap}: " + "; ".join(problems))
            return {name: existing.get(name, n) for name, n in topics.items()}
    except TimeoutError as exc:
        raise BrokerError(f"creating topics on {bootstrap} timed out after {timeout:g}s") from exc
    except KafkaError as exc:
        raise BrokerError(f"creating topics on {bootstrap} failed: {exc!r}") from exc
    finally:
        await admin.close()


async def _partition_counts(admin: Any) -> dict[str, int]:
    # All-topics metadata: a request naming topics could auto-create them on a real Kafka.
    described = await admin.describe_topics()
    return {str(t["topic"]): len(t["partitions"]) for t in described if t["error_code"] == 0}


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    timeout: float = 30.0,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, int]:
    """Create the topics in ``topics`` (name -> partitions) that are missing; idempotent. ``configs``: see
    :func:`ensure_topics_async`.

    Returns the partition count each named topic has now.

    An existing topic with a different partition count is left alone with a warning: Tansu does
    not implement CreatePartitions. Blocking; from async code use :func:`ensure_topics_async`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise BrokerError("ensure_topics() called inside a running event loop; await ensure_topics_async()")
    return asyncio.run(
        ensure_topics_async(
            bootstrap, topics, replication_factor=replication_factor, request_timeout=timeout, configs=configs
        )
    )
