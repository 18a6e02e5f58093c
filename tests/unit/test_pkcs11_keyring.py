"""Key-encryption keys on a PKCS#11 token (SoftHSM2)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from moorage.storage.drivers.filesystem import FilesystemDriver
from moorage.storage.encryption import maintenance
from moorage.storage.encryption.driver import EncryptedDriver
from moorage.storage.encryption.keys import KeyUnavailableError, UnwrapError
from tests.support.softhsm import SoftHsm, init_token


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """One token for the module; the PKCS#11 library is loaded once per process."""
    hsm = init_token(tmp_path_factory.mktemp("softhsm"))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.config)
    yield hsm
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


def keyring(hsm: SoftHsm):  # type: ignore[no-untyped-def]
    from moorage.storage.encryption.pkcs11 import Pkcs11Keyring

    return Pkcs11Keyring(str(hsm.library), hsm.token, hsm.pin)


def test_wrap_round_trip_on_token(softhsm: SoftHsm) -> None:
    """A data key wrapped on the token unwraps only with the same context."""
    kek = keyring(softhsm).active()
    data_key = os.urandom(32)
    wrapped = kek.wrap(data_key, b"context-a")
    assert data_key not in wrapped
    assert kek.unwrap(wrapped, b"context-a") == data_key
    with pytest.raises(UnwrapError):
        kek.unwrap(wrapped, b"context-b")


def test_unknown_key_is_unavailable(softhsm: SoftHsm) -> None:
    """Asking for a key the token does not hold raises KeyUnavailableError."""
    with pytest.raises(KeyUnavailableError):
        keyring(softhsm).get("hsm-19700101T000000000000-000000")


async def test_rotation_on_token(softhsm: SoftHsm, tmp_path: Path) -> None:
    """Objects stored under one token key read back after rotation retired it."""
    ring = keyring(softhsm)
    driver = EncryptedDriver(FilesystemDriver(tmp_path, fsync=False), ring)
    await driver.put("blobs/a", b"kept in the module" * 1000)
    old = ring.active().key_id
    await maintenance.rotate(driver)
    assert old not in ring.key_ids()
    assert ring.key_ids() == [ring.active().key_id]
    data = b"".join([chunk async for chunk in driver.read("blobs/a")])
    assert data == b"kept in the module" * 1000
