"""TLS for the registry: the server context, certificate reloads and a private CA.

The context accepts TLS 1.2 and 1.3 only, and on TLS 1.2 only ECDHE key exchange
with AEAD ciphers (AES-GCM, ChaCha20-Poly1305); TLS 1.3 suites are all AEAD.

A renewed certificate is picked up without a restart: `CertificateReloader`
loads the files again into the same `ssl.SSLContext` object on SIGHUP and when
either file changes. OpenSSL copies the certificate into each new connection
when it starts, so new handshakes see the new certificate and open connections
keep the old one. A failed `load_cert_chain` can leave a context with the new
certificate and no key, which fails every handshake, so a reload first loads
the pair into a spare context and touches the live one only when that worked.

Moorage never decrypts a key, because OpenSSL would prompt for the passphrase
on the terminal. An encrypted key is rejected with an error instead.

Client certificates are revoked by a certificate revocation list (CRL) file,
checked by Moorage rather than by OpenSSL: the handshake still succeeds, and a
request that presents a revoked certificate fails to authenticate, so that the
failure is audited and raises the alert for revoked credentials. The file is
read again with the certificate, so a revocation needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
import signal
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import idna
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from moorage.errors import MoorageError, UnauthorizedError
from moorage.fsync import fsync_directory
from moorage.httplimits import LimitedHttpToolsProtocol
from moorage.logs import connection_logger

log = structlog.get_logger(__name__)

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
HSTS_VALUE = b"max-age=31536000"
CA_DAYS = 3650
SERVER_DAYS = 397
# X.509 caps a common name at 64 characters (RFC 5280, ub-common-name); a longer
# DNS name goes into the subject alternative name only.
MAX_COMMON_NAME = 64
MAX_DNS_NAME = 253
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[..., Awaitable[Any]], Callable[..., Any]],
    Awaitable[None],
]


def server_context(
    cert_file: Path, key_file: Path, client_ca: Path | None = None
) -> ssl.SSLContext:
    """Return a server context for TLS 1.2+ with modern AEAD ciphers only.

    With `client_ca`, clients may present a certificate, which must chain to it.
    Raises TlsSetupError naming the file when a file cannot be read or used.
    """
    context = _policy_context()
    pair = read_key_pair(cert_file, key_file)
    pair.load_into(context)
    if client_ca is not None:
        _check_readable(client_ca, "client CA certificate")
        try:
            context.load_verify_locations(client_ca)
        except ssl.SSLError as error:
            raise TlsSetupError(
                f"client CA certificate {client_ca} does not load: "
                f"{error.reason or error}; give a PEM file of CA certificates"
            ) from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _policy_context() -> ssl.SSLContext:
    """Return a server context with the protocol and cipher policy, no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    return context


class TlsSetupError(MoorageError):
    """A TLS file cannot be read or used, or a name cannot go into a certificate."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate (chain) and its private key, read once from their files.

    Loading from these bytes, not from the files, makes a check and the load
    that follows it see the same pair while the files are being replaced.
    """

    cert_file: Path
    key_file: Path
    cert_pem: bytes
    key_pem: bytes

    def load_into(self, context: ssl.SSLContext) -> None:
        """Load the pair into `context`; raise TlsSetupError naming the file.

        When this raises, `context` may hold the new certificate without a key.
        """
        with _unnamed_files(self.cert_pem, self.key_pem) as (cert_path, key_path):
            try:
                context.load_cert_chain(
                    cert_path, key_path, password=_reject_passphrase
                )
            except _PassphraseRequested:
                raise TlsSetupError(_encrypted_key_message(self.key_file)) from None
            except ssl.SSLError as error:
                raise TlsSetupError(
                    _load_failure(self.cert_file, self.key_file, error)
                ) from None


def read_key_pair(cert_file: Path, key_file: Path) -> KeyPair:
    """Read both files; raise TlsSetupError naming the one that cannot be read."""
    return KeyPair(
        cert_file,
        key_file,
        _read(cert_file, "TLS certificate"),
        _read(key_file, "TLS private key"),
    )


class _PassphraseRequested(Exception):
    """OpenSSL asked for the passphrase of an encrypted key."""


def _reject_passphrase() -> bytes:
    # Without a password callback, OpenSSL prompts on the terminal and blocks.
    raise _PassphraseRequested


def _encrypted_key_message(key_file: Path) -> str:
    return (
        f"the TLS private key {key_file} is encrypted with a passphrase, and "
        "Moorage does not take passphrases; give an unencrypted PEM key that "
        "only the user running the server can read (`openssl pkey -in "
        "ENCRYPTED.key -out KEY.key` writes one)"
    )


def _unnamed_files(*contents: bytes) -> contextlib.AbstractContextManager[list[str]]:
    """Return a context that yields paths OpenSSL can open, one per item.

    `load_cert_chain` takes only paths. On Linux the bytes go into memory files,
    so a private key is never written to a disk.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        return memory_files(*contents)
    return private_temporary_files(*contents)


@contextlib.contextmanager
def memory_files(*contents: bytes) -> Iterator[list[str]]:
    """Yield /proc/self/fd paths of anonymous memory files (memfd) with `contents`."""
    descriptors: list[int] = []
    try:
        for data in contents:
            descriptor = os.memfd_create("moorage-tls", os.MFD_CLOEXEC)
            descriptors.append(descriptor)
            with open(descriptor, "wb", closefd=False) as memory_file:
                memory_file.write(data)
        yield [f"/proc/self/fd/{descriptor}" for descriptor in descriptors]
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


@contextlib.contextmanager
def private_temporary_files(*contents: bytes) -> Iterator[list[str]]:
    """Yield paths of files with `contents` in a new directory only this user can
    enter (mode 0700, files 0600); remove it on exit."""
    with tempfile.TemporaryDirectory(prefix="moorage-tls-") as directory:
        paths = []
        for index, data in enumerate(contents):
            path = Path(directory) / str(index)
            _write_private(path, data)
            paths.append(str(path))
        yield paths


def _read(path: Path, description: str) -> bytes:
    """Return the contents of `path`; raise TlsSetupError naming it."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsSetupError(
            f"cannot read {description} {path}: {error.strerror or error}"
        ) from None


def _check_readable(path: Path, what: str) -> None:
    """Raise TlsSetupError naming `path` when it cannot be opened for reading.

    OpenSSL's own error for a missing file names neither the file nor the option.
    """
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise TlsSetupError(
            f"cannot read {what} {path}: {error.strerror or error}"
        ) from None


def _load_failure(cert_file: Path, key_file: Path, error: ssl.SSLError) -> str:
    if error.reason == "KEY_VALUES_MISMATCH":
        return (
            f"TLS private key {key_file} does not belong to the certificate "
            f"{cert_file}; give the key the certificate was issued for"
        )
    return (
        f"TLS certificate {cert_file} and key {key_file} do not load: "
        f"{error.reason or error}; give a PEM certificate (chain) and its "
        "unencrypted PEM private key"
    )


class ClientRevocations:
    """The certificates that a revocation list file revokes, by issuer and serial.

    Every CRL in the file must be signed by a CA certificate of the client CA
    file. The lists' update times are not checked, because the file is the
    vendor's own and is read again when it changes.
    """

    def __init__(self, crl_file: Path, ca_file: Path) -> None:
        self.crl_file = crl_file
        self.ca_file = ca_file
        self._stamp = _stamp_of(crl_file, ca_file)
        self._revoked = read_revocations(crl_file, ca_file)

    def is_revoked(self, cert: x509.Certificate) -> bool:
        return (cert.issuer.public_bytes(), cert.serial_number) in self._revoked

    def reload(self) -> bool:
        """Read the files again; keep the previous list when they do not load."""
        try:
            self._stamp = _stamp_of(self.crl_file, self.ca_file)
            self._revoked = read_revocations(self.crl_file, self.ca_file)
        except (OSError, TlsSetupError) as error:
            log.warning(
                "client certificate revocation list reload failed; still using "
                "the previous one",
                crl_file=str(self.crl_file),
                error=str(error),
            )
            return False
        log.info("client certificate revocation list loaded", revoked=len(self))
        return True

    def reload_if_changed(self) -> None:
        try:
            changed = _stamp_of(self.crl_file, self.ca_file) != self._stamp
        except OSError:
            return
        if changed:
            self.reload()

    def __len__(self) -> int:
        return len(self._revoked)


_CRL_BEGIN = b"-----BEGIN X509 CRL-----"
_CRL_PEM = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def _crl_pem_blocks(data: bytes, crl_file: Path) -> list[bytes]:
    """Return the PEM CRL blocks of a revocation list file's contents.

    An empty file is an empty list. Raises TlsSetupError when a non-empty file
    has no PEM CRL or a block that does not end (a file cut short), because
    reading only the complete blocks would drop revoked serials silently.
    """
    blocks: list[bytes] = _CRL_PEM.findall(data)
    if not blocks and data.strip():
        raise TlsSetupError(
            f"client certificate revocation list {crl_file} contains no PEM CRL "
            "(-----BEGIN X509 CRL-----); `moorage tls revoke-client` writes one"
        )
    if data.count(_CRL_BEGIN) != len(blocks):
        raise TlsSetupError(
            f"client certificate revocation list {crl_file} contains a PEM CRL "
            "with no -----END X509 CRL----- line, as a file cut short does; "
            "restore the file from a backup"
        )
    return blocks


def read_revocations(crl_file: Path, ca_file: Path) -> frozenset[tuple[bytes, int]]:
    """Return (issuer, serial number) of each certificate that `crl_file` revokes.

    Raises TlsSetupError naming the file when it contains no PEM CRL, a CRL does
    not parse, or a CRL is not signed by a CA certificate in `ca_file`.
    """
    data = _read(crl_file, "client certificate revocation list")
    blocks = _crl_pem_blocks(data, crl_file)
    try:
        authorities = x509.load_pem_x509_certificates(
            _read(ca_file, "client CA certificate")
        )
    except ValueError as error:
        raise TlsSetupError(
            f"client CA certificate {ca_file} is invalid: {error}"
        ) from None
    revoked: set[tuple[bytes, int]] = set()
    for block in blocks:
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError as error:
            raise TlsSetupError(
                f"a revocation list in {crl_file} is invalid: {error}"
            ) from None
        if not any(
            authority.subject == crl.issuer
            and crl.is_signature_valid(authority.public_key())  # type: ignore[arg-type]
            for authority in authorities
        ):
            raise TlsSetupError(
                f"a revocation list in {crl_file} (issuer "
                f"{crl.issuer.rfc4514_string()}) is not signed by a CA in {ca_file}"
            )
        issuer = crl.issuer.public_bytes()
        revoked.update((issuer, entry.serial_number) for entry in crl)
    return frozenset(revoked)


def _stamp_of(*paths: Path) -> tuple[int, ...]:
    """Return the files' modification and status-change times.

    The status-change time also moves on chmod, chown and a rename onto the
    path, so a fixed permission or an atomic replacement counts as a change.
    """
    stamp: list[int] = []
    for path in paths:
        status = os.stat(path)
        stamp += (status.st_mtime_ns, status.st_ctime_ns)
    return tuple(stamp)


class ClientCertificateProtocol(LimitedHttpToolsProtocol):
    """uvicorn's HTTP protocol, adding the ASGI TLS extension with the client's
    verified certificate (`client_cert_chain`, `client_cert_name`) to each scope.

    A certificate that `revocations` lists gets `client_cert_error` "revoked",
    checked at each request, so that a revocation also ends open connections.
    """

    _client_cert: x509.Certificate | None = None
    revocations: ClientRevocations | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.logger = connection_logger(self.logger, self.client)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if der:
            self._client_cert = x509.load_der_x509_certificate(der)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        cert = self._client_cert
        if cert is not None:
            pem = cert.public_bytes(serialization.Encoding.PEM).decode()
            extension: dict[str, Any] = {
                "client_cert_chain": [pem],
                "client_cert_name": cert.subject.rfc4514_string(),
            }
            if self.revocations is not None and self.revocations.is_revoked(cert):
                extension["client_cert_error"] = REVOKED
            # uvicorn types the scope without the TLS extension.
            self.scope["extensions"] = {"tls": extension}  # type: ignore[typeddict-unknown-key,dict-item]


REVOKED = "revoked"


def client_certificate_protocol(
    revocations: ClientRevocations | None,
) -> type[ClientCertificateProtocol]:
    """Return the protocol class that checks certificates against `revocations`."""
    return type(
        "RevocationCheckingProtocol",
        (ClientCertificateProtocol,),
        {"revocations": revocations},
    )


def client_certificate_login(scope: MutableMapping[str, Any]) -> str | None:
    """Return the common name of the verified client certificate, if one was sent.

    Raises UnauthorizedError for a revoked certificate.
    """
    extension = scope.get("extensions", {}).get("tls", {})
    chain = extension.get("client_cert_chain")
    if not chain:
        return None
    cert = x509.load_pem_x509_certificate(chain[0].encode())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    login = str(names[0].value) if names else None
    if extension.get("client_cert_error") == REVOKED:
        raise UnauthorizedError(
            "the client certificate is revoked",
            reason=f"client certificate {cert.serial_number:x} revoked",
            login=login,
        )
    return login


class CertificateReloader:
    """Loads a certificate and key again into one live context when they change,
    and the client certificate revocation list, if there is one."""

    def __init__(
        self,
        context: ssl.SSLContext,
        cert_file: Path,
        key_file: Path,
        stamp: tuple[int, ...],
        revocations: ClientRevocations | None = None,
    ) -> None:
        self.context = context
        self.cert_file = cert_file
        self.key_file = key_file
        self._stamp = stamp
        self.revocations = revocations

    @classmethod
    def load(
        cls,
        cert_file: Path,
        key_file: Path,
        client_ca: Path | None,
        client_crl: Path | None = None,
    ) -> CertificateReloader:
        """Load a new `server_context` from the files; raise TlsSetupError.

        The files' times are taken before the files are read, so a change made
        while they are read counts as a change at the next check.
        """
        stamp = _stamp_of(cert_file, key_file)
        context = server_context(cert_file, key_file, client_ca)
        revocations = None
        if client_crl is not None and client_ca is not None:
            revocations = ClientRevocations(client_crl, client_ca)
        return cls(context, cert_file, key_file, stamp, revocations)

    def _current_stamp(self) -> tuple[int, ...]:
        return _stamp_of(self.cert_file, self.key_file)

    def reload(self) -> bool:
        """Load the files again; keep the old certificate when they do not load.

        The revocation list is read again too, and kept apart: a failure of one
        leaves the other's reload in place.

        The pair is loaded into a spare context first, because a failed load
        into the live one can leave it with no usable key. A pair that fails is
        tried again on SIGHUP or when a file changes again, not at every poll.
        """
        if self.revocations is not None:
            self.revocations.reload()
        try:
            self._stamp = self._current_stamp()
            pair = read_key_pair(self.cert_file, self.key_file)
            pair.load_into(_policy_context())
        except (OSError, TlsSetupError) as error:
            log.warning(
                "tls certificate reload failed; still serving the previous one",
                cert_file=str(self.cert_file),
                key_file=str(self.key_file),
                error=str(error),
            )
            return False
        try:
            pair.load_into(self.context)
        except (OSError, TlsSetupError) as error:
            # NOTE: the same bytes loaded into the spare context a moment ago,
            # so only a lack of memory or descriptors should get here, and the
            # live context may then fail handshakes until a reload succeeds.
            log.error(
                "tls certificate reload failed after its check; new connections "
                "may fail until a reload succeeds",
                cert_file=str(self.cert_file),
                key_file=str(self.key_file),
                error=str(error),
            )
            return False
        log.info("tls certificate loaded", cert_file=str(self.cert_file))
        return True

    def reload_if_changed(self) -> None:
        if self.revocations is not None:
            self.revocations.reload_if_changed()
        try:
            changed = self._current_stamp() != self._stamp
        except OSError:
            return
        if changed:
            self.reload()

    def install_signal_handler(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    async def watch(self, interval: float) -> None:
        """Poll the files' modification times until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()


class StrictTransportSecurity:
    """ASGI middleware that adds Strict-Transport-Security to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[..., Awaitable[Any]],
        send: Callable[..., Any],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"strict-transport-security", HSTS_VALUE))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_header)


# A private certificate authority for a quick start.


@dataclass(frozen=True, slots=True)
class CreatedCertificates:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def as_tuple(self) -> tuple[Path, Path, Path, Path]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key)


def _output_paths(out: Path) -> CreatedCertificates:
    return CreatedCertificates(
        out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key"
    )


def server_name(hostname: str) -> str:
    """Return `hostname` as it goes into a certificate; raise TlsSetupError.

    An IP address comes back in its normal form. A DNS name comes back in ASCII:
    lowercased, with internationalised labels as IDNA 2008 A-labels (`xn--...`),
    each label 1 to 63 letters, digits or inner hyphens.
    """
    if not hostname:
        raise TlsSetupError(
            "the hostname is empty; give the name clients use to reach the "
            "registry, such as registry.example.com"
        )
    try:
        return str(ipaddress.ip_address(hostname))
    except ValueError:
        pass
    try:
        name = idna.encode(hostname, uts46=True).decode("ascii")
    except idna.IDNAError as error:
        raise TlsSetupError(
            f"invalid hostname {hostname!r}: {error}; give a DNS name such as "
            "registry.example.com or an IP address"
        ) from None
    labels = name.split(".")
    if len(name) > MAX_DNS_NAME or not all(_DNS_LABEL.fullmatch(x) for x in labels):
        raise TlsSetupError(
            f"invalid hostname {hostname!r}: a DNS name has at most {MAX_DNS_NAME} "
            "characters, in dot-separated labels of 1 to 63 letters, digits and "
            "hyphens, with no hyphen at either end of a label and no trailing dot"
        )
    return name


def existing_outputs(out: Path) -> list[Path]:
    """Return the files `init_private_ca` would overwrite in `out`."""
    return [path for path in _output_paths(out).as_tuple() if path.exists()]


def init_private_ca(
    hostname: str, out: Path, *, force: bool = False
) -> CreatedCertificates:
    """Create a CA and a server certificate for `hostname`, localhost and 127.0.0.1.

    Raises TlsSetupError when `hostname` is invalid, or when one of the files
    exists already and `force` is false: a new CA key would break every client
    that trusts the old CA and every client certificate it signed.
    """
    name = server_name(hostname)
    existing = existing_outputs(out)
    if existing and not force:
        listed = ", ".join(str(path) for path in existing)
        raise TlsSetupError(
            f"not replacing the existing files {listed}: a new CA would break "
            "every client that trusts the old one and every client certificate "
            "it signed. Use another --out, or pass --force to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, now)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(name, server_key, ca_cert, ca_key, now)

    created = _output_paths(out)
    _write_private(created.ca_key, _key_pem(ca_key))
    created.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(created.server_key, _key_pem(server_key))
    created.server_cert.write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
    )
    return created


def _ca_certificate(
    ca_key: ec.EllipticCurvePrivateKey, now: datetime.datetime
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Moorage private CA")])
    return (
        _builder(name, name, ca_key.public_key(), now, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _server_certificate(
    hostname: str,
    server_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
) -> x509.Certificate:
    attributes = []
    if len(hostname) <= MAX_COMMON_NAME:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, hostname))
    name = x509.Name(attributes)
    return (
        _builder(name, ca_cert.subject, server_key.public_key(), now, SERVER_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(_alternative_names(hostname)),
            # RFC 5280 requires a critical SAN when the subject is empty.
            critical=not attributes,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def issue_client_certificate(ca_dir: Path, login: str, out: Path) -> Path:
    """Sign a client certificate for `login` with the CA in `ca_dir`.

    Writes `<login>.cert` and `<login>.key`, the pair of names that docker,
    podman and skopeo look for in a certificates directory; returns the first.
    Raises TlsSetupError when those files would land outside `out` or the CA
    files do not load. The caller checks that `login` is a valid login.
    """
    cert_path = out / f"{login}.cert"
    key_path = out / f"{login}.key"
    for path in (cert_path, key_path):
        if path.resolve().parent != out.resolve():
            raise TlsSetupError(
                f"login {login!r} would write {path.resolve()} outside {out}"
            )
    ca_cert, ca_key = _load_ca(ca_dir)
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, login)])
    cert = (
        _builder(name, ca_cert.subject, key.public_key(), now, SERVER_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def revoke_client_certificates(ca_dir: Path, crl_file: Path, serials: list[int]) -> int:
    """Add `serials` to the CA's revocation list in `crl_file` and sign it again.

    Creates the file when it does not exist; keeps the serials it lists. The
    new list replaces the file in one rename, so a server reads either the old
    list or the new one. Runs at the same time take turns on an exclusive
    flock of `crl_file.lock`, so each one reads the list that the one before
    it wrote, and no serial is lost. Returns how many serials the list
    contains now. Raises TlsSetupError when the CA does not load or
    `crl_file` holds a list from another CA.
    """
    ca_cert, ca_key = _load_ca(ca_dir)
    with _locked(crl_file):
        return _add_revocations(ca_cert, ca_key, crl_file, serials)


@contextlib.contextmanager
def _locked(crl_file: Path) -> Iterator[None]:
    """Hold an exclusive flock of the file `crl_file.lock` next to the list.

    The lock file stays, because removing it while another run waits on it
    would let a third run lock a new file of the same name at the same time.
    """
    lock_path = crl_file.with_name(crl_file.name + ".lock")
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise TlsSetupError(
            f"cannot write revocation list {crl_file}: cannot open its lock file "
            f"{lock_path}: {error.strerror or error}"
        ) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(descriptor)


def _add_revocations(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    crl_file: Path,
    serials: list[int],
) -> int:
    now = datetime.datetime.now(datetime.UTC)
    entries: dict[int, datetime.datetime] = {}
    if crl_file.exists():
        # A damaged file is rejected rather than replaced: a new list built from
        # the blocks that still parse would un-revoke the serials of the others.
        data = _read(crl_file, "revocation list")
        for block in _crl_pem_blocks(data, crl_file):
            try:
                crl = x509.load_pem_x509_crl(block)
            except ValueError as error:
                raise TlsSetupError(
                    f"revocation list {crl_file} is invalid: {error}"
                ) from None
            if crl.issuer != ca_cert.subject or not crl.is_signature_valid(
                ca_key.public_key()
            ):
                raise TlsSetupError(
                    f"{crl_file} contains a revocation list of another CA "
                    f"({crl.issuer.rfc4514_string()}); give the --ca-dir that "
                    "issued it, or another --crl file"
                )
            for entry in crl:
                entries[entry.serial_number] = entry.revocation_date_utc
    for serial in serials:
        entries.setdefault(serial, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        # Moorage does not check the next update. For tools that do, the list
        # is valid as long as the CA.
        .next_update(ca_cert.not_valid_after_utc)
    )
    for serial, revoked_at in sorted(entries.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(revoked_at)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _replace_durably(crl_file, crl.public_bytes(serialization.Encoding.PEM))
    return len(entries)


def _replace_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `path.partial`, fsync and one rename.

    Callers hold the lock of `_locked`, because two runs at once would share
    `path.partial`.

    Without the fsyncs a crash soon after the rename can leave an empty file,
    which reads as an empty revocation list. The new file keeps the mode of the
    file it replaces, or gets 0644 (a CRL is public), whatever the umask.
    """
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, path)
        fsync_directory(path.parent)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise TlsSetupError(
            f"cannot write revocation list {path}: {error.strerror or error}"
        ) from None


def certificate_serial(cert_file: Path) -> int:
    """Return the serial number of the PEM certificate in `cert_file`."""
    try:
        return x509.load_pem_x509_certificate(
            _read(cert_file, "client certificate")
        ).serial_number
    except ValueError as error:
        raise TlsSetupError(f"{cert_file} is not a PEM certificate: {error}") from None


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_file, key_file = ca_dir / "ca.crt", ca_dir / "ca.key"
    _check_readable(cert_file, "CA certificate")
    _check_readable(key_file, "CA private key")
    try:
        ca_cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        ca_key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    except TypeError:
        # cryptography raises TypeError for an encrypted key when given no
        # password; it never prompts.
        raise TlsSetupError(
            f"the CA private key {key_file} is encrypted with a passphrase, and "
            "Moorage does not take passphrases; give a --ca-dir whose ca.key is "
            "unencrypted, as `moorage tls init` writes it"
        ) from None
    except ValueError as error:
        raise TlsSetupError(
            f"the CA in {ca_dir} does not load: {error}; give the --ca-dir that "
            "`moorage tls init` wrote"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TlsSetupError(f"{key_file} is not the EC key that tls init writes")
    return ca_cert, ca_key


def trust_instructions(hostname: str, port: int, ca_cert: Path) -> str:
    """Explain how docker, podman and containerd trust the private CA.

    The text contains TOML tables in brackets, so print it without markup.
    """
    try:
        bracketed = ipaddress.ip_address(hostname).version == 6
    except ValueError:
        bracketed = False
    host = f"[{hostname}]:{port}" if bracketed else f"{hostname}:{port}"
    return f"""\
Trust the CA on each client machine (as root):

  docker:     mkdir -p /etc/docker/certs.d/{host}
              cp {ca_cert} /etc/docker/certs.d/{host}/ca.crt
  podman:     mkdir -p /etc/containers/certs.d/{host}
              cp {ca_cert} /etc/containers/certs.d/{host}/ca.crt
              (skopeo and buildah read the same directory; or pass --cert-dir)
  containerd: mkdir -p /etc/containerd/certs.d/{host}
              cp {ca_cert} /etc/containerd/certs.d/{host}/ca.crt
              and write /etc/containerd/certs.d/{host}/hosts.toml:
                server = "https://{host}"
                [host."https://{host}"]
                  ca = "/etc/containerd/certs.d/{host}/ca.crt"
              (needs config_path = "/etc/containerd/certs.d" in the CRI registry
              section of /etc/containerd/config.toml)
"""


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _alternative_names(hostname: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in dict.fromkeys([hostname, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
