"""add the identity revision, which triggers increase on every identity change

Revision ID: 0005_perf
Revises: 0001
Depends on: 0002 (personal_tokens)
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_perf"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = "0002"

# The tables as they were when this migration was written; a later table that
# changes access gets its trigger in its own migration.
_TABLES = ("customers", "namespaces", "accounts", "grants", "personal_tokens")
_OPERATIONS = ("insert", "update", "delete")
_BUMP = "UPDATE identity_revision SET revision = revision + 1 WHERE id = 1"


def upgrade() -> None:
    op.create_table(
        "identity_revision",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identity_revision")),
    )
    op.execute("INSERT INTO identity_revision (id, revision) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION bump_identity_revision() RETURNS trigger "
            f"LANGUAGE plpgsql AS $$ BEGIN {_BUMP}; RETURN NULL; END $$"
        )
        for table in _TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_bump_identity_revision "
                f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION bump_identity_revision()"
            )
        return
    # SQLite has row triggers only, one per operation.
    for table in _TABLES:
        for operation in _OPERATIONS:
            op.execute(
                f"CREATE TRIGGER {table}_{operation}_bump_identity_revision "
                f"AFTER {operation.upper()} ON {table} BEGIN {_BUMP}; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in _TABLES:
            op.execute(f"DROP TRIGGER {table}_bump_identity_revision ON {table}")
        op.execute("DROP FUNCTION bump_identity_revision()")
    else:
        for table in _TABLES:
            for operation in _OPERATIONS:
                op.execute(f"DROP TRIGGER {table}_{operation}_bump_identity_revision")
    op.drop_table("identity_revision")
