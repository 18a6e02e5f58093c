"""Build the audit log, its sinks and the alert detectors from the settings."""

from __future__ import annotations

from moorage.audit.alerts import AlertDetector, AlertPublisher, AlertSettings
from moorage.audit.checkpoints import CheckpointSigner
from moorage.audit.events import BLOB_PULL, MANIFEST_PULL
from moorage.audit.log import PENDING_DIRECTORY, DatabaseAuditLog, EventObserver
from moorage.audit.sinks import SyslogSink, WebhookSender
from moorage.config import Settings
from moorage.db.audit_store import AuditStore
from moorage.db.identity_store import SigningKeyRecord


def open_audit_log(
    store: AuditStore,
    settings: Settings,
    keys: list[SigningKeyRecord],
    observers: list[EventObserver],
    pending_key: bytes | None = None,
) -> DatabaseAuditLog:
    """Create the audit log; checkpoints use the newest token signing key, and
    files of events saved at shutdown carry an HMAC under `pending_key`."""
    signer = CheckpointSigner(keys[0].kid, keys[0].private_key) if keys else None
    audit = DatabaseAuditLog(
        store,
        signer,
        queue_size=settings.audit_queue_size,
        flush_seconds=settings.audit_flush_seconds,
        checkpoint_events=settings.audit_checkpoint_events,
        checkpoint_seconds=settings.audit_checkpoint_seconds,
        shutdown_seconds=settings.audit_shutdown_seconds,
        pending_dir=settings.data_dir / PENDING_DIRECTORY,
        pending_key=pending_key,
    )
    if settings.audit_syslog:
        audit.sinks.append(SyslogSink(settings.audit_syslog))
    if settings.audit_webhook_url:
        audit.sinks.append(WebhookSender(settings.audit_webhook_url))
    audit.public_keys = {
        "keys": [
            key
            for record in keys
            for key in CheckpointSigner(record.kid, record.private_key).jwks()["keys"]
        ]
    }
    audit.observers.extend(observers)
    alert_webhook = (
        WebhookSender(settings.alert_webhook_url, envelope="alerts")
        if settings.alert_webhook_url
        else None
    )
    publisher = AlertPublisher(audit.record, alert_webhook)
    audit.alert_webhook = alert_webhook
    detector = AlertDetector(
        AlertSettings(
            failed_logins=settings.alert_failed_logins,
            failed_login_seconds=settings.alert_failed_login_seconds,
            credential_addresses=settings.alert_credential_addresses,
        ),
        publisher,
    )
    audit.observers.append(detector.observe)
    # NOTE: every observer installed here ignores pulls: the detector watches
    # logins, tokens and integrity failures, and `Metrics.observe_event` counts
    # failed logins, token issues and alerts. An observer of pulls must take
    # them out of this set.
    audit.unobserved_actions = frozenset({MANIFEST_PULL, BLOB_PULL})
    return audit
