"""reconcile: repairs of what Stripe holds beyond what edgebill sent (once per key), invoice-line alert streaks

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-12

``reconcile_repairs`` gains the operator's ``reason`` and ``repair_key`` (unique: an over-billing repair is
written once per key, ever); existing repairs have neither (NULL: they were short repairs, keyed by their row).
``reconcile_invoices`` gains ``streak`` and ``first_run`` (0 and NULL on existing lines: the next scheduled run
starts their streaks, as for a window seen for the first time).

(Named for what it does: if another branch adds a 0009 too, this one is renumbered at the merge.)
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reconcile_repairs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("repair_key", sa.String(length=100), nullable=True))
        batch_op.create_index("ux_reconcile_repairs_key", ["repair_key"], unique=True)
    with op.batch_alter_table("reconcile_invoices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("streak", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("first_run", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reconcile_invoices", schema=None) as batch_op:
        batch_op.drop_column("first_run")
        batch_op.drop_column("streak")
    with op.batch_alter_table("reconcile_repairs", schema=None) as batch_op:
        batch_op.drop_index("ux_reconcile_repairs_key")
        batch_op.drop_column("repair_key")
        batch_op.drop_column("reason")
