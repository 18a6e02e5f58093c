"""mark the blobs whose content shredding made unreadable

Revision ID: 0010
Revises: 0009

`customer shred` sets `blobs.shredded_at` in the transaction that destroys the
key, so that HEAD and GET of such a blob answer 404 BLOB_UNKNOWN from the row
they read anyway, without opening its data key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("shredded_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("shredded_at")
