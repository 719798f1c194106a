"""The price catalog as the ledger holds it: ``billing_prices`` (catalog key -> Stripe price id), written by
``edgebill stripe setup`` and read by provisioning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from sinks.ledger import SqlStore
from sinks.schema import billing_prices

__all__ = ["CatalogStore"]


class CatalogStore(SqlStore):
    """Reads and writes of ``billing_prices``."""

    def catalog(self) -> dict[str, str]:
        """``billing_prices``: catalog key -> Stripe price id."""
        with self.engine.connect() as conn:
            return {r.key: r.price_id for r in conn.execute(select(billing_prices.c.key, billing_prices.c.price_id))}

    def publish_catalog(self, prices: Mapping[str, tuple[str, str]]) -> list[str]:
        """Write ``billing_prices`` (key -> (meter, price id)); returns the keys that changed.

        One transaction; a row whose meter and price are unchanged is not touched (its ``updated_ms`` stays).
        """
        bp = billing_prices.c
        changed: list[str] = []
        now = self._clock()
        with self._w.begin() as conn:
            current = {r.key: (r.meter, r.price_id) for r in conn.execute(select(bp.key, bp.meter, bp.price_id))}
            for key, (meter, price_id) in prices.items():
                if current.get(key) == (meter, price_id):
                    continue
                stmt = self._insert(billing_prices).values(key=key, meter=meter, price_id=price_id, updated_ms=now)
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["key"],
                        set_={"meter": stmt.excluded.meter, "price_id": stmt.excluded.price_id, "updated_ms": now},
                    )
                )
                changed.append(key)
        return changed

    def catalog_rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(billing_prices).order_by(billing_prices.c.key))]
