"""Build every service from the settings, once per process, and pass them on."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from moorage.api.access import RequestGuard
from moorage.api.http import ProxyTrust
from moorage.api.request_context import request_actor, request_repository
from moorage.audit.events import FAILURE, STORAGE_INTEGRITY, AuditEvent
from moorage.audit.log import AUDIT_PENDING_KEY, DatabaseAuditLog
from moorage.audit.recorder import Actor
from moorage.audit.setup import open_audit_log
from moorage.auth.authenticator import Authenticator, password_check_limit
from moorage.auth.secrets import SECRET_HASH_KEY
from moorage.auth.throttle import Limit, LoginThrottle, ThrottlePolicy
from moorage.auth.tokens import TokenService, open_signing_key, seal_signing_keys
from moorage.config import Settings
from moorage.db.audit_store import AuditStore
from moorage.db.engine import create_engine, migrate
from moorage.db.identity_store import IdentityStore
from moorage.db.key_store import KeyStore
from moorage.db.login_failure_store import LoginFailureStore
from moorage.db.refresh_token_store import RefreshTokenStore
from moorage.db.registry_store import ContentCodec, RegistryStore
from moorage.metrics import Metrics
from moorage.storage.drivers.filesystem import FilesystemDriver
from moorage.storage.encryption.driver import EncryptedDriver, log_integrity_error
from moorage.storage.encryption.format import DataKeyUnavailableError, IntegrityError
from moorage.storage.encryption.setup import (
    attach_owner_keys,
    database_codec,
    encrypting_layer,
    manifest_codec,
    open_keyring,
)
from moorage.storage.registry import Registry

log = structlog.get_logger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    identity: IdentityStore
    registry: Registry
    tokens: TokenService
    authenticator: Authenticator
    guard: RequestGuard
    trust: ProxyTrust
    audit: DatabaseAuditLog
    metrics: Metrics

    async def close(self) -> None:
        await self.audit.close()
        self.audit.store.close()
        self.identity.close()
        self.registry.store.close()
        await self.engine.dispose()


def throttle_policy(settings: Settings) -> ThrottlePolicy:
    """Return the failed-login policy with the configured free failures."""
    default = ThrottlePolicy()
    return ThrottlePolicy(
        pair=Limit(settings.login_free_failures_per_pair, default.pair.max_delay),
        address=Limit(
            settings.login_free_failures_per_address, default.address.max_delay
        ),
        account=Limit(
            settings.login_free_failures_per_account, default.account.max_delay
        ),
    )


async def open_services(settings: Settings, *, migrate_schema: bool = True) -> Services:
    """Connect to the database (migrating it unless `migrate_schema` is False)
    and the blob store."""
    # Opened first, so that an unusable key source (a wrong PKCS#11 PIN, an
    # invalid key variable) fails before a new installation is created.
    keyring = open_keyring(settings)
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = create_engine(settings.resolved_database_url)
    if migrate_schema:
        await migrate(engine)
    identity = IdentityStore(engine)
    driver = await encrypting_layer(
        FilesystemDriver(settings.resolved_storage_dir),
        settings,
        KeyStore(engine),
        keyring,
    )
    attach_owner_keys(engine, driver)
    codec = await database_codec(engine, driver)
    identity.codec = codec
    manifests = manifest_codec(driver, codec)
    registry = Registry(
        RegistryStore(engine, manifests), driver, settings.max_manifest_bytes
    )
    tokens = await TokenService.load(
        identity,
        settings.service_name,
        settings.token_ttl_seconds,
        settings.refresh_token_ttl_seconds,
        codec,
    )
    if codec is not None:
        await seal_stored_secrets(identity, codec)
    secret_key = await identity.server_key(SECRET_HASH_KEY)
    authenticator = Authenticator(
        identity,
        tokens,
        secret_key,
        LoginThrottle(LoginFailureStore(engine), throttle_policy(settings)),
        RefreshTokenStore(engine),
        max_password_checks=password_check_limit(settings.workers),
    )
    trust = ProxyTrust(settings.trusted_proxies)
    guard = RequestGuard(authenticator, settings, trust)
    metrics = Metrics()
    audit = open_audit_log(
        AuditStore(engine),
        settings,
        [
            open_signing_key(record, tokens.codec)
            for record in await identity.active_signing_keys()
        ],
        [metrics.observe_event],
        await identity.server_key(AUDIT_PENDING_KEY),
    )
    # Stored data that fails its integrity check becomes an audit event and an alert.
    if isinstance(driver, EncryptedDriver):
        driver.on_integrity_error = integrity_reporter(audit, trust)
    if codec is not None:
        codec.on_integrity_error = integrity_reporter(audit, trust)
    if manifests is not None:
        manifests.on_integrity_error = integrity_reporter(audit, trust)
    return Services(
        settings=settings,
        engine=engine,
        identity=identity,
        registry=registry,
        tokens=tokens,
        authenticator=authenticator,
        guard=guard,
        trust=trust,
        audit=audit,
        metrics=metrics,
    )


async def seal_stored_secrets(identity: IdentityStore, codec: ContentCodec) -> None:
    """Seal the signing keys and server keys that an installation stored in the
    clear before encryption was turned on. Each start runs this, and finds
    nothing to do after the first."""
    signing = await seal_signing_keys(identity, codec)
    server = await identity.seal_server_keys()
    if signing or server:
        log.info(
            "secrets stored in the clear sealed",
            signing_keys=signing,
            server_keys=server,
        )


_NO_ACTOR = Actor(account=None)
# A blob's digest in a storage path (blobs/sha256/ab/<hex>) or a manifest's name.
_DIGEST = re.compile(r"sha256[:/](?:[0-9a-f]{2}/)?([0-9a-f]{64})")


def integrity_reporter(
    audit: DatabaseAuditLog, trust: ProxyTrust
) -> Callable[[IntegrityError], None]:
    """Return the hook that the encryption layer calls when stored data fails
    its integrity check: it logs the failure and records a `storage.integrity`
    event, from which the alert detector raises `alert.tampered_storage`.

    A failure found while serving a request names that request's caller, source
    address, user agent, request id and repository, so the event and its alert
    match the failed request's own event. Called outside a request (a command,
    a background job), those fields stay empty.
    """
    writes: set[asyncio.Task[Any]] = set()

    def report(error: IntegrityError) -> None:
        log_integrity_error(error)
        if isinstance(error, DataKeyUnavailableError):
            return  # destroyed on purpose by shredding, not altered
        found = _DIGEST.search(error.path)
        actor = request_actor(trust) or _NO_ACTOR
        event = AuditEvent(
            STORAGE_INTEGRITY,
            outcome=FAILURE,
            actor_account=actor.account,
            actor_customer=actor.customer,
            source_address=actor.source_address,
            user_agent=actor.user_agent,
            repository=request_repository(),
            digest=f"sha256:{found.group(1)}" if found else None,
            reason=f"{error.path}: {error.reason}",
            request_id=actor.request_id,
        )
        write = asyncio.get_running_loop().create_task(audit.record(event))
        writes.add(write)
        write.add_done_callback(writes.discard)

    return report
