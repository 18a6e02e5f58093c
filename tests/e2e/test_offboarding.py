"""`moorage customer offboard`: suspend, archive to an OCI layout tar, delete.

Two customers push real images with skopeo (a multi-layer image of real files,
busybox, a multi-platform index) and the HTTP API (a referrer pushed by
digest). The vendor pushes a shared products repository that both are granted.
The first customer is offboarded while the server runs. skopeo and umoci read
the archive back; the second customer and the products repository stay as
they were. Everything runs on an installation with encryption at rest and on
one without.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import images
from tests.support.clients import client_environment, run_client
from tests.support.identity import get_token
from tests.support.images import OciLayout
from tests.support.registry import (
    OCI_MANIFEST,
    assert_error,
    digest_of,
    push_blob,
    put_manifest,
)
from tests.support.server import (
    ADMIN_LOGIN,
    ADMIN_PASSWORD,
    ServerProcess,
    running_server,
    unique,
)

pytestmark = [
    pytest.mark.clients,
    pytest.mark.skipif(
        shutil.which("skopeo") is None or shutil.which("umoci") is None,
        reason="skopeo or umoci missing: apt-get install skopeo umoci",
    ),
]

REF_NAME = "org.opencontainers.image.ref.name"


@dataclass
class Installation:
    """A registry with two customers' images and a shared products repository."""

    server: ServerProcess
    layout: OciLayout
    leaving: str
    staying: str
    products: str
    # Customer user (login, password) per customer slug.
    users: dict[str, tuple[str, str]]
    # Manifest digest per "repository:tag" of the leaving customer.
    tagged: dict[str, str]
    referrer: str
    token: str
    env: dict[str, str]
    work: Path
    archive: Path = field(init=False)

    def __post_init__(self) -> None:
        self.archive = self.work / "leaving.tar"

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url, auth=(ADMIN_LOGIN, ADMIN_PASSWORD), timeout=60
        )


def skopeo_push(
    install_env: dict[str, str],
    server: ServerProcess,
    creds: tuple[str, str],
    source: str,
    target: str,
    *flags: str,
) -> None:
    run_client(
        "skopeo", "copy", "-q", "--preserve-digests", *flags,
        "--dest-tls-verify=false", "--dest-creds", ":".join(creds),
        source, f"docker://{server.address}/{target}",
        env=install_env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    layout = OciLayout(tmp_path_factory.mktemp("images") / "layout")
    images.busybox_image(layout, "latest")
    images.multi_platform_index(layout, "multi")
    images.large_image(layout, "large", max_bytes=6 * images.MIB, layer_count=3)
    return layout


@pytest.fixture(scope="module")
def plaintext_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    settings = {
        "MOORAGE_ENCRYPTION": "false",
        "MOORAGE_LOGIN_FREE_FAILURES_PER_ADDRESS": "100000",
    }
    with running_server(tmp_path_factory.mktemp("plaintext"), settings) as process:
        yield process


@pytest.fixture(scope="module")
def encrypted_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """A registry of this module's own: the session's shared one must not be
    used, because shredding makes blobs unreadable that other tests' storage
    checks read."""
    settings = {"MOORAGE_LOGIN_FREE_FAILURES_PER_ADDRESS": "100000"}
    with running_server(tmp_path_factory.mktemp("encrypted"), settings) as process:
        yield process


@pytest.fixture(scope="module", params=["encrypted", "plaintext"])
def installation(
    request: pytest.FixtureRequest,
    built: OciLayout,
    tmp_path_factory: pytest.TempPathFactory,
) -> Installation:
    """Push both customers' images and the products repository."""
    if request.param == "encrypted":
        server: ServerProcess = request.getfixturevalue("encrypted_server")
    else:
        server = request.getfixturevalue("plaintext_server")
    work = tmp_path_factory.mktemp(request.param)
    env = client_environment(work / "home")
    leaving, staying = server.add_customer(), server.add_customer()
    products = f"{unique('products')}/base"
    users = {}
    for customer in (leaving, staying):
        users[customer] = server.add_user(customer, "writer")
        granted = server.run_command(
            "grant", "add", customer, f"{products.split('/')[0]}/*", "reader"
        )
        assert granted.returncode == 0, granted.stderr
    vendor = (ADMIN_LOGIN, ADMIN_PASSWORD)
    skopeo_push(env, server, vendor, f"oci:{built.path}:latest", f"{products}:1")

    tagged = {}
    sources = {
        f"{leaving}/busybox:1.0": "latest",
        f"{leaving}/busybox:latest": "latest",
        f"{leaving}/multi:1.0": "multi",
        f"{leaving}/large:2": "large",
    }
    for target, tag in sources.items():
        skopeo_push(
            env, server, users[leaving], f"oci:{built.path}:{tag}", target, "--all"
        )
        tagged[target] = next(
            entry["digest"]
            for entry in built.read_index()["manifests"]
            if entry.get("annotations", {}).get(REF_NAME) == tag
        )
    busybox = tagged[f"{leaving}/busybox:1.0"]
    referrer = _push_referrer(server, users[leaving], f"{leaving}/busybox", busybox)
    skopeo_push(
        env, server, users[staying], f"oci:{built.path}:latest", f"{staying}/busybox:1"
    )
    login, password = users[leaving]
    token = get_token(server, login, password, f"repository:{leaving}/busybox:pull")[
        "token"
    ]
    assert isinstance(token, str)
    return Installation(
        server, built, leaving, staying, products, users, tagged, referrer, token,
        env, work,
    )  # fmt: skip


def _push_referrer(
    server: ServerProcess, user: tuple[str, str], repository: str, subject: str
) -> str:
    """Push an SBOM artifact for `subject` by digest, with no tag."""
    with httpx.Client(base_url=server.url, auth=user, timeout=60) as client:
        config = b"{}"
        sbom = json.dumps({"spdxVersion": "SPDX-2.3", "name": "busybox"}).encode()
        push_blob(client, repository, config)
        push_blob(client, repository, sbom)
        subject_size = len(
            client.get(
                f"/v2/{repository}/manifests/{subject}",
                headers={"Accept": OCI_MANIFEST},
            ).content
        )
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/spdx+json",
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": digest_of(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/spdx+json",
                        "digest": digest_of(sbom),
                        "size": len(sbom),
                    }
                ],
                "subject": {
                    "mediaType": OCI_MANIFEST,
                    "digest": subject,
                    "size": subject_size,
                },
            }
        ).encode()
        digest = digest_of(manifest)
        response = put_manifest(client, repository, digest, manifest)
        assert response.status_code == 201, response.text
        return digest


@pytest.fixture(scope="module")
def archived(installation: Installation) -> subprocess.CompletedProcess[str]:
    """Offboard the leaving customer with --archive, while the server runs."""
    result = installation.server.run_command(
        "customer", "offboard", installation.leaving,
        "--archive", str(installation.archive),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def test_offboard_reports_what_it_left_out(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """The output names the granted products pattern as not archived."""
    products_pattern = installation.products.split("/")[0] + "/*"
    assert f"customer {installation.leaving} suspended" in archived.stdout
    assert "archived 3 repositories, 4 tags" in archived.stdout
    assert (
        "not archived: repositories the customer was granted but does not own "
        f"({products_pattern})"
    ) in archived.stdout
    assert not installation.archive.with_name("leaving.tar.partial").exists()


def test_archive_readable_by_owner_only(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """The archive contains the images decrypted, so it gets mode 0600 whatever
    the umask."""
    mode = installation.archive.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {
            member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile()
        }


def _reachable(members: dict[str, bytes], digest: str) -> list[str]:
    """Return `digest` and every digest its manifest names, depth first."""
    document = json.loads(members[f"blobs/sha256/{digest.split(':')[1]}"])
    found = [digest]
    for child in document.get("manifests", []):
        found += _reachable(members, child["digest"])
    if "config" in document:
        found.append(document["config"]["digest"])
    found += [layer["digest"] for layer in document.get("layers", [])]
    return found


def test_archive_is_an_oci_layout_with_verified_blobs(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """Every blob in the tar hashes to its name; index.json names each tag, and
    the untagged referrer, and nothing of the products repository."""
    members = _members(installation.archive)
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in members.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(members["index.json"])
    refs = {
        entry["annotations"].get(REF_NAME): entry["digest"]
        for entry in index["manifests"]
    }
    expected = dict(installation.tagged)
    expected[None] = installation.referrer  # type: ignore[index]
    assert refs == expected
    for digest in [*installation.tagged.values(), installation.referrer]:
        for item in _reachable(members, digest):
            assert f"blobs/sha256/{item.split(':')[1]}" in members
    assert not any(installation.products in name for name in refs if name)


def test_skopeo_reads_every_image_of_the_archive(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """skopeo copies each tag out of the archive with the pushed digests."""
    (installation.work / "out").mkdir()
    for ref, digest in installation.tagged.items():
        target = installation.work / "out" / ref.replace("/", "_").replace(":", "_")
        run_client(
            "skopeo", "copy", "-q", "--all", "--preserve-digests",
            f"oci-archive:{installation.archive}:{ref}", f"dir:{target}",
            env=installation.env,
        )  # fmt: skip
        manifest = (target / "manifest.json").read_bytes()
        assert digest_of(manifest) == digest
        for path in target.iterdir():
            if len(path.name) == 64:
                assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        raw = run_client(
            "skopeo", "inspect", "--raw",
            f"oci-archive:{installation.archive}:{ref}",
            env=installation.env,
        )  # fmt: skip
        assert digest_of(raw.encode()) == digest


def test_umoci_lists_and_unpacks_the_archive(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """umoci reads the unpacked layout: its tags, and the busybox root filesystem."""
    layout = installation.work / "umoci-layout"
    with tarfile.open(installation.archive) as tar:
        tar.extractall(layout, filter="data")
    listed = run_client("umoci", "ls", "--layout", layout).split()
    assert sorted(listed) == sorted(installation.tagged)
    bundle = installation.work / "bundle"
    ref = f"{installation.leaving}/busybox:1.0"
    run_client("umoci", "unpack", "--rootless", "--image", f"{layout}:{ref}", bundle)
    assert (bundle / "rootfs" / "bin" / "busybox").is_file()


def test_offboarded_customer_can_no_longer_log_in(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """The customer's password and its token issued before are refused."""
    server = installation.server
    login, password = installation.users[installation.leaving]
    repository = f"{installation.leaving}/busybox"
    response = httpx.get(f"{server.url}/v2/", auth=(login, password))
    assert response.status_code == 401
    token = httpx.get(
        f"{server.url}/token",
        params={"service": "moorage", "scope": f"repository:{repository}:pull"},
        auth=(login, password),
    )
    assert token.status_code == 401
    with_token = httpx.get(
        f"{server.url}/v2/{repository}/tags/list",
        headers={"Authorization": f"Bearer {installation.token}"},
    )
    assert with_token.status_code == 401


def _assert_staying_untouched(installation: Installation) -> None:
    login, password = installation.users[installation.staying]
    with httpx.Client(
        base_url=installation.server.url, auth=(login, password), timeout=60
    ) as client:
        own = client.get(f"/v2/{installation.staying}/busybox/manifests/1")
        assert own.status_code == 200, own.text
        product = client.get(f"/v2/{installation.products}/manifests/1")
        assert product.status_code == 200, product.text
        for layer in json.loads(own.content)["layers"]:
            blob = client.get(
                f"/v2/{installation.staying}/busybox/blobs/{layer['digest']}"
            )
            assert digest_of(blob.content) == layer["digest"]


def test_other_customer_and_products_stay(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """The other customer still pulls its own image and the shared products."""
    _assert_staying_untouched(installation)


def _unused_after_delete(installation: Installation, archived: str) -> tuple[int, int]:
    """Return the number and size of the archived blobs that the other customer
    and the products repository do not use (they use busybox's two blobs)."""
    found = re.search(r"and (\d+) blobs \((\d+) bytes\)", archived)
    assert found is not None, archived
    login, password = installation.users[installation.staying]
    shared = httpx.get(
        f"{installation.server.url}/v2/{installation.staying}/busybox/manifests/1",
        auth=(login, password),
    ).json()
    descriptors = [shared["config"], *shared["layers"]]
    shared_bytes = sum(item["size"] for item in descriptors)
    return int(found[1]) - len(descriptors), int(found[2]) - shared_bytes


def test_delete_now_removes_the_repositories(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """After --delete-now the vendor admin gets the spec's not-found errors; the
    other customer and the products repository still pull."""
    server = installation.server
    result = server.run_command(
        "customer", "offboard", installation.leaving, "--delete-now", "--confirm"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    summary = [line for line in lines if line.startswith("3 repositories, ")]
    assert len(summary) == 1, result.stdout
    assert "upload sessions deleted. " in summary[0]
    assert "deleted: " not in result.stdout
    unused_blobs, unused_bytes = _unused_after_delete(installation, archived.stdout)
    assert (
        f"{unused_blobs} blobs ({unused_bytes} bytes) are now used by no repository"
    ) in result.stdout
    encrypted = server.extra_env.get("MOORAGE_ENCRYPTION") != "false"
    assert ("customer shred" in result.stdout) == encrypted
    with installation.admin() as admin:
        for ref in installation.tagged:
            repository, tag = ref.rsplit(":", 1)
            response = admin.get(f"/v2/{repository}/manifests/{tag}")
            assert_error(response, 404, "MANIFEST_UNKNOWN")
            tags = admin.get(f"/v2/{repository}/tags/list")
            assert_error(tags, 404, "NAME_UNKNOWN")
        catalog = admin.get("/v2/_catalog", params={"n": 10000}).json()
        assert not [
            name
            for name in catalog["repositories"]
            if name.startswith(installation.leaving + "/")
        ]
    _assert_staying_untouched(installation)
    events = server.run_command(
        "audit", "list", "--json", "--newest-first", "--limit", "1000"
    )
    assert events.returncode == 0, events.stderr
    actions = [
        event["action"]
        for event in map(json.loads, events.stdout.splitlines())
        if event["outcome"] == "success"
        and f"customer {installation.leaving}" in (event["reason"] or "")
    ]
    for action in (
        "customer.suspend",
        "customer.archive.start",
        "customer.archive",
        "customer.delete_repositories",
    ):
        assert action in actions


def test_offboard_errors_are_one_line(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """An unknown customer, an unwritable file and a customer with no images
    each end with one error line, and the last two leave the customer active."""
    server = installation.server
    unknown = server.run_command(
        "customer", "offboard", "nobody-here", "--archive",
        str(installation.work / "nobody.tar"),
    )  # fmt: skip
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "error: customer 'nobody-here' not found"

    empty = server.add_customer()
    login, password = server.add_user(empty, "reader")
    nothing = server.run_command(
        "customer", "offboard", empty, "--archive", str(installation.work / "e.tar")
    )
    assert nothing.returncode == 1
    assert len(nothing.stderr.strip().splitlines()) == 1
    assert "nothing to archive" in nothing.stderr
    assert not (installation.work / "e.tar").exists()

    response = httpx.get(f"{server.url}/v2/", auth=(login, password))
    assert response.status_code == 200

    no_copy = server.run_command("customer", "offboard", empty, "--delete-now")
    assert no_copy.returncode == 2
    assert "--confirm" in no_copy.stderr
    existing = server.run_command(
        "customer", "offboard", empty, "--archive", str(installation.archive)
    )
    assert existing.returncode == 2
    assert "exists already" in existing.stderr
    rejected = server.run_command(
        "audit", "list", "--json", "--action", "customer.offboard"
    )
    reasons = [
        event["reason"]
        for event in map(json.loads, rejected.stdout.splitlines())
        if event["outcome"] == "failure"
    ]
    assert any("nobody-here" in reason for reason in reasons)
    assert any("--confirm" in reason and empty in reason for reason in reasons)
    response = httpx.get(f"{server.url}/v2/", auth=(login, password))
    assert response.status_code == 200

    leftover = installation.work / "staying.tar.partial"
    leftover.write_bytes(b"")
    interrupted = server.run_command(
        "customer", "offboard", installation.staying,
        "--archive", str(installation.work / "staying.tar"),
    )  # fmt: skip
    assert interrupted.returncode == 1
    assert "left by an interrupted offboarding" in interrupted.stderr
    assert not (installation.work / "staying.tar").exists()
    _assert_staying_untouched(installation)

    too_long = installation.work / ("x" * 300 + ".tar")
    unwritable = server.run_command(
        "customer", "offboard", installation.staying, "--archive", str(too_long)
    )
    assert unwritable.returncode == 2
    assert len(unwritable.stderr.strip().splitlines()) == 1
    assert "File name too long" in unwritable.stderr
    _assert_staying_untouched(installation)


def test_damaged_blob_leaves_no_archive(installation: Installation) -> None:
    """A blob whose stored bytes were altered stops the archive with an error
    that names it, leaves neither FILE nor FILE.partial, and is audited as a
    failure."""
    server = installation.server
    customer = server.add_customer()
    user = server.add_user(customer, "writer")
    layer = os.urandom(256 * 1024)
    with httpx.Client(base_url=server.url, auth=user, timeout=60) as client:
        repository = f"{customer}/damaged"
        config = push_blob(client, repository, b'{"architecture":"amd64"}')
        layer_digest = push_blob(client, repository, layer)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config,
                    "size": 24,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest,
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        response = put_manifest(client, repository, "1", manifest)
        assert response.status_code == 201, response.text
    stored = next(
        path
        for path in (server.data_dir / "storage" / "blobs").rglob("*")
        if path.name == layer_digest.split(":")[1]
    )
    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))

    archive = installation.work / "damaged.tar"
    result = server.run_command(
        "customer", "offboard", customer, "--archive", str(archive)
    )
    assert result.returncode == 1
    # With encryption the driver also logs the failed integrity check.
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: blob {layer_digest} ")
    assert not archive.exists()
    assert not archive.with_name("damaged.tar.partial").exists()
    events = server.run_command(
        "audit", "list", "--json", "--newest-first", "--action", "customer.archive"
    )
    outcomes = [
        event["outcome"]
        for event in map(json.loads, events.stdout.splitlines())
        if f"customer {customer} " in event["reason"]
    ]
    assert outcomes == ["failure"]


def test_shred_after_delete_keeps_shared_blobs(
    installation: Installation, archived: subprocess.CompletedProcess[str]
) -> None:
    """`customer shred`, which the output suggests after --delete-now, destroys
    the offboarded customer's key while the blobs it shared still pull."""
    if installation.server.extra_env.get("MOORAGE_ENCRYPTION") == "false":
        pytest.skip("shredding needs encryption at rest")
    server = installation.server
    deleted = server.run_command(
        "customer", "offboard", installation.leaving, "--delete-now", "--confirm"
    )
    assert deleted.returncode == 0, deleted.stderr
    shredded = server.run_command(
        "customer", "shred", installation.leaving, "--confirm"
    )
    assert shredded.returncode == 0, shredded.stderr
    assert "key destroyed" in shredded.stdout
    _assert_staying_untouched(installation)


def test_docker_schema2_image_copies_out(
    installation: Installation, tmp_path: Path
) -> None:
    """An image pushed as a Docker schema 2 manifest, as `docker push` does,
    copies out of the archive with skopeo, its manifest byte for byte."""
    server = installation.server
    layout = OciLayout(tmp_path / "layout")
    manifest = images.docker_schema2_image(layout, "docker")
    source = images.export_dir_image(layout, manifest, tmp_path / "source")
    customer = server.add_customer()
    user = server.add_user(customer, "writer")
    skopeo_push(installation.env, server, user, f"dir:{source}", f"{customer}/dock:1")
    archive = tmp_path / "docker.tar"

    result = server.run_command(
        "customer", "offboard", customer, "--archive", str(archive)
    )

    assert result.returncode == 0, result.stderr
    copied = tmp_path / "copied"
    reference = f"oci-archive:{archive}:{customer}/dock:1"
    run_client("skopeo", "copy", "-q", reference, f"dir:{copied}", env=installation.env)
    assert (copied / "manifest.json").read_bytes() == manifest.data


def test_gc_frees_the_offboarded_images(
    installation: Installation,
    archived: subprocess.CompletedProcess[str],
    tmp_path: Path,
) -> None:
    """`moorage gc` after --delete-now deletes the files of the blobs that only
    the offboarded customer used; the other customer's image still copies out
    with skopeo, every blob byte-identical."""
    server = installation.server
    deleted = server.run_command(
        "customer", "offboard", installation.leaving, "--delete-now", "--confirm"
    )
    assert deleted.returncode == 0, deleted.stderr
    blobs = server.data_dir / "storage" / "blobs"

    def stored() -> int:
        return sum(path.stat().st_size for path in blobs.rglob("*") if path.is_file())

    before = stored()
    collected = server.run_command("gc", "--grace-hours", "0")
    assert collected.returncode == 0, collected.stderr
    _, unused_bytes = _unused_after_delete(installation, archived.stdout)
    assert before - stored() >= unused_bytes, collected.stdout

    login, password = installation.users[installation.staying]
    copied = tmp_path / "busybox"
    run_client(
        "skopeo", "copy", "-q", "--src-tls-verify=false",
        "--src-creds", f"{login}:{password}",
        f"docker://{server.address}/{installation.staying}/busybox:1",
        f"dir:{copied}",
        env=installation.env,
    )  # fmt: skip
    manifest = json.loads((copied / "manifest.json").read_bytes())
    for item in [manifest["config"], *manifest["layers"]]:
        data = (copied / item["digest"].split(":", 1)[1]).read_bytes()
        assert digest_of(data) == item["digest"]
    _assert_staying_untouched(installation)
