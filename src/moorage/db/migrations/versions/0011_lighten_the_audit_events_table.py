"""drop an unused audit index, and make seq the rowid on SQLite

Revision ID: 0011
Revises: 0010

Every pull and push inserts an audit event, so each index on `audit_events`
costs every pull. No query uses `ix_audit_events_actor_customer_time`. The
customer filter is `actor_customer = ? OR repository LIKE '<customer>/%'`, and
`repository` has no index, so neither SQLite 3.40 nor PostgreSQL can use an
index for that OR. Both scan by `seq` (EXPLAIN, with the index present). The
usage report groups by customer after filtering by action and time
(`ix_audit_events_action_time`).

On SQLite a `BIGINT` primary key is a second B-tree beside the table's rowid.
Only a column declared exactly `INTEGER PRIMARY KEY` is the rowid itself, so
`seq` becomes `INTEGER` there (64-bit, like every SQLite integer). SQLite cannot
change a column's type in place, so the table is rebuilt (batch mode: copy, drop,
rename), which takes time and disk space in proportion to the events stored.
PostgreSQL keeps `seq BIGINT`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNUSED_INDEX = "ix_audit_events_actor_customer_time"


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_index(_UNUSED_INDEX, table_name="audit_events")
        return
    with op.batch_alter_table("audit_events", recreate="always") as batch:
        batch.drop_index(_UNUSED_INDEX)
        batch.alter_column(
            "seq",
            type_=sa.Integer(),
            existing_type=sa.BigInteger(),
            existing_nullable=False,
            autoincrement=False,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.create_index(_UNUSED_INDEX, "audit_events", ["actor_customer", "time"])
        return
    with op.batch_alter_table("audit_events", recreate="always") as batch:
        batch.alter_column(
            "seq",
            type_=sa.BigInteger(),
            existing_type=sa.Integer(),
            existing_nullable=False,
            autoincrement=False,
        )
        batch.create_index(_UNUSED_INDEX, ["actor_customer", "time"])
