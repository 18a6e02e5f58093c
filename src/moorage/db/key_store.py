"""Wrapped data keys kept in the database (the `sealed_keys` table)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.db.dialects import insert_ignore
from moorage.db.schema import sealed_keys, utcnow
from moorage.db.transactions import begin, connect


@dataclass(frozen=True, slots=True)
class SealedKey:
    name: str
    key_id: str
    wrapped: bytes


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def get_or_add(self, name: str, key_id: str, wrapped: bytes) -> SealedKey:
        """Return the key stored under `name`, storing the given one if none is.

        When two processes start at once, both get the row that won.
        """
        async with begin(self.engine) as connection:
            await insert_ignore(
                connection,
                sealed_keys,
                {
                    "name": name,
                    "key_id": key_id,
                    "wrapped": wrapped,
                    "created_at": utcnow(),
                },
            )
            row = (
                await connection.execute(
                    select(sealed_keys.c.key_id, sealed_keys.c.wrapped).where(
                        sealed_keys.c.name == name
                    )
                )
            ).one()
        return SealedKey(name, row.key_id, bytes(row.wrapped))

    async def list(self) -> list[SealedKey]:
        async with connect(self.engine) as connection:
            rows = await connection.execute(
                select(sealed_keys.c.name, sealed_keys.c.key_id, sealed_keys.c.wrapped)
            )
            return [SealedKey(r.name, r.key_id, bytes(r.wrapped)) for r in rows]

    async def replace(self, old: SealedKey, key_id: str, wrapped: bytes) -> bool:
        """Store a rewrapped key unless the row changed since `old` was read."""
        async with begin(self.engine) as connection:
            result = await connection.execute(
                update(sealed_keys)
                .where(
                    sealed_keys.c.name == old.name,
                    sealed_keys.c.key_id == old.key_id,
                )
                .values(key_id=key_id, wrapped=wrapped)
            )
        return result.rowcount == 1

    async def get(self, name: str) -> SealedKey | None:
        async with connect(self.engine) as connection:
            row = (
                await connection.execute(
                    select(sealed_keys.c.key_id, sealed_keys.c.wrapped).where(
                        sealed_keys.c.name == name
                    )
                )
            ).first()
        return None if row is None else SealedKey(name, row.key_id, bytes(row.wrapped))

    async def delete(self, name: str) -> bool:
        async with begin(self.engine) as connection:
            result = await connection.execute(
                delete(sealed_keys).where(sealed_keys.c.name == name)
            )
        return result.rowcount == 1
