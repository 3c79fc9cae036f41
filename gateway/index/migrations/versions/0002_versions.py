"""Derived versions of each instance.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "versions",
        sa.Column(
            "sop_uid", sa.String(64), sa.ForeignKey("instances.sop_uid", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("version_id", sa.String(32), primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False, index=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("transfer_syntax_uid", sa.String(64)),
        sa.Column("size", sa.BigInteger),
        sa.Column("sha256", sa.String(64)),
        sa.Column("target_ratio", sa.Float),
        sa.Column("ratio", sa.Float),
        sa.Column("psnr", sa.Float),
        sa.Column("reason", sa.Text),
        sa.Column("frames", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("versions")
