"""usage_samples: index (bucket_start, org_id) instead of (org_id, ts_ms)

A time-ordered tick stream appends to a (bucket, org) index but inserts at random places in an
(org, time) one: measured 19 -> 13 µs per sample written on SQLite. Parity and replay read by bucket.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_samples_org_ts")
        batch_op.create_index("ix_usage_samples_bucket_org", ["bucket_start", "org_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("usage_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_samples_bucket_org")
        batch_op.create_index("ix_usage_samples_org_ts", ["org_id", "ts_ms"], unique=False)
