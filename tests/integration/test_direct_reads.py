"""Direct SQLite reads (moorage.db.direct): fresh data, and a fallback to the
engine when the direct connection fails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import literal, select

from moorage import admin
from moorage.config import Settings
from moorage.db.direct import DirectReadError, DirectReads, prepare
from moorage.db.identity_revision import DirectReader, query_revision
from moorage.services import Services, open_services
from tests.support.database import backend, create_database, drop_database
from tests.support.server import unique

pytestmark = pytest.mark.skipif(
    backend() != "sqlite", reason="direct reads exist for SQLite files only"
)


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    url = create_database(tmp_path)
    opened = await open_services(Settings(data_dir=tmp_path, database_url=url))
    try:
        yield opened
    finally:
        await opened.close()
        drop_database(url)


async def test_direct_revision_sees_commits(services: Services) -> None:
    """A direct read returns a revision committed by another connection."""
    reader = services.identity.revision
    assert isinstance(reader, DirectReader)
    before = await reader.current()
    slug = unique("direct")
    await admin.add_customer(services.identity, slug, slug, None)
    assert await reader.current() == await query_revision(services.engine)
    assert await reader.current() > before


async def test_failed_direct_read_uses_engine(
    services: Services, tmp_path: Path
) -> None:
    """When the direct connection cannot open, reads go through the engine."""
    broken = DirectReads(str(tmp_path / "missing" / "moorage.db"))
    store = services.registry.store
    store.direct = broken
    assert await store.get_tagged_manifest("nobody/app", "latest") is None
    assert not await store.blob_exists("sha256:" + "0" * 64)
    assert await store.list_tags("nobody/app", 10, None) is None
    assert not await store.repository_exists("nobody/app")
    reader = DirectReader(services.engine, broken)
    assert await reader.current() == await query_revision(services.engine)
    with pytest.raises(DirectReadError):
        broken.first(prepare(select(literal(1))))
