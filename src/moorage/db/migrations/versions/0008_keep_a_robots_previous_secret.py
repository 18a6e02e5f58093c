"""keep the keyed hash of a robot's secret before its last rotation

Revision ID: 0008
Revises: 0007

A login with a robot's old secret after `moorage robot rotate` is rejected
like any wrong secret. With the old secret's keyed hash kept, the server can
tell that the rejected secret was once right and raise an alert. The old
secret is never accepted. An added nullable column keeps SQLite's tables and
their identity revision triggers as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "accounts", sa.Column("previous_secret_hash", sa.Text(), nullable=True)
    )


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35 or newer) keeps the table's triggers and
    # AUTOINCREMENT, which a batch rebuild would drop.
    op.execute("ALTER TABLE accounts DROP COLUMN previous_secret_hash")
