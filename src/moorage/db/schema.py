"""Table definitions (SQLAlchemy Core). Migrations under `migrations/` create them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and returned timezone-aware.

    SQLite keeps no time zone, so every value is normalised to UTC on the way in.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware values")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


customers = Table(
    "customers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("slug", String(64), nullable=False, unique=True),
    Column("display_name", String(200), nullable=False),
    # active or suspended
    Column("status", String(16), nullable=False, default="active"),
    Column("access_until", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

# The owner of each namespace; customer_id NULL means the vendor owns it.
namespaces = Table(
    "namespaces",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("customer_id", Integer, ForeignKey("customers.id"), nullable=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    # The name typed at `docker login`: unique across the registry.
    Column("login", String(255), nullable=False, unique=True),
    Column("customer_id", Integer, ForeignKey("customers.id"), nullable=True),
    # user or robot
    Column("kind", String(16), nullable=False),
    # For customer accounts: the role on the customer's own namespaces (reader,
    # writer, maintainer, owner). For vendor accounts: admin or auditor.
    Column("role", String(16), nullable=True),
    # argon2id hash for user passwords.
    Column("secret_hash", Text, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("expires_at", UTCDateTime, nullable=True),
    # Incremented whenever the secret is rotated or every token is revoked;
    # tokens carry the generation they were issued under.
    Column("token_generation", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

grants = Table(
    "grants",
    metadata,
    Column("id", Integer, primary_key=True),
    # A grant goes to a whole customer (account_id NULL) or to one account.
    Column("customer_id", Integer, ForeignKey("customers.id"), nullable=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=True),
    # A repository name, or a pattern such as products/* (see auth.access).
    Column("pattern", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    Column("until", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Index(None, "customer_id"),
    Index(None, "account_id"),
)

repositories = Table(
    "repositories",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("namespace", String(255), nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

# Committed content, shared by every repository that links it.
blobs = Table(
    "blobs",
    metadata,
    Column("digest", String(200), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

# Which blobs each repository may serve: pushed, mounted, or referenced there.
repository_blobs = Table(
    "repository_blobs",
    metadata,
    Column("repository_id", Integer, ForeignKey("repositories.id"), primary_key=True),
    Column("digest", String(200), ForeignKey("blobs.digest"), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Index(None, "digest"),
)

manifests = Table(
    "manifests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("repository_id", Integer, ForeignKey("repositories.id"), nullable=False),
    Column("digest", String(200), nullable=False),
    Column("media_type", String(255), nullable=False),
    Column("artifact_type", String(255), nullable=True),
    Column("subject_digest", String(200), nullable=True),
    # JSON text of the manifest's annotations, for the referrers response.
    Column("annotations", Text, nullable=True),
    Column("size", BigInteger, nullable=False),
    # The exact bytes the client pushed; they are served unchanged.
    Column("content", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    UniqueConstraint("repository_id", "digest"),
    Index(None, "repository_id", "subject_digest"),
)

# Blobs and child manifests that a manifest names.
manifest_references = Table(
    "manifest_references",
    metadata,
    Column("manifest_id", Integer, ForeignKey("manifests.id"), primary_key=True),
    Column("digest", String(200), primary_key=True),
    # blob or manifest
    Column("kind", String(16), nullable=False),
    Index(None, "digest"),
)

tags = Table(
    "tags",
    metadata,
    Column("repository_id", Integer, ForeignKey("repositories.id"), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("manifest_id", Integer, ForeignKey("manifests.id"), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
    Index(None, "manifest_id"),
)

uploads = Table(
    "uploads",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("repository_id", Integer, ForeignKey("repositories.id"), nullable=False),
    # Bytes received so far.
    Column("size", BigInteger, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("algorithm", String(16), nullable=False),
    # PEM of the private key.
    Column("private_key", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("retired_at", UTCDateTime, nullable=True),
)

# Keys the server keeps for itself, by name. `secret_hmac` keys the fast hashes of
# generated secrets (robot secrets, personal access tokens).
server_keys = Table(
    "server_keys",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("material", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

# Personal access tokens: secrets a user makes for automation, limited to a role
# at most equal to the user's own rights, until an expiry date.
personal_tokens = Table(
    "personal_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("name", String(100), nullable=False),
    # Keyed hash (HMAC-SHA256) of the secret part of the token.
    Column("secret_hash", Text, nullable=False),
    # reader, writer or maintainer: the most this token may do.
    Column("role", String(16), nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Index(None, "account_id"),
)
