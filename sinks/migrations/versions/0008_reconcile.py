"""reconcile: the ledger against Stripe's meter event summaries and invoice previews; repairs through the outbox

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29

``meter_events.repair_of`` is NULL on every existing row (no repair happened before this revision); the
reconciliation tables start empty: the first scheduled run compares every closed, sent window of its lookback.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _seq() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("meter_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("repair_of", sa.String(length=255), nullable=True))

    op.create_table(
        "reconcile_runs",
        sa.Column("id", _seq(), autoincrement=True, nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=False),
        sa.Column("finished_ms", sa.BigInteger(), nullable=False),
        sa.Column("window_lo", sa.BigInteger(), nullable=False),
        sa.Column("window_hi", sa.BigInteger(), nullable=False),
        sa.Column("grouping", sa.String(length=8), nullable=False),
        sa.Column("compared", sa.Integer(), nullable=False),
        sa.Column("differences", sa.Integer(), nullable=False),
        sa.Column("unsettled", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("throttled", sa.Integer(), nullable=False),
        sa.Column("invoice_lines", sa.Integer(), nullable=False),
        sa.Column("invoice_differences", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "reconcile_results",
        sa.Column("org_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("meter", sa.String(length=100), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("grouping", sa.String(length=8), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("ledger_value", sa.String(length=40), nullable=False),
        sa.Column("stripe_value", sa.String(length=40), nullable=True),
        sa.Column("lost_value", sa.String(length=40), nullable=False),
        sa.Column("causes", sa.Text(), nullable=False),
        sa.Column("streak", sa.Integer(), nullable=False),
        sa.Column("first_run", sa.BigInteger(), nullable=True),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("checked_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("org_id", "customer_id", "meter", "window_start", "grouping"),
    )
    with op.batch_alter_table("reconcile_results", schema=None) as batch_op:
        batch_op.create_index("ix_reconcile_results_run", ["run_id"], unique=False)

    op.create_table(
        "reconcile_alerts",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("org_id", sa.String(length=255), nullable=False),
        sa.Column("meter", sa.String(length=100), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("first_run", sa.BigInteger(), nullable=False),
        sa.Column("fired_run", sa.BigInteger(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("published_ms", sa.BigInteger(), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "reconcile_repairs",
        sa.Column("id", _seq(), autoincrement=True, nullable=False),
        sa.Column("row_id", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("new_row_id", sa.String(length=255), nullable=True),
        sa.Column("value", sa.String(length=40), nullable=False),
        sa.Column("cause", sa.String(length=64), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("by", sa.String(length=255), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("reconcile_repairs", schema=None) as batch_op:
        batch_op.create_index("ix_reconcile_repairs_row", ["row_id"], unique=False)

    op.create_table(
        "reconcile_invoices",
        sa.Column("subscription_id", sa.String(length=255), nullable=False),
        sa.Column("price_id", sa.String(length=255), nullable=False),
        sa.Column("org_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("meter", sa.String(length=100), nullable=True),
        sa.Column("period_start", sa.BigInteger(), nullable=False),
        sa.Column("period_end", sa.BigInteger(), nullable=False),
        sa.Column("stripe_quantity", sa.String(length=40), nullable=False),
        sa.Column("ledger_value", sa.String(length=40), nullable=False),
        sa.Column("pending_value", sa.String(length=40), nullable=False),
        sa.Column("label", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=True),
        sa.Column("checked_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", "price_id"),
    )
    with op.batch_alter_table("reconcile_invoices", schema=None) as batch_op:
        batch_op.create_index("ix_reconcile_invoices_org", ["org_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("reconcile_invoices", schema=None) as batch_op:
        batch_op.drop_index("ix_reconcile_invoices_org")
    op.drop_table("reconcile_invoices")
    with op.batch_alter_table("reconcile_repairs", schema=None) as batch_op:
        batch_op.drop_index("ix_reconcile_repairs_row")
    op.drop_table("reconcile_repairs")
    op.drop_table("reconcile_alerts")
    with op.batch_alter_table("reconcile_results", schema=None) as batch_op:
        batch_op.drop_index("ix_reconcile_results_run")
    op.drop_table("reconcile_results")
    op.drop_table("reconcile_runs")
    with op.batch_alter_table("meter_events", schema=None) as batch_op:
        batch_op.drop_column("repair_of")
