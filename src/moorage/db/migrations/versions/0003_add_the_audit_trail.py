"""add the audit trail

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-04 17:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("actor_account", sa.String(length=255), nullable=True),
        sa.Column("actor_customer", sa.String(length=64), nullable=True),
        sa.Column("source_address", sa.String(length=64), nullable=True),
        sa.Column("user_agent", sa.String(length=255), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("repository", sa.String(length=255), nullable=True),
        sa.Column("reference", sa.String(length=255), nullable=True),
        sa.Column("digest", sa.String(length=200), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("link", sa.String(length=64), nullable=True),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_time"), ["time"])
        batch_op.create_index(
            batch_op.f("ix_audit_events_actor_customer_time"),
            ["actor_customer", "time"],
        )
        batch_op.create_index(
            batch_op.f("ix_audit_events_action_time"), ["action", "time"]
        )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_checkpoints")),
    )
    op.create_table(
        "audit_archives",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_archives")),
    )
    # The chain starts from 64 zeros at sequence number 0.
    op.execute(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '" + "0" * 64 + "')"
    )


def downgrade() -> None:
    op.drop_table("audit_archives")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_head")
    op.drop_table("audit_events")
