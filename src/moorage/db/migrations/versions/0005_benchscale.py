"""add code point order indexes for catalog and tag list pages on PostgreSQL

Revision ID: 0005_benchscale
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_benchscale"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # SQLite needs none: its BINARY order is code point order already.
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute('CREATE INDEX ix_repositories_name_c ON repositories (name COLLATE "C")')
    op.execute(
        "CREATE INDEX ix_tags_repository_id_name_c "
        'ON tags (repository_id, name COLLATE "C")'
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_tags_repository_id_name_c", table_name="tags")
    op.drop_index("ix_repositories_name_c", table_name="repositories")
