"""Real clients against the registry: skopeo and podman push, pull and log in.

Images are built offline by tests/support/images.py. Every client runs against
the test server over plain HTTP, as a user of the customer `acme`. podman gets
its own storage root, run root, temporary directory and auth file, so nothing
of the machine's podman setup is read or changed.

NOTE: skopeo 1.9.3, run as root, always records blob locations in
/var/lib/containers/cache/blob-info-cache-v1.boltdb; it has no option to move
that cache. The entries name only this test server's loopback address.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import images
from tests.support.clients import client_environment
from tests.support.images import Blob, OciLayout
from tests.support.registry import digest_of, open_account
from tests.support.server import ServerProcess

pytestmark = [
    pytest.mark.clients,
    pytest.mark.skipif(
        shutil.which("skopeo") is None or shutil.which("podman") is None,
        reason="skopeo or podman missing: apt-get install skopeo podman",
    ),
]

COMMAND_TIMEOUT = 180


@dataclass
class Built:
    """The OCI layout with every test image, and their manifests by tag."""

    layout: OciLayout
    manifests: dict[str, Blob]
    docker_dir: Path


@dataclass
class Client:
    """A customer user and the environment its command-line clients run in."""

    login: str
    password: str
    registry: str
    environment: dict[str, str]

    @property
    def creds(self) -> str:
        return f"{self.login}:{self.password}"

    def url(self, repository: str) -> str:
        return f"docker://{self.registry}/{repository}"


def run(
    *command: str | Path,
    env: dict[str, str],
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client; with `check`, fail with its output unless it exits with 0."""
    result = subprocess.run(
        [str(part) for part in command],
        env=env,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited with {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Build busybox, a multi-platform index, an artifact, Docker and large images."""
    root = tmp_path_factory.mktemp("images")
    layout = OciLayout(root / "layout")
    busybox = images.busybox_image(layout, "latest")
    docker = images.docker_schema2_image(layout, "docker")
    manifests = {
        "latest": busybox,
        "multi": images.multi_platform_index(layout, "multi"),
        "sbom": images.artifact_with_subject(layout, busybox, tag="sbom"),
        "docker": docker,
        "large": images.large_image(layout, "large"),
    }
    docker_dir = images.export_dir_image(layout, docker, root / "docker-dir")
    return Built(layout, manifests, docker_dir)


@pytest.fixture(scope="module")
def acme(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Client:
    """A writer of the customer `acme`, with its own client environment."""
    server.add_customer("acme")
    account = open_account(server, "acme", "writer")
    account.client.close()
    home = tmp_path_factory.mktemp("acme-home")
    return Client(
        account.login, account.password, server.address, client_environment(home)
    )


@pytest.fixture(scope="module")
def globex(
    server: ServerProcess, built: Built, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The customer `globex` with a pushed busybox image; returns its repository."""
    server.add_customer("globex")
    environment = client_environment(tmp_path_factory.mktemp("globex-home"))
    account = open_account(server, "globex", "writer")
    repository = "globex/busybox"
    layout = built.layout.path
    with account.client:
        run(
            "skopeo", "copy", "-q", "--preserve-digests", "--dest-tls-verify=false",
            "--dest-creds", f"{account.login}:{account.password}",
            f"oci:{layout}:latest", f"docker://{server.address}/{repository}:1.0",
            env=environment,
        )  # fmt: skip
    return repository


def skopeo_push(client: Client, source: str, repository: str, *flags: str) -> None:
    run(
        "skopeo", "copy", "-q", "--preserve-digests", *flags,
        "--dest-tls-verify=false", "--dest-creds", client.creds,
        source, client.url(repository),
        env=client.environment,
    )  # fmt: skip


def skopeo_pull(client: Client, repository: str, target: str, *flags: str) -> None:
    run(
        "skopeo", "copy", "-q", "--preserve-digests", *flags,
        "--src-tls-verify=false", "--src-creds", client.creds,
        client.url(repository), target,
        env=client.environment,
    )  # fmt: skip


def raw_manifest(client: Client, repository: str) -> bytes:
    result = run(
        "skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", client.creds,
        client.url(repository),
        env=client.environment,
    )  # fmt: skip
    return result.stdout.encode()


def referenced(layout: OciLayout, digest: str) -> list[str]:
    """Return `digest` and every digest its manifest reaches, depth first."""
    found = [digest]
    document = json.loads(layout.read_blob(digest))
    for child in document.get("manifests", []):
        found += referenced(layout, child["digest"])
    if "config" in document:
        found.append(document["config"]["digest"])
    found += [layer["digest"] for layer in document.get("layers", [])]
    return found


def assert_same_content(source: OciLayout, pulled: Path, digest: str) -> None:
    """Check that a pulled OCI layout holds `digest` and all it reaches, unchanged."""
    target = OciLayout(pulled)
    tagged = [entry["digest"] for entry in target.read_index()["manifests"]]
    assert tagged == [digest]
    for item in referenced(source, digest):
        data = target.read_blob(item)
        assert digest_of(data) == item
        assert data == source.read_blob(item)


@pytest.mark.parametrize("tag", ["latest", "large"])
def test_skopeo_image_round_trip(
    acme: Client, built: Built, tmp_path: Path, tag: str
) -> None:
    """skopeo pushes an image to acme and pulls back the same digests."""
    manifest = built.manifests[tag]
    repository = f"acme/{tag}:1.0"
    skopeo_push(acme, f"oci:{built.layout.path}:{tag}", repository)
    assert raw_manifest(acme, repository) == manifest.data
    skopeo_pull(acme, repository, f"oci:{tmp_path / 'out'}:1.0")
    assert_same_content(built.layout, tmp_path / "out", manifest.digest)


def test_skopeo_index_round_trip(acme: Client, built: Built, tmp_path: Path) -> None:
    """skopeo copy --all pushes a multi-platform index and pulls it back whole."""
    index = built.manifests["multi"]
    repository = "acme/multi:1.0"
    skopeo_push(acme, f"oci:{built.layout.path}:multi", repository, "--all")
    assert raw_manifest(acme, repository) == index.data
    skopeo_pull(acme, repository, f"oci:{tmp_path / 'out'}:1.0", "--all")
    assert_same_content(built.layout, tmp_path / "out", index.digest)


def test_skopeo_artifact_referrers(
    server: ServerProcess, acme: Client, built: Built, tmp_path: Path
) -> None:
    """An artifact pushed by skopeo shows up in the referrers of its subject."""
    subject, artifact = built.manifests["latest"], built.manifests["sbom"]
    skopeo_push(acme, f"oci:{built.layout.path}:latest", "acme/signed:1.0")
    skopeo_push(acme, f"oci:{built.layout.path}:sbom", "acme/signed:sbom")
    response = httpx.get(
        f"{server.url}/v2/acme/signed/referrers/{subject.digest}",
        auth=(acme.login, acme.password),
    )
    [entry] = response.json()["manifests"]
    assert entry["digest"] == artifact.digest
    assert entry["artifactType"] == images.DEFAULT_ARTIFACT_TYPE
    skopeo_pull(acme, "acme/signed:sbom", f"oci:{tmp_path / 'out'}:sbom")
    assert_same_content(built.layout, tmp_path / "out", artifact.digest)


def test_skopeo_docker_schema2(acme: Client, built: Built, tmp_path: Path) -> None:
    """A Docker schema 2 image goes up from dir: and comes back byte for byte."""
    manifest = built.manifests["docker"]
    repository = "acme/docker:1.0"
    skopeo_push(acme, f"dir:{built.docker_dir}", repository)
    assert raw_manifest(acme, repository) == manifest.data
    out = tmp_path / "out"
    skopeo_pull(acme, repository, f"dir:{out}")
    assert (out / "manifest.json").read_bytes() == manifest.data
    for digest in referenced(built.layout, manifest.digest)[1:]:
        data = (out / digest.partition(":")[2]).read_bytes()
        assert data == built.layout.read_blob(digest)


def test_skopeo_denied_on_globex(acme: Client, built: Built, globex: str) -> None:
    """acme's user cannot push to globex, nor tell its repositories exist."""
    source = f"oci:{built.layout.path}:latest"
    pushed = run(
        "skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-creds", acme.creds,
        source, acme.url("globex/intruder:1.0"),
        env=acme.environment, check=False,
    )  # fmt: skip
    assert pushed.returncode != 0
    assert "denied" in pushed.stderr
    answers = []
    for repository in (f"{globex}:1.0", "globex/missing:1.0"):
        inspected = run(
            "skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", acme.creds,
            acme.url(repository),
            env=acme.environment, check=False,
        )  # fmt: skip
        assert inspected.returncode != 0
        message = re.sub(r'time="[^"]*" ', "", inspected.stderr)
        answers.append(message.replace(repository.split(":")[0], "NAME"))
    assert "manifest unknown" in answers[0]
    assert answers[0] == answers[1]


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[list[str]]:
    """The podman command with storage, run root and temporary files of its own."""
    # podman 4.3 rejects a run root path longer than 50 characters.
    runroot = tempfile.mkdtemp(prefix="moorage-podman-")
    yield [
        "podman",
        "--root", str(tmp_path / "root"),
        "--runroot", runroot,
        "--tmpdir", str(tmp_path / "libpod-tmp"),
        "--storage-driver", "vfs",
        "--cgroup-manager", "cgroupfs",
        "--events-backend", "none",
    ]  # fmt: skip
    shutil.rmtree(runroot, ignore_errors=True)


def test_podman_login_push_pull(
    podman: list[str], acme: Client, built: Built, globex: str
) -> None:
    """podman logs in, pushes busybox to acme, and pulls back the same digest."""
    env = acme.environment
    login = run(
        *podman, "login", "--tls-verify=false", "-u", acme.login, "--password-stdin",
        acme.registry, env=env, check=False, input_text=acme.password,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    image_id = run(
        *podman, "pull", "-q", f"oci:{built.layout.path}:latest", env=env
    ).stdout.strip()
    target = f"{acme.registry}/acme/podman:1.0"
    run(*podman, "tag", image_id, target, env=env)
    run(*podman, "push", "-q", "--tls-verify=false", target, env=env)
    run(*podman, "rmi", "-f", image_id, env=env)
    pulled = run(*podman, "pull", "-q", "--tls-verify=false", target, env=env)
    assert pulled.stdout.strip() == image_id
    digest = run(
        *podman, "image", "inspect", "--format", "{{.Digest}}", target, env=env
    ).stdout.strip()
    assert digest == built.manifests["latest"].digest

    denied = run(
        *podman, "push", "-q", "--tls-verify=false", target,
        f"docker://{acme.registry}/globex/podman:1.0", env=env, check=False,
    )  # fmt: skip
    assert denied.returncode != 0
    assert "denied" in denied.stderr
    hidden = run(
        *podman, "pull", "-q", "--tls-verify=false", f"{acme.registry}/{globex}:1.0",
        env=env, check=False,
    )  # fmt: skip
    assert hidden.returncode != 0
    assert "manifest unknown" in hidden.stderr


def test_podman_wrong_password(podman: list[str], acme: Client, tmp_path: Path) -> None:
    """podman login with a wrong password fails and stores no credentials."""
    env = dict(acme.environment, REGISTRY_AUTH_FILE=str(tmp_path / "auth.json"))
    result = run(
        *podman, "login", "--tls-verify=false", "-u", acme.login, "--password-stdin",
        acme.registry, env=env, check=False, input_text="wrong-password-123",
    )  # fmt: skip
    assert result.returncode != 0
    assert "invalid username/password" in result.stderr
    auth_file = tmp_path / "auth.json"
    assert not auth_file.exists() or acme.registry not in auth_file.read_text()


def test_skopeo_wrong_password(acme: Client) -> None:
    """skopeo with a wrong password is rejected before it reads any manifest."""
    result = run(
        "skopeo", "inspect", "--raw", "--tls-verify=false",
        "--creds", f"{acme.login}:wrong-password-123", acme.url("acme/latest:1.0"),
        env=acme.environment, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unauthorized" in result.stderr.lower()
    assert result.stdout == ""
