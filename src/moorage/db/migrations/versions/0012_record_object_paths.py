"""record the path at which each encrypted object is stored

Revision ID: 0012
Revises: 0011

The encrypting driver opens an object only at the path recorded for the object
id in its header, so a blob file copied over another blob's path fails its
integrity check. Objects stored before this revision have no row; the server
records them in the background at start-up (`maintenance.record_object_paths`).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "object_paths",
        sa.Column("object_id", sa.String(length=32), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.PrimaryKeyConstraint("object_id", name=op.f("pk_object_paths")),
    )
    op.create_index(op.f("ix_object_paths_path"), "object_paths", ["path"])


def downgrade() -> None:
    op.drop_index(op.f("ix_object_paths_path"), table_name="object_paths")
    op.drop_table("object_paths")
