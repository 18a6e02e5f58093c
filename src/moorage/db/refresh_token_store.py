"""Queries for issued refresh tokens: record, redeem, list, revoke, purge."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.db.schema import refresh_tokens, utcnow
from moorage.db.transactions import begin, connect

# Width of the address columns; longer addresses are cut to it.
MAX_ADDRESS_LENGTH = 64


@dataclass(frozen=True, slots=True)
class RefreshTokenRecord:
    jti: str
    account_id: int
    token_generation: int
    personal_token_id: int | None
    client_id: str | None
    issued_at: datetime
    issued_address: str | None
    expires_at: datetime
    last_used_at: datetime | None
    last_used_address: str | None
    revoked_at: datetime | None


class RefreshTokenStore:
    """One row per issued refresh token; every method is one transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(
        self,
        *,
        jti: str,
        account_id: int,
        token_generation: int,
        personal_token_id: int | None,
        client_id: str | None,
        address: str | None,
        issued_at: datetime,
        expires_at: datetime,
    ) -> None:
        async with begin(self.engine) as connection:
            await connection.execute(
                refresh_tokens.insert().values(
                    jti=jti,
                    account_id=account_id,
                    token_generation=token_generation,
                    personal_token_id=personal_token_id,
                    client_id=client_id,
                    issued_at=issued_at,
                    issued_address=_cut(address),
                    expires_at=expires_at,
                )
            )

    async def redeem(self, jti: str, account_id: int, address: str | None) -> bool:
        """Record a use of a refresh token; return False when it is unknown,
        belongs to another account, is revoked or has expired.

        The check and the record are one UPDATE, so a revocation committed
        before it is always seen.
        """
        now = utcnow()
        async with begin(self.engine) as connection:
            result = await connection.execute(
                update(refresh_tokens)
                .where(
                    refresh_tokens.c.jti == jti,
                    refresh_tokens.c.account_id == account_id,
                    refresh_tokens.c.revoked_at.is_(None),
                    refresh_tokens.c.expires_at > now,
                )
                .values(last_used_at=now, last_used_address=_cut(address))
            )
        return bool(result.rowcount)

    async def refusal(self, jti: str, account_id: int) -> str:
        """Say why `redeem` refused a token: "revoked", "expired" or "unknown"
        (no record of this account, as for tokens from before the records)."""
        async with connect(self.engine) as connection:
            row = (
                await connection.execute(
                    select(
                        refresh_tokens.c.revoked_at, refresh_tokens.c.expires_at
                    ).where(
                        refresh_tokens.c.jti == jti,
                        refresh_tokens.c.account_id == account_id,
                    )
                )
            ).first()
        if row is None:
            return "unknown"
        return "revoked" if row.revoked_at is not None else "expired"

    async def list_for(self, account_id: int) -> list[RefreshTokenRecord]:
        """Return an account's refresh tokens, newest first."""
        async with connect(self.engine) as connection:
            result = await connection.execute(
                select(refresh_tokens)
                .where(refresh_tokens.c.account_id == account_id)
                .order_by(refresh_tokens.c.issued_at.desc(), refresh_tokens.c.jti)
            )
            return [RefreshTokenRecord(*row) for row in result]

    async def revoke(self, account_id: int, jti: str | None = None) -> int:
        """Revoke one refresh token of an account, or all of them with `jti` None;
        return how many were not revoked before."""
        condition = [
            refresh_tokens.c.account_id == account_id,
            refresh_tokens.c.revoked_at.is_(None),
        ]
        if jti is not None:
            condition.append(refresh_tokens.c.jti == jti)
        async with begin(self.engine) as connection:
            result = await connection.execute(
                update(refresh_tokens).where(*condition).values(revoked_at=utcnow())
            )
        return int(result.rowcount)

    async def purge_expired(self, before: datetime) -> int:
        """Delete the rows of tokens that expired before `before`; return how many."""
        async with begin(self.engine) as connection:
            result = await connection.execute(
                delete(refresh_tokens).where(refresh_tokens.c.expires_at < before)
            )
        return int(result.rowcount)


def _cut(address: str | None) -> str | None:
    return None if address is None else address[:MAX_ADDRESS_LENGTH]
