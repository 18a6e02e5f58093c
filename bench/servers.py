"""Start the registries under test on loopback, each in its own directory.

Moorage runs as `python -m moorage serve` with a fresh SQLite data directory,
without encryption at rest because distribution stores blobs in plaintext. For
the encrypted/plaintext ratio a second Moorage runs with encryption at rest on.
The CNCF distribution registry (Debian's `docker-registry`) runs with its own
YAML config, filesystem storage and token auth. Moorage's `/token` is its token
server: Moorage signs ES256 JWTs whose `kid` is the libtrust key ID, so
distribution trusts them given a certificate for Moorage's signing key.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from moorage import admin
from moorage.auth.tokens import open_signing_key
from moorage.config import Settings
from moorage.services import open_services

SERVICE = "moorage"
CUSTOMER = "bench"
USER = "bench-user"
PASSWORD = "bench-user-password-1"  # noqa: S105 - a throwaway account on loopback
ADMIN_PASSWORD = "bench-admin-password-1"  # noqa: S105 - same
DISTRIBUTION_BINARY = "docker-registry"
# The name of the Moorage registry that runs with encryption at rest.
ENCRYPTED = "moorage-encrypted"


# A range of loopback ports ("FIRST-LAST") to start the registries on, for a
# machine where each user of the benchmarks has ports of their own. Unset, the
# kernel picks a free port.
PORTS_VARIABLE = "BENCH_PORTS"


def free_port() -> int:
    """Return a free loopback port, from the range in BENCH_PORTS when set."""
    ports = os.environ.get(PORTS_VARIABLE)
    if not ports:
        return _bound_port(0)
    first, _, last = ports.partition("-")
    try:
        candidates = list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(
            f"{PORTS_VARIABLE}={ports!r} is not a port range such as 23000-23999"
        ) from None
    random.shuffle(candidates)
    for port in candidates:
        try:
            return _bound_port(port)
        except OSError:
            continue
    raise RuntimeError(
        f"no free loopback port in {PORTS_VARIABLE}={ports}; "
        "widen the range or unset it"
    )


def _bound_port(port: int) -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
        return int(probe.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited; see {log}:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - loopback http
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within 60 s; see {log}")


@dataclass
class Registry:
    """One running registry: its name, base URL and server process."""

    name: str
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @property
    def token_url(self) -> str:
        """The token service whose tokens this registry accepts."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class MoorageRegistry(Registry):
    """Moorage with its own token service; `encrypted` turns encryption at rest on."""

    encrypted: bool = False
    workers: int = 2
    robot: tuple[str, str] = ("", "")
    # Further MOORAGE_ settings for the server process.
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def start(self) -> None:
        """Start the server on a fresh data directory and add the bench accounts."""
        self.launch()
        asyncio.run(self._add_accounts())

    def launch(self) -> None:
        """Start the server process on the data directory as it is."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOORAGE_")}
        env.update(
            MOORAGE_DATA_DIR=str(self.directory / "data"),
            MOORAGE_ADMIN_PASSWORD=ADMIN_PASSWORD,
            MOORAGE_LOG_FORMAT="json",
            MOORAGE_TOKEN_TTL_SECONDS="3600",  # noqa: S106 - not a secret
            MOORAGE_ENCRYPTION="true" if self.encrypted else "false",
            MOORAGE_WORKERS=str(self.workers),
        )
        env.update(self.environment)
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moorage", "serve", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until_up(f"{self.url}/healthz", self.process, self.log_path)

    def settings(self) -> Settings:
        return Settings(data_dir=self.directory / "data", encryption=self.encrypted)

    async def _add_accounts(self) -> None:
        services = await open_services(self.settings())
        try:
            await admin.add_customer(services.identity, CUSTOMER, CUSTOMER, None)
            await admin.add_user(services.identity, CUSTOMER, USER, "writer", PASSWORD)
            robot = await admin.add_robot(services.identity, CUSTOMER, "ci", "reader")
        finally:
            await services.close()
        assert robot.password is not None
        self.robot = (robot.login, robot.password)

    def signing_certificate(self) -> bytes:
        """Wrap the token signing key's public half in a self-signed certificate."""
        return asyncio.run(self._signing_certificate())

    async def _signing_certificate(self) -> bytes:
        services = await open_services(self.settings())
        try:
            record = open_signing_key(
                (await services.identity.active_signing_keys())[0],
                services.tokens.codec,
            )
        finally:
            await services.close()
        key = serialization.load_pem_private_key(record.private_key.encode(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moorage token")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM)


DISTRIBUTION_CONFIG = """\
version: 0.1
log:
  level: info
  formatter: json
storage:
  filesystem:
    rootdirectory: {storage}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
auth:
  token:
    realm: {realm}
    service: {service}
    issuer: moorage
    rootcertbundle: {bundle}
"""


@dataclass
class DistributionRegistry(Registry):
    """distribution, trusting the tokens of a Moorage registry's token service."""

    realm: str = ""

    @property
    def token_url(self) -> str:
        return self.realm

    @property
    def storage(self) -> Path:
        return self.directory / "storage"

    def start(self, token_realm: str, certificate: bytes) -> None:
        self.realm = token_realm
        self.directory.mkdir(parents=True, exist_ok=True)
        bundle = self.directory / "token-cert.pem"
        bundle.write_bytes(certificate)
        config = self.directory / "config.yml"
        config.write_text(
            DISTRIBUTION_CONFIG.format(
                storage=self.storage,
                port=self.port,
                realm=token_realm,
                service=SERVICE,
                bundle=bundle,
            )
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [DISTRIBUTION_BINARY, "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until_up(f"{self.url}/v2/", self.process, self.log_path)


def distribution_version() -> str:
    found = shutil.which(DISTRIBUTION_BINARY)
    if found is None:
        return "not installed"
    result = subprocess.run([found, "--version"], capture_output=True, text=True)
    return result.stdout.strip().split()[-1]


def start_registries(
    root: Path, moorage_workers: int, *, encrypted: bool
) -> list[Registry]:
    """Start Moorage, distribution and, if `encrypted`, an encrypted Moorage.

    The encrypted Moorage issues its own tokens: each Moorage signs with a key
    of its own database.
    """
    moorage = MoorageRegistry("moorage", root / "moorage", workers=moorage_workers)
    started: list[Registry] = [moorage]
    try:
        moorage.start()
        distribution = DistributionRegistry("distribution", root / "distribution")
        started.append(distribution)
        distribution.start(moorage.token_url, moorage.signing_certificate())
        if encrypted:
            sealed = MoorageRegistry(
                ENCRYPTED,
                root / ENCRYPTED,
                encrypted=True,
                workers=moorage_workers,
            )
            started.append(sealed)
            sealed.start()
    except BaseException:
        for registry in started:
            registry.stop()
        raise
    return started
