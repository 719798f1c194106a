"""cutover: one billing decision per bucket, the cutover's audit log and the workers' acknowledgements

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27

``closed_buckets.decision`` is filled for buckets closed before the upgrade from the states of their rows
(any ``shadow`` row -> shadow, any skipped row -> skipped, any other row -> billed); a bucket without any
row keeps NULL and is decided at its next close, from the cutover state in force then. The cutover log
starts empty: the environment's settings stay in force until the first cutover command.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("closed_buckets", sa.Column("decision", sa.String(length=32), nullable=True))
    # The same precedence as models.cutover.decision_from_row_states, over every row of the bucket.
    op.execute(
        """
        UPDATE closed_buckets SET decision = (
            SELECT CASE
                WHEN SUM(CASE WHEN m.state = 'shadow' THEN 1 ELSE 0 END) > 0 THEN 'shadow'
                WHEN SUM(CASE WHEN m.state = 'skipped_before_bill_from' THEN 1 ELSE 0 END) > 0
                    THEN 'skipped_before_bill_from'
                ELSE 'billed'
            END
            FROM meter_events m WHERE m.bucket_start = closed_buckets.bucket_start
        )
        WHERE EXISTS (SELECT 1 FROM meter_events m WHERE m.bucket_start = closed_buckets.bucket_start)
        """
    )
    op.create_table(
        "cutover_log",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("change_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("shadow", sa.Integer(), nullable=True),
        sa.Column("bill_from", sa.BigInteger(), nullable=True),
        sa.Column("bill_until", sa.BigInteger(), nullable=True),
        sa.Column("authority", sa.String(length=16), nullable=True),
        sa.Column("by", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("changed_ms", sa.BigInteger(), nullable=False),
        sa.Column("recorded_ms", sa.BigInteger(), nullable=False),
        sa.Column("published_ms", sa.BigInteger(), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("change_id", name="uq_cutover_log_change_id"),
    )
    op.create_index("ix_cutover_log_kind", "cutover_log", ["kind", "seq"])
    op.create_table(
        "cutover_acks",
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("acked_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("owner"),
    )


def downgrade() -> None:
    op.drop_table("cutover_acks")
    op.drop_index("ix_cutover_log_kind", table_name="cutover_log")
    op.drop_table("cutover_log")
    with op.batch_alter_table("closed_buckets") as batch:
        batch.drop_column("decision")
