"""The files a certificate and key are loaded from after they were read once."""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import pytest

from moorage.tls import init_private_ca, memory_files, private_temporary_files


@pytest.fixture
def pair(tmp_path: Path) -> tuple[bytes, bytes]:
    created = init_private_ca("registry.test", tmp_path / "tls")
    return created.server_cert.read_bytes(), created.server_key.read_bytes()


def test_memory_files_load_into_context(pair: tuple[bytes, bytes]) -> None:
    with memory_files(*pair) as (cert_path, key_path):
        assert cert_path.startswith("/proc/self/fd/")
        assert Path(cert_path).read_bytes() == pair[0]
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
    assert not os.path.exists(cert_path)
    assert not os.path.exists(key_path)


def test_temporary_files_load_into_context(pair: tuple[bytes, bytes]) -> None:
    with private_temporary_files(*pair) as (cert_path, key_path):
        directory = Path(cert_path).parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        assert Path(key_path).read_bytes() == pair[1]
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
    assert not directory.exists()
