"""Studies, series and instances.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(64), index=True),
        sa.Column("patient_name", sa.String(324)),
        sa.Column("patient_name_norm", sa.String(324), index=True),
        sa.Column("patient_name_words", sa.String(330)),
        sa.Column("patient_birth_date", sa.String(8)),
        sa.Column("patient_sex", sa.String(16)),
        sa.Column("study_date", sa.String(8), index=True),
        sa.Column("study_time", sa.String(16)),
        sa.Column("accession_number", sa.String(64), index=True),
        sa.Column("study_id", sa.String(16)),
        sa.Column("study_description", sa.String(64)),
        sa.Column("referring_physician_name", sa.String(324)),
        sa.Column("referring_physician_name_norm", sa.String(324)),
        sa.Column("referring_physician_name_words", sa.String(330)),
        sa.Column("attributes", sa.Text, nullable=False),
        sa.Column("diagnosis_status", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "series",
        sa.Column("series_uid", sa.String(64), primary_key=True),
        sa.Column(
            "study_uid", sa.String(64), sa.ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True,
            nullable=False,
        ),
        sa.Column("modality", sa.String(16), index=True),
        sa.Column("series_number", sa.Integer),
        sa.Column("series_description", sa.String(64)),
        sa.Column("series_date", sa.String(8)),
        sa.Column("series_time", sa.String(16)),
        sa.Column("body_part_examined", sa.String(16)),
        sa.Column("pps_start_date", sa.String(8)),
        sa.Column("pps_start_time", sa.String(16)),
        sa.Column("attributes", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_table(
        "instances",
        sa.Column("sop_uid", sa.String(64), primary_key=True),
        sa.Column(
            "series_uid", sa.String(64), sa.ForeignKey("series.series_uid", ondelete="CASCADE"), index=True,
            nullable=False,
        ),
        sa.Column(
            "study_uid", sa.String(64), sa.ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True,
            nullable=False,
        ),
        sa.Column("sop_class_uid", sa.String(64), index=True, nullable=False),
        sa.Column("instance_number", sa.Integer),
        sa.Column("rows", sa.Integer),
        sa.Column("columns", sa.Integer),
        sa.Column("bits_allocated", sa.Integer),
        sa.Column("number_of_frames", sa.Integer),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("pixel_layout", sa.Text),
        sa.Column("metadata_gz", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_instances_series_number", "instances", ["series_uid", "instance_number"])


def downgrade() -> None:
    op.drop_table("instances")
    op.drop_table("series")
    op.drop_table("studies")
