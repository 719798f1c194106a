"""What every consumer of the worker shares: the record it reads, the dead letter it writes, the retry.

A leaf module: the pipeline, the ingest service and the cell agent import it; it imports none of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

__all__ = ["RAW_BYTES", "DeadLetter", "RawRecord", "Record", "dead_letter", "retry_forever"]

log = logging.getLogger(__name__)

# Every topic of the worker carries bytes both ways: records are parsed (and dead-lettered) by this code.
RAW_BYTES: Final[dict[str, Any]] = {
    "key_type": bytes,
    "value_type": bytes,
    "key_serializer": "raw",
    "value_serializer": "raw",
}


class Record(Protocol):
    """What the ingest step needs of a Kafka record."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class RawRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


def dead_letter(rec: Record, topic: str, reason: str, raw: bytes, index: int | None = None) -> DeadLetter:
    """The dead letter of a rejected record: original bytes, reason and source in headers."""
    headers = {
        "edgebill-reason": reason.encode(),
        "edgebill-source": f"{topic}/{rec.partition}/{rec.offset}".encode(),
    }
    if index is not None:
        headers["edgebill-array-index"] = str(index).encode()
    return DeadLetter(key=rec.key, value=raw, headers=headers)


async def retry_forever(what: str, fn: Callable[[], Any]) -> None:
    """Run a ledger write until it succeeds. Never ack a batch whose write failed (Faust would commit it)."""
    delay = 0.2
    while True:
        try:
            await asyncio.to_thread(fn)
            return
        except Exception:
            log.exception("%s failed; retrying in %.1fs (offsets are not committed meanwhile)", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
