"""Table definitions (SQLAlchemy Core). Migrations under `migrations/` create them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
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


# The largest id of a row in a table whose id column is an Integer: 32 bits
# on PostgreSQL (SQLite's are 64). asyncpg raises on a larger parameter
# instead of matching no row, so ids from outside are checked against it.
MAX_INTEGER_ID = 2**31 - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


# The tables whose ids appear in the API, the command line and audit events use
# `sqlite_autoincrement=True`, because without it SQLite gives a new row the id
# of the newest row deleted before it (migration 0007). PostgreSQL sequences
# never hand out a number twice.
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
    # When `customer offboard --delete-after` deletes the customer's
    # repositories; NULL when no deletion is scheduled.
    Column("delete_after", UTCDateTime, nullable=True),
    sqlite_autoincrement=True,
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
    # For robots: the keyed hash of the secret before the last rotation, kept
    # only to recognise (and raise an alert on) a use of that old secret.
    Column("previous_secret_hash", Text, nullable=True),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("expires_at", UTCDateTime, nullable=True),
    # Incremented whenever the secret is rotated or every token is revoked;
    # tokens carry the generation they were issued under.
    Column("token_generation", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    sqlite_autoincrement=True,
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
    sqlite_autoincrement=True,
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
    # Set by shredding when no key is left that opens the stored content; the
    # blob is then visible in no repository. Cleared when the blob is pushed
    # again, because that stores a new copy with a new data key.
    Column("shredded_at", UTCDateTime, nullable=True),
    # When the blob last lost a repository link or a manifest reference.
    # Garbage collection deletes an unreferenced blob only once this (or
    # `created_at`, when NULL) is older than its grace period.
    Column("released_at", UTCDateTime, nullable=True),
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

# The catalog and tag lists are ordered by code point (`dialects.lexical`), which
# PostgreSQL spells COLLATE "C". Its indexes above follow the database's own
# collation, so without these a page would read and sort every row. SQLite
# compares names as bytes, which is code point order for UTF-8, so the indexes
# above serve it already.
Index("ix_repositories_name_c", repositories.c.name.collate("C")).ddl_if(
    dialect="postgresql"
)
Index(
    "ix_tags_repository_id_name_c", tags.c.repository_id, tags.c.name.collate("C")
).ddl_if(dialect="postgresql")

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
# and optionally to repository patterns, never beyond the user's own rights,
# until an expiry date.
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
    # Grant patterns separated by spaces: the token may act only on repositories
    # that match one of them. NULL: no limit beyond the role.
    Column("repositories", Text, nullable=True),
    Index(None, "account_id"),
    sqlite_autoincrement=True,
)

# One row (id 1) whose revision increases with every change to the tables in
# IDENTITY_TABLES, in the same transaction: database triggers do it (migration
# 0005_perf). A process may reuse what it read from those tables for as long as
# the revision stays the same (see moorage.db.identity_revision).
identity_revision = Table(
    "identity_revision",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("revision", BigInteger, nullable=False),
)
# Every table an authenticated request reads to decide access. A new table that
# changes what an account may do belongs here and needs the trigger too.
IDENTITY_TABLES = ("customers", "namespaces", "accounts", "grants", "personal_tokens")

# Refresh tokens, one row per token issued, so that each can be revoked alone.
# A refresh token whose `jti` has no row here, or a revoked row, is rejected.
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    # The token's `jti` claim.
    Column("jti", String(64), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    # The account's token generation when the token was issued (its `gen` claim).
    Column("token_generation", Integer, nullable=False),
    # The personal access token the login used, if any (its `pat` claim).
    Column("personal_token_id", Integer, nullable=True),
    # The OAuth2 client_id the client sent, such as "docker".
    Column("client_id", String(100), nullable=True),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("issued_address", String(64), nullable=True),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime, nullable=True),
    Column("last_used_address", String(64), nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Index(None, "account_id"),
    Index(None, "expires_at"),
)

# Failed-login counters shared by every server process (moorage.auth.throttle
# has the policy). `scope` is pair, address or account; the part a scope does
# not use is ''. Times are seconds since the epoch.
login_failures = Table(
    "login_failures",
    metadata,
    Column("scope", String(16), primary_key=True),
    Column("login", String(200), primary_key=True),
    Column("address", String(64), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last_failure", Float, nullable=False),
    # Logins that this counter applies to are rejected until then.
    Column("blocked_until", Float, nullable=False),
    Index(None, "last_failure"),
)

# Addresses each login name last logged in from successfully, so that an
# attack on the account elsewhere does not slow it down from there.
login_addresses = Table(
    "login_addresses",
    metadata,
    Column("login", String(200), primary_key=True),
    Column("address", String(64), primary_key=True),
    Column("last_success", Float, nullable=False),
    Index(None, "last_success"),
)

# Keys wrapped by the installation key-encryption key: the data key of manifest
# content ("database") and the key-encryption key of each customer
# ("customer:<slug>") and of the vendor ("vendor"). Rotation rewraps these rows,
# never the data.
sealed_keys = Table(
    "sealed_keys",
    metadata,
    # What the key protects, such as "database" or "customer:acme".
    Column("name", String(128), primary_key=True),
    # The key-encryption key that wraps it.
    Column("key_id", String(200), nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

# Each stored object's data key, wrapped once per owner whose repositories
# reference it, under that owner's key-encryption key (in `sealed_keys`).
# Destroying an owner's key and its rows leaves an object readable only through
# the other owners' rows.
data_key_wraps = Table(
    "data_key_wraps",
    metadata,
    # The random id in the object's header, in hex.
    Column("object_id", String(32), primary_key=True),
    # "customer:<slug>" or "vendor": the name of the wrapping key in sealed_keys.
    Column("owner", String(128), primary_key=True),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Index(None, "owner"),
)

# The path at which each encrypted object is stored, by the object id in its
# header. The encrypting driver opens an object only at the path recorded for
# its id, so a whole file copied over another object's path fails its integrity
# check instead of serving the other object's content. A path may have several
# objects recorded: concurrent pushes of one blob each write a copy there, and
# whichever copy stays is one of them.
object_paths = Table(
    "object_paths",
    metadata,
    # The random id in the object's header, in hex.
    Column("object_id", String(32), primary_key=True),
    # The storage driver's key, such as "blobs/sha256/ab/ab12...".
    Column("path", String(1024), nullable=False),
    Index(None, "path"),
)

# Objects whose last data key wrap was deleted by shredding (`customer shred`),
# written in the transaction that destroys the owner's key. An object with no
# wrap and no envelope that is not listed here lost its wraps to damage, and
# reading it is reported as an integrity error rather than as shredded content.
shredded_objects = Table(
    "shredded_objects",
    metadata,
    # The random id in the object's header, in hex.
    Column("object_id", String(32), primary_key=True),
    # The owner whose key held the last wrap.
    Column("owner", String(128), nullable=False),
    Column("shredded_at", UTCDateTime, nullable=False, default=utcnow),
)

# The audit trail: append-only, each event hash-chained to the one before it
# (see moorage.audit.events for the hash). Rows are only ever inserted, except
# that retention archives the oldest ones to a file and then deletes them.
# On SQLite `seq` is declared INTEGER, so it is the table's rowid rather than
# a second B-tree beside it. Each pull there inserts into the table and its two
# indexes.
audit_events = Table(
    "audit_events",
    metadata,
    Column(
        "seq",
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("time", UTCDateTime, nullable=False),
    Column("actor_account", String(255), nullable=True),
    Column("actor_customer", String(64), nullable=True),
    Column("source_address", String(64), nullable=True),
    Column("user_agent", String(255), nullable=True),
    Column("action", String(64), nullable=False),
    Column("repository", String(255), nullable=True),
    Column("reference", String(255), nullable=True),
    Column("digest", String(200), nullable=True),
    Column("bytes", BigInteger, nullable=True),
    # success or failure
    Column("outcome", String(16), nullable=False),
    Column("reason", String(500), nullable=True),
    Column("request_id", String(64), nullable=True),
    # The request id of a related event, such as the manifest pull a blob
    # download belongs to.
    Column("link", String(64), nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index(None, "time"),
    Index(None, "action", "time"),
)

# One row (id 1): the newest event's sequence number and hash. Writers lock
# this row, so events from several processes form one chain.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# Signed statements "event `seq` has hash `hash`" (a compact ES256 JWS made
# with the token signing key `kid`).
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("time", UTCDateTime, nullable=False),
    Column("kid", String(64), nullable=False),
    Column("signature", Text, nullable=False),
)

# Ranges of events moved to an archive file by retention; the newest row's
# `last_seq` and `last_hash` are where the stored chain now starts.
audit_archives = Table(
    "audit_archives",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("first_seq", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_hash", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)


# Work that one process of the installation does at a time, such as garbage
# collection: a process holds the lease named `name` until `expires_at`, and
# renews it while it works.
maintenance_leases = Table(
    "maintenance_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)
