"""The alert detectors, driven with a controlled clock."""

from __future__ import annotations

import pytest

from moorage.audit.alerts import AlertDetector, AlertSettings
from moorage.audit.events import AuditEvent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def raised() -> list[AuditEvent]:
    return []


@pytest.fixture
def detector(clock: Clock, raised: list[AuditEvent]) -> AlertDetector:
    settings = AlertSettings(failed_logins=3, failed_login_seconds=60)
    return AlertDetector(settings, raised.append, clock)


def _failure(
    account: str, address: str, reason: str = "invalid username or password"
) -> AuditEvent:
    return AuditEvent(
        "auth.login",
        outcome="failure",
        actor_account=account,
        source_address=address,
        reason=reason,
    )


def test_burst_per_account(detector: AlertDetector, raised: list[AuditEvent]) -> None:
    """Three failures for one account from three addresses raise one alert."""
    for index in range(3):
        detector.observe(_failure("alice", f"10.0.0.{index}"))
    assert [alert.action for alert in raised] == ["alert.failed_logins"]
    assert (
        raised[0].reason
        == "3 or more failed logins for account alice within 60 seconds"
    )


def test_burst_per_address(detector: AlertDetector, raised: list[AuditEvent]) -> None:
    """Three failures from one address for three accounts raise one alert."""
    for name in ("a", "b", "c"):
        detector.observe(_failure(name, "10.0.0.9"))
    assert len(raised) == 1
    assert "address 10.0.0.9" in (raised[0].reason or "")


def test_burst_window_expires(
    detector: AlertDetector, raised: list[AuditEvent], clock: Clock
) -> None:
    """Three failures spread over more than the window raise nothing."""
    for index in range(3):
        detector.observe(_failure("alice", f"10.0.0.{index}"))
        clock.now += 31
    assert raised == []


def test_alert_repeats_after_quiet_period(
    detector: AlertDetector, raised: list[AuditEvent], clock: Clock
) -> None:
    """The same alert is raised once per repeat period, then again."""
    for index in range(6):
        detector.observe(_failure("alice", f"10.0.0.{index}"))
    assert len(raised) == 1
    clock.now += 601
    for index in range(3):
        detector.observe(_failure("alice", f"10.2.0.{index}"))
    assert len(raised) == 2


@pytest.mark.parametrize(
    "reason",
    [
        "account is disabled",
        "account has expired",
        "token has been revoked",
        "customer access is suspended",
        "customer access has ended",
    ],
)
def test_unusable_credential(
    detector: AlertDetector, raised: list[AuditEvent], reason: str
) -> None:
    """Each way a correct credential can be unusable raises an alert at once."""
    detector.observe(_failure("alice", "10.0.0.1", reason))
    assert [alert.action for alert in raised] == ["alert.unusable_credential"]
    assert raised[0].actor_account == "alice"


def test_expired_token_is_routine(
    detector: AlertDetector, raised: list[AuditEvent]
) -> None:
    """A bearer token past its lifetime is not an unusable-credential alert."""
    detector.observe(
        AuditEvent(
            "auth.token",
            outcome="failure",
            actor_account="alice",
            source_address="10.0.0.1",
            reason="invalid token: Signature has expired",
        )
    )
    assert raised == []


def test_shared_credential(detector: AlertDetector, raised: list[AuditEvent]) -> None:
    """One login from six addresses within the hour raises one alert."""
    for index in range(7):
        detector.observe(
            AuditEvent(
                "auth.login", actor_account="ci", source_address=f"10.3.0.{index}"
            )
        )
    assert [alert.action for alert in raised] == ["alert.shared_credential"]
    assert "from 6 addresses" in (raised[0].reason or "")


def test_alerts_ignore_alerts(
    detector: AlertDetector, raised: list[AuditEvent]
) -> None:
    """Alert events do not feed the detectors."""
    for _ in range(5):
        detector.observe(
            AuditEvent("alert.failed_logins", outcome="failure", actor_account="x")
        )
    assert raised == []


def test_alert_takes_customer_of_earlier_failure(
    detector: AlertDetector, raised: list[AuditEvent]
) -> None:
    """A burst whose last failure has no customer (a throttled login) raises
    its alert with the customer seen on an earlier failure for that account."""
    first = AuditEvent(
        "auth.login",
        outcome="failure",
        actor_account="alice",
        actor_customer="acme",
        source_address="10.0.0.1",
        reason="invalid username or password",
    )
    detector.observe(first)
    detector.observe(_failure("alice", "10.0.0.1", "too many failed logins"))
    detector.observe(_failure("alice", "10.0.0.1", "too many failed logins"))
    assert [alert.action for alert in raised] == [
        "alert.failed_logins",
        "alert.failed_logins",
    ]
    assert [alert.actor_customer for alert in raised] == ["acme", "acme"]


def test_unusable_personal_token_reasons(
    detector: AlertDetector, raised: list[AuditEvent]
) -> None:
    """The audit reasons for a revoked or expired personal access token and for
    a robot's rotated secret each raise an unusable-credential alert."""
    reasons = [
        "personal access token 1 (ci) was revoked",
        "personal access token 2 (ci) has expired",
        "old secret, revoked when the secret was rotated",
    ]
    for index, reason in enumerate(reasons):
        detector.observe(_failure(f"account-{index}", "10.0.0.1", reason))
    unusable = [a for a in raised if a.action == "alert.unusable_credential"]
    assert [alert.actor_account for alert in unusable] == [
        "account-0",
        "account-1",
        "account-2",
    ]
