"""usage_samples keyed by insertion order; closing by cursor instead of marking rows

Before: every sample carried ``close_id``, set by the close run that claimed it (a rewrite of every row,
plus two indexes kept for it), and a (bucket, org) index. After: samples get a ``seq`` and one secondary
index, (bucket, seq); ``closed_buckets.seq`` says up to where a bucket's samples are aggregated, and
``close_runs.upto_seq`` / ``last_bucket`` where the closer stands.

The data is carried over: claimed samples first (in close order), so that per bucket every claimed
sample sits below every unclaimed one; the cursors are set from them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLS = (
    "id, org_id, sandbox_id, worker_id, cell_id, memory_mb, cpu_count, interval_s, ts_ms, bucket_start, "
    "src_partition, src_offset"
)


def upgrade() -> None:
    op.create_table(
        "usage_samples_v2",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("org_id", sa.String(length=255), nullable=False),
        sa.Column("sandbox_id", sa.String(length=255), nullable=False),
        sa.Column("worker_id", sa.String(length=255), nullable=False),
        sa.Column("cell_id", sa.String(length=255), nullable=False),
        sa.Column("memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("cpu_count", sa.Integer(), nullable=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("bucket_start", sa.BigInteger(), nullable=False),
        sa.Column("src_partition", sa.Integer(), nullable=False),
        sa.Column("src_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id", name="uq_usage_samples_id"),
    )
    op.execute(  # claimed samples first, in close order; then the unclaimed ones
        f"INSERT INTO usage_samples_v2 ({_COLS}) SELECT {_COLS} FROM usage_samples "  # noqa: S608 - constants
        "WHERE close_id IS NOT NULL ORDER BY close_id, ts_ms, id"
    )
    op.add_column("close_runs", sa.Column("upto_seq", sa.BigInteger(), server_default="0", nullable=False))
    op.add_column("close_runs", sa.Column("last_bucket", sa.BigInteger(), nullable=True))
    op.add_column("closed_buckets", sa.Column("seq", sa.BigInteger(), server_default="0", nullable=False))
    op.execute(
        "UPDATE closed_buckets SET seq = COALESCE((SELECT MAX(v.seq) FROM usage_samples_v2 v "
        "WHERE v.bucket_start = closed_buckets.bucket_start), 0)"
    )
    op.execute(
        "INSERT INTO close_runs (started_ms, watermark_ms, samples, rows, upto_seq, last_bucket) "
        "SELECT 0, 0, 0, 0, COALESCE(MAX(seq), 0), MAX(bucket_start) FROM usage_samples_v2 "
        "WHERE EXISTS (SELECT 1 FROM usage_samples_v2)"
    )
    op.execute(
        f"INSERT INTO usage_samples_v2 ({_COLS}) SELECT {_COLS} FROM usage_samples "  # noqa: S608 - constants
        "WHERE close_id IS NULL ORDER BY ts_ms, id"
    )
    op.drop_table("usage_samples")
    op.rename_table("usage_samples_v2", "usage_samples")
    op.create_index("ix_usage_samples_bucket_seq", "usage_samples", ["bucket_start", "seq"], unique=False)


def downgrade() -> None:
    raise NotImplementedError("0004 reorganises usage_samples; restore a backup taken before upgrading")
