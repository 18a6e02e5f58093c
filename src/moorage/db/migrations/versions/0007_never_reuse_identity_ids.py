"""never reuse the ids of customers, accounts, grants and personal tokens on SQLite

Revision ID: 0007
Revises: 0006

Without AUTOINCREMENT, SQLite gives a new row the largest id in the table plus
one, so deleting the newest grant, account or personal access token hands its
id to the next one, and an audit event or a script naming the old id then
points at the new row. AUTOINCREMENT keeps the largest id ever used in
`sqlite_sequence` instead. SQLite cannot add it to a table, so each table is
rebuilt (batch mode: copy, drop, rename), which also drops the table's
triggers, so the identity revision triggers of migration 0005_perf are created
again. PostgreSQL needs nothing: a SERIAL column's sequence never returns a
number twice.
"""

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Customers are never deleted yet; their table gets AUTOINCREMENT too, so that
# a later "customer remove" cannot bring the reuse back.
_TABLES = ("customers", "accounts", "grants", "personal_tokens")
# The triggers that migration 0005_perf created on these tables.
_OPERATIONS = ("insert", "update", "delete")
_BUMP = "UPDATE identity_revision SET revision = revision + 1 WHERE id = 1"


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    _check_foreign_keys_off()
    for table in _TABLES:
        _rebuild(table, autoincrement=True)
    # NOTE: sqlite_sequence starts at the largest id left in each table, so an
    # account or token id deleted from the top before this upgrade can be handed
    # out once more. Removed grants are named in the audit trail, so their ids
    # are skipped, unless retention archived those events.
    _skip_removed_grant_ids()


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    _check_foreign_keys_off()
    for table in _TABLES:
        _rebuild(table, autoincrement=False)


# The description of a grant.remove audit event, as moorage.admin writes it.
_GRANT_REMOVED = re.compile(r"grant (\d+) of ")


def _skip_removed_grant_ids() -> None:
    """Start new grant ids above every id that a successful grant.remove audit
    event names. Failed removals can name ids that never existed, up to 2**63 - 1.
    """
    bind = op.get_bind()
    reasons = bind.execute(
        sa.text(
            "SELECT reason FROM audit_events "
            "WHERE action = 'grant.remove' AND outcome = 'success'"
        )
    ).scalars()
    named = [
        int(match.group(1))
        for reason in reasons
        if (match := _GRANT_REMOVED.match(reason or ""))
    ]
    if not named:
        return
    highest = max(named)
    # The table has no sqlite_sequence row until its first insert.
    bind.execute(
        sa.text(
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'grants', 0 "
            "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'grants')"
        )
    )
    bind.execute(
        sa.text(
            "UPDATE sqlite_sequence SET seq = max(seq, :highest) WHERE name = 'grants'"
        ),
        {"highest": highest},
    )


def _check_foreign_keys_off() -> None:
    """Raise unless foreign key enforcement is off on this connection.

    With it on, dropping a table that other rows reference fails, or deletes
    nothing and leaves the constraint violated at commit.
    """
    enforced = op.get_bind().exec_driver_sql("PRAGMA foreign_keys").scalar()
    if enforced:
        raise RuntimeError(
            "migration 0007 rebuilds tables that others reference, so it needs "
            "PRAGMA foreign_keys=OFF before the transaction begins; run it "
            "through moorage.db.engine.migrate, which turns it off"
        )


def _rebuild(table: str, *, autoincrement: bool) -> None:
    with op.batch_alter_table(
        table,
        recreate="always",
        table_kwargs={"sqlite_autoincrement": autoincrement},
    ):
        pass
    for operation in _OPERATIONS:
        op.execute(
            f"CREATE TRIGGER {table}_{operation}_bump_identity_revision "
            f"AFTER {operation.upper()} ON {table} BEGIN {_BUMP}; END"
        )
