"""Settings: one typed model, read from a TOML file and `MOORAGE_` variables.

Precedence, highest first: keyword arguments (the command line), environment
variables (`MOORAGE_DATA_DIR`, `MOORAGE_DATABASE_URL`, ...), the TOML file named
by `MOORAGE_CONFIG` (default `<data dir>/moorage.toml`), then the defaults below.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATA_DIR = Path("./data")


class Settings(BaseSettings):
    """Moorage configuration; every field can be set as `MOORAGE_<FIELD>`."""

    model_config = SettingsConfigDict(
        env_prefix="MOORAGE_",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR,
        description="Directory for the SQLite database, blobs and keys.",
    )
    database_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the metadata database, for example "
            "postgresql+asyncpg://moorage@db/moorage. Default: SQLite in the data "
            "directory."
        ),
    )
    storage_dir: Path | None = Field(
        default=None,
        description="Filesystem blob store directory. Default: <data_dir>/storage.",
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=5000, ge=0, le=65535, description="TCP port.")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Server processes sharing the port. More than one uses more cores for "
            "many small requests, at the cost of memory per process."
        ),
    )
    graceful_shutdown_seconds: int = Field(
        default=20,
        ge=1,
        description=(
            "Seconds a stopping server lets requests in progress finish before it "
            "cancels them, so that a slow download or a stalled upload cannot hold "
            "the stop. audit_shutdown_seconds follows; keep the sum below the "
            "service manager's stop timeout (TimeoutStopSec=60 in the systemd unit)."
        ),
    )
    public_url: str | None = Field(
        default=None,
        description=(
            "Base URL that clients use, such as https://registry.example.com. "
            "Used for the token realm and Location headers. Default: taken from "
            "each request's Host header."
        ),
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description=(
            "Addresses or networks (CIDR) whose X-Forwarded-For, -Proto and -Host "
            "headers are trusted. A network wider than /8 (IPv4) or /32 (IPv6) "
            "gets a warning at start and in `config check`."
        ),
    )
    service_name: str = Field(
        default="moorage",
        description="Token service name: the `service` and JWT `aud` value.",
    )
    # NOTE: the minimum is 5 s, not a production value, so that tests can watch
    # an access token expire and the client refresh it without waiting minutes.
    token_ttl_seconds: int = Field(
        default=300,
        ge=5,
        le=86400,
        description="Lifetime of registry access tokens, in seconds.",
    )
    refresh_token_ttl_seconds: int = Field(
        default=90 * 86400,
        ge=60,
        le=365 * 86400,
        description=(
            "Lifetime of OAuth2 refresh tokens (docker's identity token), in "
            "seconds. Revocation still applies to them on their next use."
        ),
    )
    login_free_failures_per_pair: int = Field(
        default=5,
        ge=1,
        description=(
            "Failed logins of one name from one address before each further "
            "attempt must wait (1 s doubling, up to 5 minutes)."
        ),
    )
    login_free_failures_per_address: int = Field(
        default=20,
        ge=1,
        description=(
            "Failed logins from one address, any name, before it must wait "
            "(1 s doubling, up to 15 minutes)."
        ),
    )
    login_free_failures_per_account: int = Field(
        default=100,
        ge=1,
        description=(
            "Failed logins of one name, any address, before it must wait (1 s "
            "doubling, up to 5 minutes), except from addresses where it logged in "
            "within 30 days."
        ),
    )
    max_manifest_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest manifest accepted, in bytes.",
    )
    upload_expiry_hours: float = Field(
        default=24,
        gt=0,
        description=(
            "Upload sessions that receive no data for this many hours are cancelled "
            "and their partial data deleted."
        ),
    )
    gc_grace_hours: float = Field(
        default=6,
        ge=0,
        description=(
            "Garbage collection deletes a blob only once no manifest has "
            "referenced it (and no repository linked it) for this many hours, "
            "and removes a blob link or an untagged manifest only once it is "
            "this old. A push finishes within it, and so must the copy of the "
            "blob files of a backup."
        ),
    )
    gc_interval_hours: float = Field(
        default=0,
        ge=0,
        description=(
            "The server runs garbage collection every this many hours (one "
            "process of the installation at a time); 0 runs it only when "
            "`moorage gc` is run."
        ),
    )
    admin_username: str = Field(
        default="admin",
        description="Name of the vendor admin account created on first start.",
    )
    admin_password: SecretStr | None = Field(
        default=None,
        description=(
            "Password for the first vendor admin. Default: generated and printed "
            "once on first start. Checked against the password policy at every "
            "start, before anything is created."
        ),
    )
    tls_cert: Path | None = Field(
        default=None,
        description=(
            "PEM certificate (chain) to serve HTTPS with; needs tls_key. Reloaded on "
            "SIGHUP and when the file changes."
        ),
    )
    tls_key: Path | None = Field(
        default=None,
        description=(
            "Unencrypted PEM private key matching tls_cert. A key encrypted with a "
            "passphrase is rejected."
        ),
    )
    tls_client_ca: Path | None = Field(
        default=None,
        description=(
            "PEM CA certificate(s) for client certificates. When set, clients may "
            "authenticate with a certificate whose common name is their login."
        ),
    )
    tls_client_crl: Path | None = Field(
        default=None,
        description=(
            "PEM certificate revocation list(s) signed by the client CA; a revoked "
            "client certificate cannot log in. Read again when it changes "
            "(`moorage tls revoke-client` writes it; needs tls_client_ca)."
        ),
    )
    tls_client_cert_customers: list[str] = Field(
        default_factory=list,
        description=(
            "Customers whose accounts must present a client certificate for their "
            "own login on every request (needs tls_client_ca)."
        ),
    )
    tls_reload_seconds: float = Field(
        default=30,
        gt=0,
        description=(
            "How often to check tls_cert, tls_key and tls_client_crl for a change."
        ),
    )
    encryption: bool = Field(
        default=True,
        description=(
            "Encrypt blobs at rest (AES-256-GCM). Turning it on for existing data "
            "encrypts that data in the background."
        ),
    )
    encryption_key_source: str = Field(
        default="file",
        description=(
            "Where the key-encryption key lives: file (encryption_key_dir), env "
            "(encryption_key) or pkcs11 (a hardware security module)."
        ),
    )
    encryption_key_dir: Path | None = Field(
        default=None,
        description=(
            "Directory of key-encryption key files for the file source. Default: "
            "<data_dir>/keys; keep it off the disk that holds the data."
        ),
    )
    encryption_key: SecretStr | None = Field(
        default=None,
        description="Base64 of 32 random bytes: the key-encryption key (env source).",
    )
    encryption_previous_keys: list[SecretStr] = Field(
        default_factory=list,
        description=(
            "Earlier key-encryption keys (env source), kept until `moorage key "
            "rotate` has rewrapped every data key."
        ),
    )
    pkcs11_library: str | None = Field(
        default=None,
        description="Path of the PKCS#11 module, such as libsofthsm2.so.",
    )
    pkcs11_token: str = Field(
        default="moorage", description="Label of the PKCS#11 token."
    )
    pkcs11_pin: SecretStr | None = Field(
        default=None, description="User PIN of the PKCS#11 token."
    )
    audit_queue_size: int = Field(
        default=10_000,
        ge=100,
        description=(
            "Audit events held in memory before they are written; when full, "
            "requests wait for the writer."
        ),
    )
    audit_flush_seconds: float = Field(
        default=0.5,
        gt=0,
        le=10,
        description=(
            "Seconds between audit writes. A crash loses at most the events of "
            "this interval plus one write."
        ),
    )
    audit_shutdown_seconds: float = Field(
        default=30,
        gt=0,
        description=(
            "Seconds a stopping server keeps retrying failed audit writes. Events "
            "still unwritten then go to a file under <data_dir>/audit-pending, "
            "which the next start adds to the audit log."
        ),
    )
    audit_checkpoint_events: int = Field(
        default=10_000,
        ge=1,
        description="Sign a checkpoint at least every this many audit events.",
    )
    audit_checkpoint_seconds: float = Field(
        default=300,
        gt=0,
        description="Sign a checkpoint at least this often, in seconds.",
    )
    audit_retention_days: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Archive audit events older than this many days to files, then "
            "delete them from the database. Default: keep every event."
        ),
    )
    audit_archive_dir: Path | None = Field(
        default=None,
        description="Directory for audit archives. Default: <data_dir>/audit-archive.",
    )
    audit_syslog: str | None = Field(
        default=None,
        description=(
            "Forward audit events as RFC 5424 syslog messages to udp://host:port "
            "or tcp://host:port."
        ),
    )
    audit_webhook_url: str | None = Field(
        default=None,
        description="POST audit events as JSON batches to this URL.",
    )
    audit_request_events: bool = Field(
        default=True,
        description=(
            "Measurement setting, for the benchmark of what auditing costs: false "
            "stops recording every request event (pulls, pushes, logins, token "
            "issues, denials, password changes) and the alerts that watch them. "
            "Administrative changes are still recorded. Keep it true in any real "
            "installation."
        ),
    )
    alert_webhook_url: str | None = Field(
        default=None,
        description="POST each alert as JSON to this URL.",
    )
    alert_failed_logins: int = Field(
        default=10,
        ge=1,
        description="Failed logins per account or address that raise an alert.",
    )
    alert_failed_login_seconds: float = Field(
        default=60,
        gt=0,
        description="Window, in seconds, in which alert_failed_logins are counted.",
    )
    alert_credential_addresses: int = Field(
        default=5,
        ge=1,
        description=(
            "Alert when one credential is used from more distinct addresses than "
            "this within an hour."
        ),
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description=(
            "When set, /metrics requires `Authorization: Bearer <token>`; when "
            "unset, /metrics answers clients on this machine only."
        ),
    )
    log_level: str = Field(default="info", description="debug, info or warning.")
    log_format: str = Field(
        default="auto",
        description="json, console, or auto (json unless writing to a terminal).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given_dir: Path | str | None = getattr(init_settings, "init_kwargs", {}).get(
            "data_dir"
        )
        toml_file = _config_file(given_dir)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file))
        return tuple(sources)

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry)
            except ValueError:
                # Raises the plain error for what is no network at all.
                network = ipaddress.ip_network(entry, strict=False)
                # 10.0.0.1/8 may mean the network or the one address, and
                # trusting the whole network by mistake would let any host in
                # it forge X-Forwarded-For, so ask which.
                address = entry.partition("/")[0]
                raise ValueError(
                    f"{entry!r}: host bits are set; give the network {network}, "
                    f"or the address {address}"
                ) from None
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value:  # empty means the default, as in `resolved_database_url`
            return _check_database_url_text(value)
        return value

    @field_validator("encryption_key")
    @classmethod
    def _check_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_key_text(value.get_secret_value())
        return value

    @field_validator("encryption_previous_keys")
    @classmethod
    def _check_previous_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for position, key in enumerate(value, start=1):
            try:
                _check_key_text(key.get_secret_value())
            except ValueError as error:
                raise ValueError(f"key {position}: {error}") from None
        return value

    @field_validator("encryption_key_source")
    @classmethod
    def _check_key_source(cls, value: str) -> str:
        if value not in {"file", "env", "pkcs11"}:
            raise ValueError("must be file, env or pkcs11")
        return value

    @model_validator(mode="after")
    def _check_tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if self.tls_client_crl is not None and self.tls_client_ca is None:
            raise ValueError("tls_client_crl needs tls_client_ca")
        if self.tls_client_cert_customers and self.tls_client_ca is None:
            raise ValueError("tls_client_cert_customers needs tls_client_ca")
        return self

    @model_validator(mode="after")
    def _check_env_key(self) -> Settings:
        if (
            self.encryption
            and self.encryption_key_source == "env"
            and self.encryption_key is None
        ):
            raise ValueError(
                "encryption_key_source is env but encryption_key "
                "(MOORAGE_ENCRYPTION_KEY) is unset"
            )
        return self

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be debug, info, warning or error")
        return value.lower()

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        if value not in {"json", "console", "auto"}:
            raise ValueError("must be json, console or auto")
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'moorage.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "storage"

    @property
    def resolved_key_dir(self) -> Path:
        return self.encryption_key_dir or self.data_dir / "keys"

    @property
    def resolved_audit_archive_dir(self) -> Path:
        return self.audit_archive_dir or self.data_dir / "audit-archive"


# SQLAlchemy dialect and driver of each database Moorage supports. The engine
# is asynchronous, so each needs an asyncio driver, and these are the ones that
# Moorage installs.
DATABASE_DRIVERS = ("postgresql+asyncpg", "sqlite+aiosqlite")
# URL schemes without a driver, as libpq and most tools write them, and the
# driver Moorage uses for each.
_DEFAULT_DRIVERS = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def _check_database_url_text(url: str) -> str:
    """Return `url` with the driver Moorage uses when it names none.

    Raise ValueError when `url` is not an SQLAlchemy URL, names a driver other
    than those of DATABASE_DRIVERS, has a port that is not a number from 1 to
    65535, or is a SQLite URL without a file. The message never contains the
    URL's password."""
    scheme, separator, rest = url.partition("://")
    if separator and scheme.lower() in _DEFAULT_DRIVERS:
        url = f"{_DEFAULT_DRIVERS[scheme.lower()]}://{rest}"
    # The password may hold "/", "?" or "#" unencoded, as SQLAlchemy allows, so
    # the port is looked for after the password is taken out.
    host_part = urlsplit(_hide_password(url)).netloc.rpartition("@")[2]
    if host_part.startswith("["):
        host_part = host_part.partition("]")[2]  # the port after an IPv6 address
    _, colon, port = host_part.rpartition(":")
    if colon and port and not (port.isascii() and port.isdigit()):
        raise ValueError(f"invalid port {port!r}; use a number from 1 to 65535")
    if colon and port and not 1 <= int(port) <= 65535:
        raise ValueError(f"invalid port {port!r}; use a number from 1 to 65535")
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(
            "not a valid SQLAlchemy URL; expected for example "
            "postgresql+asyncpg://moorage@db/moorage"
        ) from None
    if parsed.drivername not in DATABASE_DRIVERS:
        raise ValueError(
            f"unsupported database driver {parsed.drivername!r}; use "
            "postgresql+asyncpg://user@host/database or "
            "sqlite+aiosqlite:///path/to/file.db"
        )
    if parsed.drivername.startswith("sqlite") and parsed.database in {
        None,
        "",
        ":memory:",
    }:
        # An in-memory database would be a new, empty one in each process.
        raise ValueError(
            "a SQLite URL needs a file, for example "
            "sqlite+aiosqlite:////var/lib/moorage/moorage.db; leave database_url "
            "empty for moorage.db in the data directory"
        )
    return url


# The user part and password of a URL, as SQLAlchemy reads them: the password
# runs to the first "@", and may hold "/", "?", "#" and ":".
_USER_AND_PASSWORD = re.compile(r"(?P<user>[^:/@]*):(?P<password>[^@]*)@")


def _hide_password(url: str) -> str:
    """Return `url` with the password of its user part replaced by `***`."""
    scheme, separator, rest = url.partition("://")
    found = _USER_AND_PASSWORD.match(rest) if separator else None
    if found is None:
        return url
    return f"{scheme}://{found['user']}:***@{rest[found.end() :]}"


# The key-encryption key's size: AES-256.
KEY_BYTES = 32


def _check_key_text(text: str) -> None:
    """Raise ValueError unless `text` is base64 of 32 bytes; never show the text."""
    try:
        decoded = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ValueError("not valid base64; expected base64 of 32 bytes") from None
    if len(decoded) != KEY_BYTES:
        raise ValueError(
            f"decodes to {len(decoded)} bytes; expected base64 of {KEY_BYTES} bytes"
        )


def _config_file(data_dir: Path | str | None) -> Path | None:
    """Return the TOML file to read, or None when there is none."""
    explicit = os.environ.get("MOORAGE_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(
                f"MOORAGE_CONFIG names {path}, which does not exist"
            )
        return path
    directory = Path(data_dir or os.environ.get("MOORAGE_DATA_DIR") or DEFAULT_DATA_DIR)
    candidate = directory / "moorage.toml"
    return candidate if candidate.is_file() else None


class ConfigurationError(ValueError):
    """Invalid settings; `problems` has one line per invalid setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, the TOML file and explicit overrides.

    Raises ConfigurationError with one line per problem (setting, what is wrong
    and where the value came from), and FileNotFoundError when MOORAGE_CONFIG
    names a missing file.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as error:
        problems = [_describe_error(details, given) for details in error.errors()]
        raise ConfigurationError(problems) from None
    except SettingsError as error:
        raise ConfigurationError([_describe_parse_error(error, given)]) from None
    except tomllib.TOMLDecodeError as error:
        file = _config_file(given.get("data_dir"))
        raise ConfigurationError([f"{file} is not valid TOML: {error}"]) from None


# pydantic-settings names the field in the message of a value it cannot decode.
_PARSE_FIELD = re.compile(r'error parsing value for field "(\w+)"')


def _describe_parse_error(error: SettingsError, given: dict[str, Any]) -> str:
    """Describe a value that pydantic-settings could not decode, such as a list
    setting whose environment variable is not valid JSON."""
    match = _PARSE_FIELD.search(str(error))
    if match is None:
        return str(error)
    name = match.group(1)
    cause = error.__cause__
    reason = "could not be decoded"
    if isinstance(cause, json.JSONDecodeError):
        reason = f"not valid JSON ({cause.msg} at position {cause.pos})"
    return f"{name} ({_origin(name, given)}): {reason}"


def _describe_error(details: Any, given: dict[str, Any]) -> str:
    """Describe one pydantic validation error as `setting (origin): problem`."""
    location = details["loc"]
    message = str(details["msg"]).removeprefix("Value error, ")
    if not location:
        return message
    name = str(location[0])
    if name not in Settings.model_fields:
        return f"{name} ({_origin(name, given)}): unknown setting"
    item = "".join(f"[{part}]" for part in location[1:])
    value = ""
    given_value = details.get("input")
    if isinstance(given_value, str):
        given_value = hide_url_secrets(given_value)
    if not _is_secret(name) and isinstance(given_value, str | int | float):
        value = f" = {given_value!r}"
    return f"{name}{item}{value} ({_origin(name, given)}): {message}"


def _is_secret(name: str) -> bool:
    annotation = str(Settings.model_fields[name].annotation)
    return "SecretStr" in annotation


def _origin(name: str, given: dict[str, Any]) -> str:
    """Name where a setting's value came from, in precedence order."""
    if name in given:
        return "command line"
    variable = f"MOORAGE_{name.upper()}"
    if any(key.upper() == variable for key in os.environ):
        return f"environment variable {variable}"
    file = _config_file(given.get("data_dir"))
    if file is not None:
        return f"file {file}"
    return "default"


HIDDEN = "**********"


# Query parameters of a non-HTTP URL (a database URL) whose values are hidden:
# libpq's password and sslpassword, and the names that tokens and keys go by.
_SECRET_QUERY_NAME = re.compile(r"pass|pwd|token|secret|key|sig|auth|credential", re.I)

# Path segments of an HTTP URL at least this long that mix letters and digits
# are hidden, like the token at the end of a Slack or Discord webhook URL.
_TOKEN_SEGMENT_CHARACTERS = 16


def hide_url_secrets(url: str) -> str:
    """Return `url` with the secrets it may carry replaced by `***`.

    Hidden are the password of the user part
    (`postgresql+asyncpg://user:***@host/db`), and query values: in an HTTP URL
    (a webhook) every query value and the fragment, in other URLs (database URLs)
    the values of parameters named like a password, token or key. Path segments
    of an HTTP URL that look like a token (16 or more characters, letters and
    digits) are hidden too.
    """
    url = _hide_password(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    web = parts.scheme.lower() in {"http", "https"}
    netloc = parts.netloc
    path = parts.path
    if web:
        path = "/".join(_hide_token_segment(part) for part in path.split("/"))
    fragment = "***" if web and parts.fragment else parts.fragment
    query = "&".join(_hide_query_value(item, web) for item in parts.query.split("&"))
    hidden = parts._replace(netloc=netloc, path=path, query=query, fragment=fragment)
    # urlunsplit drops the empty host of sqlite:////path, so a URL without
    # secrets is returned as given.
    return url if hidden == parts else urlunsplit(hidden)


def _hide_token_segment(segment: str) -> str:
    if (
        len(segment) >= _TOKEN_SEGMENT_CHARACTERS
        and any(character.isdigit() for character in segment)
        and any(character.isalpha() for character in segment)
    ):
        return "***"
    return segment


def _hide_query_value(item: str, hide_every_value: bool) -> str:
    name, equals, value = item.partition("=")
    if hide_every_value and item and not equals:
        return "***"
    if value and (hide_every_value or _SECRET_QUERY_NAME.search(name)):
        return f"{name}{equals}***"
    return item


def displayed_value(value: object) -> str:
    """Return a setting's value as `config check` prints it: secrets hidden,
    secrets in URLs hidden (see `hide_url_secrets`), paths and lists as plain
    text."""
    if value is None:
        return "(none)"
    if isinstance(value, SecretStr):
        return HIDDEN
    if isinstance(value, list):
        return "[" + ", ".join(displayed_value(item) for item in value) + "]"
    if isinstance(value, str) and "://" in value:
        return hide_url_secrets(value)
    return str(value)


def displayed_settings(settings: Settings) -> dict[str, str]:
    """Return every setting's effective value as `config check` prints it."""
    return {
        name: displayed_value(getattr(settings, name)) for name in Settings.model_fields
    }


# Trusted proxy networks with shorter prefixes than these get a warning. 10.0.0.0/8
# is the widest private IPv4 network, and a /32 is a whole provider's IPv6
# allocation, so a network of proxies that is wider contains hosts that are
# not proxies.
WIDEST_PROXY_PREFIX_IPV4 = 8
WIDEST_PROXY_PREFIX_IPV6 = 32
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def too_wide_trusted_proxies(entries: list[str]) -> list[str]:
    """Return the `trusted_proxies` entries wider than the bounds above.

    An IPv4-mapped IPv6 network (::ffff:0:0/96 and within) is held to the IPv4
    bound, because it contains the same addresses.
    """
    wide = []
    for entry in entries:
        network = ipaddress.ip_network(entry, strict=False)
        if network.version == 4:
            too_wide = network.prefixlen < WIDEST_PROXY_PREFIX_IPV4
        elif network.subnet_of(_IPV4_MAPPED):
            too_wide = network.prefixlen - 96 < WIDEST_PROXY_PREFIX_IPV4
        else:
            too_wide = network.prefixlen < WIDEST_PROXY_PREFIX_IPV6
        if too_wide:
            wide.append(entry)
    return wide


def too_wide_proxy_warning(entry: str) -> str:
    """Return the warning for a too-wide `trusted_proxies` entry."""
    return (
        f"trusted_proxies entry {entry} is wider than /{WIDEST_PROXY_PREFIX_IPV4} "
        f"(IPv4) or /{WIDEST_PROXY_PREFIX_IPV6} (IPv6): every client in it can "
        "set X-Forwarded-For and so forge the source address in the audit log; "
        "list only the reverse proxies' addresses or networks"
    )


def settings_reference() -> str:
    """Return a Markdown table of every setting, its variable and default."""
    lines = [
        "| setting | environment variable | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        shown = "(none)" if default is None else f"`{default}`"
        lines.append(
            f"| `{name}` | `MOORAGE_{name.upper()}` | {shown} | {field.description} |"
        )
    return "\n".join(lines)
