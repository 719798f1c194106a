"""ticks stored as compressed batches (``tick_batches``) instead of a row per tick (``usage_samples``)

Every sample is carried over, exactly once, into batches of one bucket each (at most 10,000 ticks a batch),
in insertion order. The seq-valued cursors keep their meaning: every bucket's ``closed_buckets.seq``, the
latest ``close_runs.upto_seq`` and the parity edge's ``edge_upto_seq`` are cut points; samples are batched
between consecutive cut points only, so each cursor maps to the last new batch written before its cut, and
"aggregated" / "summed" holds for exactly the samples it held for before. Older close runs' ``upto_seq`` map
to the cut at or below them (only the latest is read).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from models.ticks import SourcedTick, Tick
from sinks.ledger.batches import encode_batch

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PER_BATCH = 10_000
_COLS = (
    "seq, id, org_id, sandbox_id, worker_id, cell_id, memory_mb, cpu_count, interval_s, ts_ms, bucket_start, "
    "src_partition, src_offset"
)


def upgrade() -> None:
    conn = op.get_bind()
    op.create_table(
        "tick_batches",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("bucket_start", sa.BigInteger(), nullable=False),
        sa.Column("ticks", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_tick_batches_bucket_seq", "tick_batches", ["bucket_start", "seq"], unique=False)
    if conn.dialect.name == "postgresql":
        # Already zstd-compressed: PostgreSQL's own TOAST compression would only spend CPU.
        op.execute("ALTER TABLE tick_batches ALTER COLUMN data SET STORAGE EXTERNAL")

    latest = conn.execute(sa.text("SELECT upto_seq FROM close_runs ORDER BY id DESC LIMIT 1")).scalar()
    edge = conn.execute(sa.text("SELECT value FROM parity_state WHERE name = 'edge_upto_seq'")).scalar()
    cursors = [int(v) for v in conn.execute(sa.text("SELECT seq FROM closed_buckets")).scalars()]
    cuts = sorted({*cursors, *(int(v) for v in (latest, edge) if v is not None)})
    mapped: dict[int, int] = {}
    new_seq = 0
    buffers: dict[int, list[SourcedTick]] = {}
    insert = sa.text("INSERT INTO tick_batches (seq, bucket_start, ticks, data) VALUES (:seq, :b, :n, :data)")

    def flush(bucket: int) -> None:
        nonlocal new_seq
        part = buffers.pop(bucket)
        new_seq += 1
        conn.execute(insert, {"seq": new_seq, "b": bucket, "n": len(part), "data": encode_batch(part)})

    def cut_through(old_seq: int) -> None:
        """Flush everything read so far and map each cut below ``old_seq`` to the last batch written."""
        while cuts and cuts[0] < old_seq:
            for b in sorted(buffers):
                flush(b)
            mapped[cuts.pop(0)] = new_seq

    rows = conn.execute(
        sa.text(f"SELECT {_COLS} FROM usage_samples ORDER BY seq").execution_options(  # noqa: S608 - constants
            yield_per=20_000
        )
    )
    for r in rows:
        cut_through(int(r[0]))
        tick = Tick(r[1], r[2], r[3], r[4], r[5], int(r[6]), int(r[7]), int(r[8]), int(r[9]))
        b = int(r[10])
        buf = buffers.setdefault(b, [])
        buf.append(SourcedTick(tick, int(r[11]), int(r[12])))
        if len(buf) >= _PER_BATCH:
            flush(b)
    cut_through(2**63)
    for b in sorted(buffers):
        flush(b)
    if conn.dialect.name == "postgresql" and new_seq:
        conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('tick_batches', 'seq'), :n)"), {"n": new_seq})

    keys = sorted(mapped)

    def remap(old: int) -> int:
        i = bisect.bisect_right(keys, old)
        return mapped[keys[i - 1]] if i else 0

    for old in sorted(set(cursors)):
        conn.execute(sa.text("UPDATE closed_buckets SET seq = :new WHERE seq = :old"), {"new": remap(old), "old": old})
    for rid, old in conn.execute(sa.text("SELECT id, upto_seq FROM close_runs")).all():
        conn.execute(
            sa.text("UPDATE close_runs SET upto_seq = :new WHERE id = :id"), {"new": remap(int(old)), "id": rid}
        )
    if edge is not None:
        conn.execute(
            sa.text("UPDATE parity_state SET value = :new WHERE name = 'edge_upto_seq'"), {"new": remap(int(edge))}
        )
    op.drop_table("usage_samples")


def downgrade() -> None:
    raise NotImplementedError("0010 turns usage_samples into tick batches; restore a backup taken before upgrading")
