"""What every part of the parity store shares: its configuration, the bucket of a time, the refresher's
stored state (``parity_state``) and the policy histories read from the ledger."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from sqlalchemy import Connection, Engine, select

from models.billing import bucket_start
from models.parity import AlertRule
from models.policy import OrgPolicy, PolicyHistory
from models.watermark import PartitionState
from sinks.ledger import Clock, SqlStore, policy_from_row, read_partition_states, wall_clock_ms
from sinks.schema import org_policies, parity_state

__all__ = ["CHUNK", "ParityBase", "ParityConfig"]

CHUNK: Final = 500  # ids per IN list


@dataclass(frozen=True, slots=True)
class ParityConfig:
    """Everything the refresher needs (built from the settings at the application edge)."""

    bucket_seconds: int
    grace_seconds: int
    tolerance: Decimal  # |drift| above it flags a row (models.parity.classify)
    slack_seconds: int
    lookback_seconds: int
    rule: AlertRule
    stale_after_ms: int
    ticks_topic: str
    required: Mapping[str, int]  # topic -> partitions whose progress settles a bucket
    event_time_topics: frozenset[str]


class ParityBase(SqlStore):
    """The engine, the bucket size and the helpers every part of :class:`sinks.parity.ParityStore` uses."""

    def __init__(self, engine: Engine, *, bucket_seconds: int, clock: Clock = wall_clock_ms) -> None:
        super().__init__(engine, clock=clock)
        self.bucket_seconds = bucket_seconds

    # ------------------------------------------------------------------ helpers

    def _bucket(self, ms: int) -> int:
        return bucket_start(ms, self.bucket_seconds)

    @staticmethod
    def _histories(conn: Connection) -> tuple[dict[str, PolicyHistory], dict[str, tuple[tuple[int, str], ...]]]:
        found: dict[str, list[OrgPolicy]] = defaultdict(list)
        op = org_policies.c
        for r in conn.execute(select(op.org_id, op.effective_ms, op.plan, op.billing_mode, op.billing_provider)):
            found[r.org_id].append(policy_from_row(r))
        hists = {org: PolicyHistory(p) for org, p in found.items()}
        prints = {org: tuple(sorted((p.effective_at_ms, p.plan.value) for p in pols)) for org, pols in found.items()}
        return hists, prints

    def _set_state(self, conn: Connection, values: Mapping[str, int]) -> None:
        stmt = self._insert(parity_state)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["name"], set_={"value": stmt.excluded.value}),
            [{"name": k, "value": v} for k, v in values.items()],
        )

    @staticmethod
    def _progress(conn: Connection) -> list[PartitionState]:
        return read_partition_states(conn)
