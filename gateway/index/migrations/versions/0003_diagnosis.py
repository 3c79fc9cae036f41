"""Diagnosis status history and admin-registered client profiles.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "diagnosis_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "study_uid",
            sa.String(64),
            sa.ForeignKey("studies.study_uid", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("who", sa.String(256), nullable=False),
        sa.Column("role", sa.String(32)),
        sa.Column("from_status", sa.Integer, nullable=False),
        sa.Column("to_status", sa.Integer, nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("sop_uid", sa.String(64)),
    )
    op.create_table(
        "client_profiles",
        sa.Column("name", sa.String(300), primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("updated_by", sa.String(256)),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("client_profiles")
    op.drop_table("diagnosis_history")
