"""The token service's cache of verified access tokens keeps every check that
can change after the first verification: expiry and the signing key."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from moorage.auth.tokens import (
    LEEWAY_SECONDS,
    InvalidTokenError,
    TokenService,
    libtrust_key_id,
)
from moorage.db.identity_store import SigningKeyRecord


def _key_record() -> SigningKeyRecord:
    private_key = ec.generate_private_key(ec.SECP256R1())
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    kid = libtrust_key_id(private_key.public_key())
    return SigningKeyRecord(kid, "ES256", pem, datetime.now(UTC))


def test_cached_token_expires() -> None:
    """A token verified (and cached) while valid is rejected once it expires."""
    # Expired LEEWAY_SECONDS - 1 ago: valid for about one more second.
    service = TokenService([_key_record()], "moorage", 1 - LEEWAY_SECONDS)
    token = service.issue("alice", 0, []).token
    assert service.verify(token).subject == "alice"
    assert service.verify(token).subject == "alice"
    time.sleep(2)
    with pytest.raises(InvalidTokenError):
        service.verify(token)


def test_cached_token_key_retired() -> None:
    """A cached token is rejected once its signing key is retired."""
    record = _key_record()
    service = TokenService([record], "moorage", 300)
    token = service.issue("alice", 0, []).token
    assert service.verify(token).subject == "alice"
    retired = dataclasses.replace(
        record, retired_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    service._set_keys([_key_record(), retired])
    with pytest.raises(InvalidTokenError, match="retired"):
        service.verify(token)


def test_cached_token_key_removed() -> None:
    """A cached token is rejected once its signing key is no longer loaded."""
    service = TokenService([_key_record()], "moorage", 300)
    token = service.issue("alice", 0, []).token
    assert service.verify(token).subject == "alice"
    service._set_keys([_key_record()])
    with pytest.raises(InvalidTokenError, match="unknown key"):
        service.verify(token)


def test_refresh_token_not_cached_as_access() -> None:
    """A refresh token stays rejected as an access token however often it is sent."""
    service = TokenService([_key_record()], "moorage", 300)
    refresh = service.issue_refresh("alice", 0).token
    for _ in range(2):
        with pytest.raises(InvalidTokenError, match="not an access token"):
            service.verify(refresh)
