"""record when blobs lose references, scheduled deletions and maintenance leases

Revision ID: 0013
Revises: 0012

Garbage collection (`moorage gc`) deletes a blob only once it has been
unreferenced for a grace period. `blobs.released_at` is the time the blob last
lost a repository link or a manifest reference. Blobs that are unreferenced
already when this revision runs get its time, so that they too wait a grace
period from the upgrade.

`customers.delete_after` is the time at which `customer offboard
--delete-after` deletes the customer's repositories. `maintenance_leases`
lets one process at a time run garbage collection.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("released_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("delete_after", sa.DateTime(), nullable=True))
    op.create_table(
        "maintenance_leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_maintenance_leases")),
    )
    # Naive UTC, as the UTCDateTime columns store it.
    now = datetime.now(UTC).replace(tzinfo=None)
    op.execute(
        sa.text(
            "UPDATE blobs SET released_at = :now WHERE NOT EXISTS "
            "(SELECT 1 FROM repository_blobs WHERE repository_blobs.digest = "
            "blobs.digest) AND NOT EXISTS (SELECT 1 FROM manifest_references "
            "WHERE manifest_references.digest = blobs.digest AND "
            "manifest_references.kind = 'blob')"
        ).bindparams(sa.bindparam("now", now, type_=sa.DateTime()))
    )


def downgrade() -> None:
    op.drop_table("maintenance_leases")
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("delete_after")
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("released_at")
