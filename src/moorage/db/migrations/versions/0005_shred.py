"""add data_key_wraps and room for customer key names in sealed_keys

Revision ID: 0005_shred
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_shred"
# sealed_keys comes from 0004, and this revision widens its name column.
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sealed_keys") as batch:
        batch.alter_column(
            "name",
            existing_type=sa.String(length=64),
            type_=sa.String(length=128),
            existing_nullable=False,
        )
    op.create_table(
        "data_key_wraps",
        sa.Column("object_id", sa.String(length=32), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("object_id", "owner", name=op.f("pk_data_key_wraps")),
    )
    op.create_index(
        op.f("ix_data_key_wraps_owner"), "data_key_wraps", ["owner"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_data_key_wraps_owner"), table_name="data_key_wraps")
    op.drop_table("data_key_wraps")
    with op.batch_alter_table("sealed_keys") as batch:
        batch.alter_column(
            "name",
            existing_type=sa.String(length=128),
            type_=sa.String(length=64),
            existing_nullable=False,
        )
