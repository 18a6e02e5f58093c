"""merge the seven migration branches into one head

Revision ID: 0006
Revises: 0003, 0005_benchscale, 0005_perf, 0005_shred, 0005_tokens_pat,
    0005_tokens_refresh, 0005_tokens_throttle

Features added their migrations on branches of their own, so the history had
seven heads and `alembic upgrade head` failed. This revision changes no schema;
later revisions revise it, so the history keeps one head.
"""

from collections.abc import Sequence

revision: str = "0006"
down_revision: str | Sequence[str] | None = (
    "0003",
    "0005_benchscale",
    "0005_perf",
    "0005_shred",
    "0005_tokens_pat",
    "0005_tokens_refresh",
    "0005_tokens_throttle",
)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
