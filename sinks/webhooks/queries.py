"""What the webhook tables hold, for ``edgebill webhooks`` and tests: deliveries and their outcome, events,
the provisioning log, subscription state. Read-only."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import and_, select

from models.webhooks import Outcome
from sinks.ledger import SqlStore
from sinks.schema import provisioning_log, stripe_subscriptions, webhook_events, webhook_receipts

__all__ = ["WebhookQueries"]


class WebhookQueries(SqlStore):
    """Read-only views of the webhook tables."""

    def recent(self, limit: int = 50, org_id: str | None = None) -> list[dict[str, Any]]:
        """The newest receipts first: each record read, its event and its outcome (``duplicate`` for a
        record whose event was already final)."""
        wr, we = webhook_receipts.c, webhook_events.c
        q = (
            select(
                wr.id,
                wr.received_ms,
                wr.partition,
                wr.offset,
                wr.event_id,
                wr.duplicate,
                we.type,
                we.object_id,
                we.org_id,
                we.created_s,
                we.outcome,
                we.detail,
                we.deliveries,
            )
            .select_from(webhook_receipts.outerjoin(webhook_events, wr.event_id == we.event_id))
            .order_by(wr.id.desc())
            .limit(limit)
        )
        if org_id:
            q = q.where(we.org_id == org_id)
        out = []
        with self.engine.connect() as conn:
            for r in conn.execute(q):
                row = dict(r._mapping)
                if r.outcome is None:
                    row["outcome"] = Outcome.INVALID.value
                    row["detail"] = r.event_id.removeprefix("invalid:")
                elif r.duplicate:
                    row["event_outcome"] = r.outcome
                    row["outcome"] = Outcome.DUPLICATE.value
                out.append(row)
        return out

    def events(self, *, org_id: str | None = None, outcome: str | None = None) -> list[dict[str, Any]]:
        we = webhook_events.c
        q = select(webhook_events).order_by(we.first_ms, we.event_id)
        if org_id:
            q = q.where(we.org_id == org_id)
        if outcome:
            q = q.where(we.outcome == outcome)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def provisioning(self, org_id: str | None = None, mode: str | None = None) -> list[dict[str, Any]]:
        pl = provisioning_log.c
        q = select(provisioning_log).order_by(pl.id)
        conds = [
            c for c in (pl.org_id == org_id if org_id else None, pl.mode == mode if mode else None) if c is not None
        ]
        if conds:
            q = q.where(and_(*conds))
        with self.engine.connect() as conn:
            return [{**dict(r._mapping), "detail": orjson.loads(r.detail)} for r in conn.execute(q)]

    def subscriptions(self, org_id: str | None = None) -> list[dict[str, Any]]:
        ss = stripe_subscriptions.c
        q = select(stripe_subscriptions).order_by(ss.org_id, ss.event_created_s)
        if org_id:
            q = q.where(ss.org_id == org_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]
