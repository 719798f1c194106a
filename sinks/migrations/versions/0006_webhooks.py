"""webhooks: received Stripe events (applied once each), subscription state, provisioning, plan records to publish

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

Only new tables: an existing ledger starts with no received event and no provisioned org.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _seq() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("object_id", sa.String(length=255), nullable=False),
        sa.Column("org_id", sa.String(length=255), nullable=True),
        sa.Column("created_s", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_ms", sa.BigInteger(), nullable=False),
        sa.Column("first_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_events_pending", ["outcome", "next_ms"], unique=False)

    op.create_table(
        "webhook_receipts",
        sa.Column("id", _seq(), autoincrement=True, nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("duplicate", sa.Integer(), nullable=False),
        sa.Column("received_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("topic", "partition", "offset", name="uq_webhook_receipts_source"),
    )
    with op.batch_alter_table("webhook_receipts", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_receipts_event", ["event_id"], unique=False)

    op.create_table(
        "stripe_subscriptions",
        sa.Column("subscription_id", sa.String(length=255), nullable=False),
        sa.Column("org_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=64), nullable=False),
        sa.Column("event_created_s", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("provisioned", sa.Integer(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id"),
    )
    with op.batch_alter_table("stripe_subscriptions", schema=None) as batch_op:
        batch_op.create_index("ix_stripe_subscriptions_customer", ["customer_id"], unique=False)
        batch_op.create_index("ix_stripe_subscriptions_org", ["org_id"], unique=False)

    op.create_table(
        "org_provisioning",
        sa.Column("org_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("subscription_id", sa.String(length=255), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("credit_txn_id", sa.String(length=255), nullable=True),
        sa.Column("plan", sa.String(length=16), nullable=True),
        sa.Column("plan_since_s", sa.BigInteger(), nullable=True),
        sa.Column("plan_last_s", sa.BigInteger(), nullable=True),
        sa.Column("plan_floor_s", sa.BigInteger(), nullable=True),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("org_id"),
    )
    with op.batch_alter_table("org_provisioning", schema=None) as batch_op:
        batch_op.create_index("ix_org_provisioning_customer", ["customer_id"], unique=False)

    op.create_table(
        "webhook_policy_outbox",
        sa.Column("id", _seq(), autoincrement=True, nullable=False),
        sa.Column("org_id", sa.String(length=255), nullable=False),
        sa.Column("effective_ms", sa.BigInteger(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("published_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhook_policy_outbox", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_policy_outbox_pending", ["published_ms", "id"], unique=False)

    op.create_table(
        "provisioning_log",
        sa.Column("id", _seq(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("org_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("subscription_id", sa.String(length=255), nullable=True),
        sa.Column("credit_txn_id", sa.String(length=255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("provisioning_log", schema=None) as batch_op:
        batch_op.create_index("ix_provisioning_log_org", ["org_id"], unique=False)


def downgrade() -> None:
    for table in (
        "provisioning_log",
        "webhook_policy_outbox",
        "org_provisioning",
        "stripe_subscriptions",
        "webhook_receipts",
        "webhook_events",
    ):
        op.drop_table(table)
