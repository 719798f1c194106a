"""Client-side workarounds for two defects of the embedded Tansu 0.6.0 broker: a short log end, no LeaveGroup.

(a) :func:`true_end_offsets` / :func:`apply_true_end_offsets`: the log end from a Fetch high watermark;
(b) :func:`apply_leave_group_gen0`: LeaveGroup in generation 0. Both patch private internals of the pinned
``aiokafka==0.14.0`` and ``faust-streaming==0.15.3`` only (refused on other versions), are idempotent, have
a ``revert_*``, are harmless on a real Kafka; :func:`apply_all` applies both, before any consumer starts.
What they touch and why: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import aiokafka
import aiokafka.errors as kafka_errors
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest
from aiokafka.structs import TopicPartition

from models.errors import BrokerError

__all__ = [
    "PINNED_AIOKAFKA",
    "PINNED_FAUST",
    "apply_all",
    "apply_leave_group_gen0",
    "apply_true_end_offsets",
    "revert_all",
    "revert_leave_group_gen0",
    "revert_true_end_offsets",
    "status",
    "true_end_offsets",
]

log = logging.getLogger(__name__)

PINNED_AIOKAFKA = "0.14.0"
PINNED_FAUST = "0.15.3"

_MARK = "__edgebill_kafka_fix__"
_originals: dict[str, Any] = {}

# Connection settings copied from a live consumer's AIOKafkaClient to the throwaway consumer.
_CLIENT_SETTINGS = (
    "bootstrap_servers",
    "request_timeout_ms",
    "security_protocol",
    "ssl_context",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "sasl_kerberos_service_name",
    "sasl_kerberos_domain_name",
    "sasl_oauth_token_provider",
)


class _TopicPartitionLike(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...


def _check_version(name: str, actual: str, pinned: str) -> None:
    if actual != pinned:
        raise BrokerError(
            f"infra.kafka_fixes patches private internals of {name}=={pinned}, found {name}=={actual}; "
            "re-check the patched code against the new version before changing the pin"
        )


# ------------------------------------------------------------------------ (a) true log-end offsets


def _connection_settings(consumer: Any) -> dict[str, Any]:
    client = consumer._client
    settings = {key: getattr(client, f"_{key}") for key in _CLIENT_SETTINGS}
    settings["client_id"] = f"{client._client_id}-end-offsets"
    return settings


async def true_end_offsets(
    consumer_or_bootstrap: Any,
    partitions: Iterable[_TopicPartitionLike],
    *,
    fetch_timeout: float = 10.0,
) -> dict[TopicPartition, int]:
    """Log-end offsets that are right on Tansu: ``max(ListOffsets latest, Fetch high watermark)``.

    ``consumer_or_bootstrap`` is a started ``AIOKafkaConsumer`` (its ``end_offsets`` is the first
    reading and its connection settings are reused) or a bootstrap string. ``partitions`` may be
    aiokafka ``TopicPartition`` or Faust ``TP`` objects; keys of the result are aiokafka
    ``TopicPartition`` (which compare and hash equal to Faust TPs, both being plain tuples).
    For every partition whose reported end ``e`` is > 0, a throwaway group-less consumer seeks to
    ``e - 1`` and fetches once; the response's high watermark is the real log end. Raises
    :class:`BrokerError` when no high watermark arrives within ``fetch_timeout`` seconds, because a
    short answer would silently lose data.
    """
    tps = list(dict.fromkeys(TopicPartition(p.topic, p.partition) for p in partitions))
    if not tps:
        return {}
    reported: Mapping[TopicPartition, int] | None = None
    if isinstance(consumer_or_bootstrap, str):
        settings: dict[str, Any] = {"bootstrap_servers": consumer_or_bootstrap}
    else:
        settings = _connection_settings(consumer_or_bootstrap)
        reported = await consumer_or_bootstrap.end_offsets(tps)
    probe = AIOKafkaConsumer(
        **settings,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    try:
        await probe.start()
        # aiokafka 0.14.0: stop() right after start() on a group-less consumer raises CancelledError
        # (its committed-offset reset task is cancelled before it ever ran); let that task start.
        await asyncio.sleep(0)
        if reported is None:
            reported = await probe.end_offsets(tps)
        ends = {tp: int(reported[tp]) for tp in tps}
        todo = [tp for tp in tps if ends[tp] > 0]
        if not todo:
            return ends
        probe.assign(todo)
        for tp in todo:
            probe.seek(tp, ends[tp] - 1)
        deadline = time.monotonic() + fetch_timeout
        pending = todo
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(
                    f"no Fetch high watermark within {fetch_timeout:g}s for {sorted(pending)}; "
                    "refusing to return possibly short end offsets"
                )
            await probe.getmany(*pending, timeout_ms=max(1, int(min(left, 0.5) * 1000)))
            pending = [tp for tp in pending if probe.highwater(tp) is None]
        for tp in todo:
            highwater = int(probe.highwater(tp))
            if highwater > ends[tp]:
                log.debug("end offset of %s corrected from %d to %d", tp, ends[tp], highwater)
                ends[tp] = highwater
        return ends
    finally:
        await probe.stop()


async def _faust_highwaters(self: Any, partitions: Iterable[Any]) -> Mapping[Any, int]:
    """Replacement for ``AIOKafkaConsumerThread._highwaters`` (faust-streaming 0.15.3)."""
    from faust.types import TP

    partitions = list(partitions)
    consumer = self._ensure_consumer()
    if self.consumer.in_transaction:  # unchanged upstream branch (never taken on Tansu)
        return {tp: consumer.last_stable_offset(tp) for tp in partitions}
    ends = await true_end_offsets(consumer, partitions)
    return {TP(tp.topic, tp.partition): offset for tp, offset in ends.items()}


setattr(_faust_highwaters, _MARK, True)


def _faust_consumer_thread() -> type[Any]:
    import faust
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    _check_version("faust-streaming", faust.__version__, PINNED_FAUST)
    _check_version("aiokafka", aiokafka.__version__, PINNED_AIOKAFKA)
    cls: type[Any] = AIOKafkaConsumerThread
    return cls


def apply_true_end_offsets() -> bool:
    """Patch Faust's changelog highwaters to use :func:`true_end_offsets`; True if newly applied."""
    done = "faust changelog highwaters now use the Fetch high watermark"
    return _patch("true_end_offsets", "faust", _faust_consumer_thread(), "_highwaters", _faust_highwaters, done)


def revert_true_end_offsets() -> bool:
    """Undo :func:`apply_true_end_offsets`; True if it was applied."""
    return _unpatch("true_end_offsets", _faust_consumer_thread(), "_highwaters")


def _patch(fix: str, lib: str, cls: type[Any], attr: str, replacement: Any, done: str) -> bool:
    """Set ``cls.attr`` to ``replacement`` (marked), keeping the original as ``fix``'s; True if newly applied.
    Raises :class:`BrokerError` when ``cls`` has no such attribute (not the pinned version)."""
    current = cls.__dict__.get(attr)
    if current is None:
        raise BrokerError(f"{lib} {cls.__name__} has no {attr}: cannot patch")
    if getattr(current, _MARK, False):
        return False
    _originals[fix] = current
    setattr(cls, attr, replacement)
    log.info("kafka_fixes: %s", done)
    return True


def _unpatch(fix: str, cls: type[Any], attr: str) -> bool:
    """Put back the original ``cls.attr`` that :func:`_patch` kept as ``fix``'s; True if it was patched."""
    original = _originals.pop(fix, None)
    if original is None:
        return False
    setattr(cls, attr, original)
    return True


# ------------------------------------------------------------------- (b) LeaveGroup in generation 0


async def _maybe_leave_group(self: Any) -> None:
    """Replacement for ``GroupCoordinator._maybe_leave_group`` (aiokafka 0.14.0): ``>= 0``, not ``> 0``."""
    if (
        self.generation >= 0
        and self._group_instance_id is None
        and self.member_id != JoinGroupRequest.UNKNOWN_MEMBER_ID
    ):
        # Minimal-effort attempt, as upstream: no resend on failure or timeout.
        request = LeaveGroupRequest(self.group_id, self.member_id)
        try:
            response = await self._send_req(request)
        except kafka_errors.KafkaError as err:
            log.error("LeaveGroup request failed: %s", err)
        else:
            code = getattr(response, "error_code", 0)
            if code:
                log.warning("LeaveGroup for %s answered %s", self.group_id, kafka_errors.for_code(code).__name__)
            else:
                log.info("LeaveGroup request succeeded (group %s, generation %d)", self.group_id, self.generation)
    self.reset_generation()


setattr(_maybe_leave_group, _MARK, True)


def apply_leave_group_gen0() -> bool:
    """Patch aiokafka to send LeaveGroup in generation 0 too; True if newly applied."""
    _check_version("aiokafka", aiokafka.__version__, PINNED_AIOKAFKA)
    done = "aiokafka sends LeaveGroup from generation 0"
    return _patch("leave_group_gen0", "aiokafka", GroupCoordinator, "_maybe_leave_group", _maybe_leave_group, done)


def revert_leave_group_gen0() -> bool:
    """Undo :func:`apply_leave_group_gen0`; True if it was applied."""
    return _unpatch("leave_group_gen0", GroupCoordinator, "_maybe_leave_group")


# ------------------------------------------------------------------------------------------ all

_FIXES: dict[str, tuple[Callable[[], bool], Callable[[], bool]]] = {
    "true_end_offsets": (apply_true_end_offsets, revert_true_end_offsets),
    "leave_group_gen0": (apply_leave_group_gen0, revert_leave_group_gen0),
}


def apply_all() -> None:
    """Apply every workaround (idempotent). Call before any Faust app or consumer starts."""
    for apply, _ in _FIXES.values():
        apply()


def revert_all() -> None:
    """Undo every applied workaround (for tests)."""
    for _, revert in _FIXES.values():
        revert()


def status() -> dict[str, bool]:
    """Which workarounds are currently applied, by name."""
    return {name: name in _originals for name in _FIXES}
