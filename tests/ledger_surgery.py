"""Damage a ledger on purpose, as a lost write or a bad restore would: tests of what replay and
reconciliation find use it. Never used by the product."""

from __future__ import annotations

from sqlalchemy import Engine, select, update

from sinks.ledger.batches import decode_batch, encode_batch
from sinks.schema import tick_batches


def delete_tick(engine: Engine, tick_id: str) -> int:
    """Remove every stored copy of ``tick_id`` from its batches (a batch left empty is deleted); returns how
    many copies went. The batches keep their seq, so the closer's cursors are untouched."""
    tb = tick_batches.c
    gone = 0
    with engine.begin() as conn:
        for seq, bucket, data in conn.execute(select(tb.seq, tb.bucket_start, tb.data)).all():
            batch = decode_batch(int(seq), int(bucket), data)
            kept = [st for st in batch.sourced() if st.tick.id != tick_id]
            if len(kept) == len(batch.ticks):
                continue
            gone += len(batch.ticks) - len(kept)
            if kept:
                conn.execute(update(tick_batches).where(tb.seq == seq).values(ticks=len(kept), data=encode_batch(kept)))
            else:
                conn.execute(tick_batches.delete().where(tb.seq == seq))
    return gone
