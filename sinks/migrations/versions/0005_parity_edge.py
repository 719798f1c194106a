"""parity_edge: the edge side of parity kept incrementally (each sample added once)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

An existing ledger starts with an empty table and no ``edge_upto_seq``: the first refresh adds every
stored sample once, then only new ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "parity_edge",
        sa.Column("bucket_start", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("org_id", sa.String(length=255), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("edge_mb_s", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("bucket_start", "org_id"),
    )


def downgrade() -> None:
    op.drop_table("parity_edge")
    op.execute("DELETE FROM parity_state WHERE name = 'edge_upto_seq'")
