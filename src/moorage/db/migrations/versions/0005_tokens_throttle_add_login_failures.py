"""add login_failures and login_addresses: failed-login throttle state

Revision ID: 0005_tokens_throttle
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_tokens_throttle"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "login_failures",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("login", sa.String(length=200), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure", sa.Float(), nullable=False),
        sa.Column("blocked_until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint(
            "scope", "login", "address", name=op.f("pk_login_failures")
        ),
    )
    op.create_index(
        op.f("ix_login_failures_last_failure"),
        "login_failures",
        ["last_failure"],
        unique=False,
    )
    op.create_table(
        "login_addresses",
        sa.Column("login", sa.String(length=200), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("last_success", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("login", "address", name=op.f("pk_login_addresses")),
    )
    op.create_index(
        op.f("ix_login_addresses_last_success"),
        "login_addresses",
        ["last_success"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_login_addresses_last_success"), table_name="login_addresses")
    op.drop_table("login_addresses")
    op.drop_index(op.f("ix_login_failures_last_failure"), table_name="login_failures")
    op.drop_table("login_failures")
