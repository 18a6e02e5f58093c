"""record the objects whose last data key wrap shredding deleted

Revision ID: 0009
Revises: 0008

An object with no wrap and no envelope is either shredded on purpose or
damaged (its wraps were lost). The read path tells the two apart by this
table, which `customer shred` fills in the transaction that destroys the key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shredded_objects",
        sa.Column("object_id", sa.String(length=32), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("shredded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("object_id", name=op.f("pk_shredded_objects")),
    )


def downgrade() -> None:
    op.drop_table("shredded_objects")
