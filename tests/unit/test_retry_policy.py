"""The one retry policy (sinks.base.RetryPolicy) and the worker's retry loop that runs on it."""

from __future__ import annotations

import asyncio

import pytest

from sinks.base import LEDGER_RETRY, Backoff, RetryPolicy
from streams.records import Stopped, retry_until_done


def test_the_schedule_doubles_to_its_cap_and_honours_a_longer_retry_after_up_to_its_limit() -> None:
    policy = RetryPolicy(Backoff(0.2, 1.0, jitter=False), max_attempts=3, max_retry_after=2.0)
    assert [policy.wait(n) for n in (1, 2, 3, 4)] == [0.2, 0.4, 0.8, 1.0]
    assert policy.wait(1, retry_after=1.5) == 1.5 and policy.wait(1, retry_after=9.0) == 2.0
    assert policy.again(2) and not policy.again(3)
    assert RetryPolicy().again(10**6)  # no limit: until done


def test_the_loop_waits_by_the_policy_and_returns_what_the_attempt_returned() -> None:
    waits: list[float] = []
    failures: list[str] = []
    calls = iter([ConnectionError("a"), ConnectionError("b"), None])

    async def attempt() -> str:
        exc = next(calls)
        if exc is not None:
            raise exc
        return "done"

    async def sleep(_stopping: asyncio.Event | None, s: float) -> None:
        waits.append(s)

    got = asyncio.run(retry_until_done("x", attempt, LEDGER_RETRY, lambda e: failures.append(str(e)), sleep=sleep))
    assert got == "done" and failures == ["a", "b"] and waits == [0.2, 0.4]


def test_a_type_the_policy_does_not_retry_and_a_stop_both_end_the_loop_at_once() -> None:
    async def refused() -> None:
        raise KeyError("bug")

    only_os = RetryPolicy(retryable=(OSError,))
    with pytest.raises(KeyError):
        asyncio.run(retry_until_done("x", refused, only_os, lambda e: None))

    async def stopped() -> None:
        stopping = asyncio.Event()
        stopping.set()

        async def down() -> None:
            raise ConnectionError("down")

        await retry_until_done("x", down, LEDGER_RETRY, lambda e: None, stopping=stopping)

    with pytest.raises(Stopped):
        asyncio.run(stopped())
