"""Where each copy of each object lives: bucket, key, storage class, size, checksum, since when, and the
state of an archive restore (DESIGN.md "Tiers and lifecycle").

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "locations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "sop_uid",
            sa.String(64),
            sa.ForeignKey("instances.sop_uid", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("study_uid", sa.String(64), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version_id", sa.String(32)),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("bucket", sa.String(255), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("storage_class", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="ok"),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True)),
        sa.Column("restore_state", sa.String(16)),
        sa.Column("restore_requested_at", sa.DateTime(timezone=True)),
        sa.Column("restore_expires_at", sa.DateTime(timezone=True)),
        sa.Column("pinned_until", sa.DateTime(timezone=True)),
    )
    # One copy per key and tier: an object keeps its key in every bucket (DESIGN.md "Bucket layout").
    op.create_index("uq_locations_tier_key", "locations", ["tier", "key"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_locations_tier_key", table_name="locations")
    op.drop_table("locations")
