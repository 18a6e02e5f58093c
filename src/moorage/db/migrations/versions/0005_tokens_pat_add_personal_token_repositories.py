"""add personal_tokens.repositories: patterns that limit a personal access token

Revision ID: 0005_tokens_pat
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_tokens_pat"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "personal_tokens", sa.Column("repositories", sa.Text(), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("personal_tokens", schema=None) as batch_op:
        batch_op.drop_column("repositories")
