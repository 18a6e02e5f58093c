"""Tests for tests/support/images.py, checked with the real skopeo and umoci."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import images
from tests.support.images import (
    ANNOTATION_REF_NAME,
    BUSYBOX_APPLETS,
    BUSYBOX_PATH,
    MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_EMPTY,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_MANIFEST,
    MIB,
    Blob,
    OciLayout,
)

TestFunction = TypeVar("TestFunction", bound=Callable[..., Any])

requires_busybox = pytest.mark.skipif(
    not BUSYBOX_PATH.exists(),
    reason=f"{BUSYBOX_PATH} missing: apt-get install busybox-static",
)


def uses_client(tool: str) -> Callable[[TestFunction], TestFunction]:
    """Mark a test as a `clients` test, skipped when ``tool`` is not installed.

    The Debian package of each tool has the tool's name.
    """
    missing = shutil.which(tool) is None
    skip = pytest.mark.skipif(missing, reason=f"{tool} missing: apt-get install {tool}")

    def decorate(test: TestFunction) -> TestFunction:
        return pytest.mark.clients(skip(test))

    return decorate


requires_skopeo = uses_client("skopeo")
requires_umoci = uses_client("umoci")

# Sizes of random_blob_image layers in the shared layout.
RANDOM_LAYER_SIZES = [0, 1000, 3 * MIB]
LARGE_MAX_BYTES = 24 * MIB


def build_all(path: Path) -> dict[str, Blob]:
    """Build every kind of image into one layout and return the tagged manifests."""
    layout = OciLayout(path)
    busybox = images.busybox_image(layout, "latest")
    return {
        "latest": busybox,
        "multi": images.multi_platform_index(layout, "multi"),
        "sbom": images.artifact_with_subject(layout, busybox, tag="sbom"),
        "docker": images.docker_schema2_image(layout, "docker"),
        "random": images.random_blob_image(
            layout, "random", layer_sizes=RANDOM_LAYER_SIZES, seed=7
        ),
        "large": images.large_image(layout, "large", max_bytes=LARGE_MAX_BYTES),
    }


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[OciLayout, dict[str, Blob]]:
    if not BUSYBOX_PATH.exists():
        pytest.skip(f"{BUSYBOX_PATH} missing: apt-get install busybox-static")
    path = tmp_path_factory.mktemp("layout")
    manifests = build_all(path)
    return OciLayout(path), manifests


def run(*command: str | Path) -> subprocess.CompletedProcess[bytes]:
    """Run a command and fail the test with its stderr if it exits non-zero."""
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, timeout=300
    )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"{command} failed: {stderr}"
    return result


def read_json(layout: OciLayout, digest: str) -> dict[str, Any]:
    return json.loads(layout.read_blob(digest))


def layer_bytes(layout: OciLayout, descriptor: dict[str, Any]) -> bytes:
    """Return the uncompressed tar of a layer descriptor."""
    data = layout.read_blob(descriptor["digest"])
    if descriptor["mediaType"].endswith("gzip"):
        data = gzip.decompress(data)
    return data


def tar_members(tar_bytes: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        return archive.getmembers()


def tar_file_data(tar_bytes: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        member = archive.extractfile(name)
        assert member is not None, f"{name} is not a regular file"
        return member.read()


def tar_member_map(tar_bytes: bytes) -> dict[str, tarfile.TarInfo]:
    return {member.name: member for member in tar_members(tar_bytes)}


def referenced_descriptors(
    layout: OciLayout, descriptor: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Yield ``descriptor`` and every descriptor reachable from it in the layout."""
    yield descriptor
    if descriptor["mediaType"] not in (
        MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_OCI_MANIFEST,
        MEDIA_TYPE_DOCKER_MANIFEST,
    ):
        return
    value = read_json(layout, descriptor["digest"])
    children = [*value.get("manifests", []), *value.get("layers", [])]
    for key in ("config", "subject"):
        if key in value:
            children.append(value[key])
    for child in children:
        yield from referenced_descriptors(layout, child)


def tagged(layout: OciLayout, tag: str) -> dict[str, Any]:
    for entry in layout.read_index()["manifests"]:
        if entry.get("annotations", {}).get(ANNOTATION_REF_NAME) == tag:
            return entry
    raise AssertionError(f"tag {tag!r} not found in index.json")


# --- Blob and OciLayout --------------------------------------------------------


def test_blob_descriptor_required_fields() -> None:
    """Blob computes the sha256 digest and size of its data."""
    blob = Blob(MEDIA_TYPE_OCI_EMPTY, b"{}")
    expected_digest = (
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    assert blob.digest == expected_digest
    assert blob.size == 2
    assert blob.descriptor() == {
        "mediaType": MEDIA_TYPE_OCI_EMPTY,
        "digest": expected_digest,
        "size": 2,
    }


def test_blob_descriptor_optional_fields() -> None:
    """Blob.descriptor adds platform, annotations and artifactType when given."""
    descriptor = Blob(MEDIA_TYPE_OCI_MANIFEST, b"x").descriptor(
        platform={"architecture": "arm64", "os": "linux"},
        annotations={"a": "b"},
        artifact_type="application/example",
    )
    assert descriptor["platform"] == {"architecture": "arm64", "os": "linux"}
    assert descriptor["annotations"] == {"a": "b"}
    assert descriptor["artifactType"] == "application/example"


def test_layout_new_directory_files(tmp_path: Path) -> None:
    """OciLayout writes oci-layout, an empty index.json and blobs/sha256."""
    OciLayout(tmp_path / "new")
    marker = json.loads((tmp_path / "new" / "oci-layout").read_bytes())
    index = json.loads((tmp_path / "new" / "index.json").read_bytes())
    assert marker == {"imageLayoutVersion": "1.0.0"}
    assert index == {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_INDEX,
        "manifests": [],
    }
    assert (tmp_path / "new" / "blobs" / "sha256").is_dir()


def test_layout_blob_path_rejects_invalid_digest(tmp_path: Path) -> None:
    """OciLayout.blob_path raises ValueError for a digest that is not sha256."""
    layout = OciLayout(tmp_path)
    with pytest.raises(ValueError, match="invalid digest"):
        layout.blob_path("md5:abc")


def test_layout_tag_moves_existing_ref(tmp_path: Path) -> None:
    """OciLayout.tag replaces the entry that had the same ref name."""
    layout = OciLayout(tmp_path)
    first = layout.add_json({"n": 1}, MEDIA_TYPE_OCI_MANIFEST)
    second = layout.add_json({"n": 2}, MEDIA_TYPE_OCI_MANIFEST)
    layout.tag(first, "v1")
    layout.tag(first, "keep")
    layout.tag(second, "v1")
    entries = layout.read_index()["manifests"]
    refs = {entry["annotations"][ANNOTATION_REF_NAME]: entry for entry in entries}
    assert len(entries) == 2
    assert refs["v1"]["digest"] == second.digest
    assert refs["keep"]["digest"] == first.digest


def test_layout_reopen_keeps_index(tmp_path: Path) -> None:
    """OciLayout opened on an existing directory keeps its index.json entries."""
    first = OciLayout(tmp_path)
    blob = first.add_json({"n": 1}, MEDIA_TYPE_OCI_MANIFEST)
    first.tag(blob, "v1")
    reopened = OciLayout(tmp_path)
    other = reopened.add_json({"n": 2}, MEDIA_TYPE_OCI_MANIFEST)
    reopened.tag(other, "v2")
    refs = [
        entry["annotations"][ANNOTATION_REF_NAME]
        for entry in reopened.read_index()["manifests"]
    ]
    assert refs == ["v1", "v2"]


def test_layout_add_untagged_lists_once(tmp_path: Path) -> None:
    """OciLayout.add_untagged adds one index.json entry without annotations."""
    layout = OciLayout(tmp_path)
    blob = layout.add_json({"n": 1}, MEDIA_TYPE_OCI_MANIFEST)
    layout.add_untagged(blob)
    layout.add_untagged(blob)
    assert layout.read_index()["manifests"] == [blob.descriptor()]


def test_layout_add_layer_gzip_and_diff_id(tmp_path: Path) -> None:
    """OciLayout.add_layer gzips with mtime 0 and records the tar's digest."""
    layout = OciLayout(tmp_path)
    tar = images.LayerTar()
    tar.add_file("a.txt", b"hello\n")
    tar_bytes = tar.to_bytes()
    layer = layout.add_layer(tar_bytes, MEDIA_TYPE_OCI_LAYER_GZIP)
    stored = layout.read_blob(layer.blob.digest)
    assert gzip.decompress(stored) == tar_bytes
    assert stored[4:8] == b"\0\0\0\0"
    assert layer.diff_id == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def test_layer_tar_fixed_metadata() -> None:
    """LayerTar writes uid/gid 0, empty owner names and mtime 0."""
    tar = images.LayerTar()
    tar.add_directory("d")
    tar.add_file("d/f", b"x", mode=0o600)
    tar.add_symlink("d/l", "f")
    members = tar_member_map(tar.to_bytes())
    for member in members.values():
        assert (member.uid, member.gid, member.mtime) == (0, 0, 0)
        assert (member.uname, member.gname) == ("", "")
    assert list(members) == ["d", "d/f", "d/l"]
    assert members["d/f"].mode == 0o600
    assert members["d/l"].linkname == "f"


def test_layer_tar_rejects_duplicate_name() -> None:
    """LayerTar raises ValueError when a name is added twice."""
    tar = images.LayerTar()
    tar.add_directory("d")
    with pytest.raises(ValueError, match="duplicate"):
        tar.add_directory("d")


def test_add_manifest_docker_rejects_subject(tmp_path: Path) -> None:
    """OciLayout.add_manifest raises ValueError for a Docker manifest with subject."""
    layout = OciLayout(tmp_path)
    config = layout.add_blob(b"{}", MEDIA_TYPE_DOCKER_CONFIG)
    with pytest.raises(ValueError, match="Docker schema 2"):
        layout.add_manifest(
            config, [], media_type=MEDIA_TYPE_DOCKER_MANIFEST, subject=config
        )


# --- the shared layout ---------------------------------------------------------


def test_layout_blob_files_match_digests(built: tuple[OciLayout, dict]) -> None:
    """Every file under blobs/sha256 hashes to its own name."""
    layout, _ = built
    for path in layout.blobs_dir.iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


def test_layout_descriptors_match_blobs(built: tuple[OciLayout, dict]) -> None:
    """Every descriptor reachable from index.json names a stored blob of its size."""
    layout, _ = built
    for entry in layout.read_index()["manifests"]:
        for descriptor in referenced_descriptors(layout, entry):
            path = layout.blob_path(descriptor["digest"])
            assert path.is_file(), f"missing blob {descriptor['digest']}"
            assert path.stat().st_size == descriptor["size"], descriptor["digest"]


def test_layout_index_lists_every_tag(built: tuple[OciLayout, dict]) -> None:
    """index.json maps each tag to the manifest that its builder returned."""
    layout, manifests = built
    for tag, manifest in manifests.items():
        assert tagged(layout, tag) == manifest.descriptor(
            annotations={ANNOTATION_REF_NAME: tag}
        )


@requires_skopeo
@pytest.mark.parametrize("tag", ["latest", "multi", "sbom", "random", "large"])
def test_skopeo_inspect_raw_exact_bytes(
    built: tuple[OciLayout, dict], tag: str
) -> None:
    """skopeo inspect --raw oci:DIR:TAG prints the stored manifest bytes."""
    layout, manifests = built
    result = run("skopeo", "inspect", "--raw", f"oci:{layout.path}:{tag}")
    assert result.stdout == manifests[tag].data


@requires_skopeo
@pytest.mark.parametrize("tag", ["latest", "multi", "sbom", "random", "large"])
def test_skopeo_copy_to_dir_preserves_manifest(
    built: tuple[OciLayout, dict], tag: str, tmp_path: Path
) -> None:
    """skopeo copy --all --preserve-digests to dir: keeps the manifest bytes."""
    layout, manifests = built
    out = tmp_path / "out"
    source = f"oci:{layout.path}:{tag}"
    run("skopeo", "copy", "-q", "--all", "--preserve-digests", source, f"dir:{out}")
    assert (out / "manifest.json").read_bytes() == manifests[tag].data


@requires_skopeo
def test_skopeo_oci_transport_skips_docker_manifest(
    built: tuple[OciLayout, dict],
) -> None:
    """skopeo finds no oci:DIR:TAG for a Docker schema 2 entry of index.json."""
    layout, _ = built
    result = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{layout.path}:docker"],
        capture_output=True,
        timeout=60,
    )
    # If this starts to pass, a newer skopeo reads Docker manifests from OCI
    # layouts and export_dir_image is no longer needed for them.
    assert result.returncode != 0
    assert b"no descriptor found" in result.stderr


def test_builders_reproducible_digests(
    built: tuple[OciLayout, dict], tmp_path: Path
) -> None:
    """Building every image again gives the same digests and index.json."""
    layout, manifests = built
    again = build_all(tmp_path / "again")
    assert {tag: blob.digest for tag, blob in again.items()} == {
        tag: blob.digest for tag, blob in manifests.items()
    }
    assert (tmp_path / "again" / "index.json").read_bytes() == (
        layout.index_path.read_bytes()
    )
    blob_names = sorted(p.name for p in layout.blobs_dir.iterdir())
    again_names = sorted(p.name for p in (tmp_path / "again/blobs/sha256").iterdir())
    assert again_names == blob_names


# --- busybox -------------------------------------------------------------------


@requires_busybox
def test_busybox_applets_exist_in_binary() -> None:
    """Every symlinked applet is one that the installed busybox provides."""
    applets = set(run(BUSYBOX_PATH, "--list").stdout.decode().split())
    missing = [name for name in BUSYBOX_APPLETS if name not in applets]
    assert missing == []


def test_busybox_layer_contains_executable(built: tuple[OciLayout, dict]) -> None:
    """The busybox layer has an executable bin/busybox and applet symlinks."""
    layout, manifests = built
    manifest = json.loads(manifests["latest"].data)
    assert len(manifest["layers"]) == 1
    tar_bytes = layer_bytes(layout, manifest["layers"][0])
    members = tar_member_map(tar_bytes)
    binary = members["bin/busybox"]
    assert binary.isfile()
    assert binary.mode & 0o111 == 0o111
    assert tar_file_data(tar_bytes, "bin/busybox") == BUSYBOX_PATH.read_bytes()
    for applet in ("sh", "ls", "cat", "echo"):
        link = members[f"bin/{applet}"]
        assert link.issym()
        assert link.linkname == "busybox"
    assert members["tmp"].mode == 0o1777


def test_busybox_config_matches_layer(built: tuple[OciLayout, dict]) -> None:
    """The busybox config has Cmd sh, linux, the binary's arch and the diff_id."""
    layout, manifests = built
    manifest = json.loads(manifests["latest"].data)
    assert manifest["mediaType"] == MEDIA_TYPE_OCI_MANIFEST
    assert manifest["config"]["mediaType"] == MEDIA_TYPE_OCI_CONFIG
    assert manifest["layers"][0]["mediaType"] == MEDIA_TYPE_OCI_LAYER_GZIP
    config = read_json(layout, manifest["config"]["digest"])
    layer_data = gzip.decompress(layout.read_blob(manifest["layers"][0]["digest"]))
    diff_id = "sha256:" + hashlib.sha256(layer_data).hexdigest()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}
    assert config["config"]["Cmd"] == ["sh"]
    assert config["os"] == "linux"
    binary = BUSYBOX_PATH.read_bytes()
    assert config["architecture"] == images.elf_architecture(binary)
    assert len(config["history"]) == 1


@requires_umoci
def test_busybox_umoci_unpack_runs_sh(
    built: tuple[OciLayout, dict], tmp_path: Path
) -> None:
    """umoci unpacks the busybox image, and its bin/sh runs on this host."""
    layout, _ = built
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--image", f"{layout.path}:latest", bundle)
    rootfs = bundle / "rootfs"
    assert os.access(rootfs / "bin" / "busybox", os.X_OK)
    result = run(rootfs / "bin" / "sh", "-c", "echo unpacked-ok")
    assert result.stdout == b"unpacked-ok\n"


def test_busybox_image_arch_override_labels_config(tmp_path: Path) -> None:
    """busybox_image with another arch writes that arch into the config."""
    if not BUSYBOX_PATH.exists():
        pytest.skip(f"{BUSYBOX_PATH} missing: apt-get install busybox-static")
    layout = OciLayout(tmp_path)
    manifest = images.busybox_image(layout, "labelled", arch="riscv64")
    config_digest = json.loads(manifest.data)["config"]["digest"]
    assert read_json(layout, config_digest)["architecture"] == "riscv64"


def test_elf_architecture_rejects_dynamic_binary() -> None:
    """elf_architecture raises ValueError for a dynamically linked ELF file."""
    dynamic = Path("/bin/ls").read_bytes()
    with pytest.raises(ValueError, match="dynamically linked"):
        images.elf_architecture(dynamic)


def test_elf_architecture_rejects_non_elf() -> None:
    """elf_architecture raises ValueError for bytes that are not ELF."""
    with pytest.raises(ValueError, match="not a 64-bit"):
        images.elf_architecture(b"#!/bin/sh\n" + b"\0" * 64)


def test_read_busybox_missing_names_package(tmp_path: Path) -> None:
    """read_busybox names the Debian package when the binary is missing."""
    with pytest.raises(FileNotFoundError, match="busybox-static"):
        images.read_busybox(tmp_path / "busybox")


# --- Docker schema 2 -----------------------------------------------------------


def test_docker_schema2_media_types(built: tuple[OciLayout, dict]) -> None:
    """docker_schema2_image uses the Docker manifest, config and layer types."""
    layout, manifests = built
    manifest = json.loads(manifests["docker"].data)
    assert manifests["docker"].media_type == MEDIA_TYPE_DOCKER_MANIFEST
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == MEDIA_TYPE_DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == MEDIA_TYPE_DOCKER_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        MEDIA_TYPE_DOCKER_LAYER_GZIP
    ]
    assert tagged(layout, "docker")["mediaType"] == MEDIA_TYPE_DOCKER_MANIFEST


@requires_skopeo
def test_docker_schema2_dir_export_exact_bytes(
    built: tuple[OciLayout, dict], tmp_path: Path
) -> None:
    """skopeo reads the exported Docker image and copies it with the same digest."""
    layout, manifests = built
    exported = images.export_dir_image(layout, manifests["docker"], tmp_path / "d")
    raw = run("skopeo", "inspect", "--raw", f"dir:{exported}").stdout
    assert raw == manifests["docker"].data
    out = tmp_path / "out"
    run("skopeo", "copy", "-q", "--preserve-digests", f"dir:{exported}", f"dir:{out}")
    assert (out / "manifest.json").read_bytes() == manifests["docker"].data


@requires_skopeo
def test_export_dir_image_index_copies(
    built: tuple[OciLayout, dict], tmp_path: Path
) -> None:
    """export_dir_image writes an index that skopeo copy --all accepts."""
    layout, manifests = built
    exported = images.export_dir_image(layout, manifests["multi"], tmp_path / "d")
    out = tmp_path / "out"
    source = f"dir:{exported}"
    run("skopeo", "copy", "-q", "--all", "--preserve-digests", source, f"dir:{out}")
    assert (out / "manifest.json").read_bytes() == manifests["multi"].data


# --- image index ---------------------------------------------------------------


def test_multi_platform_index_platforms(built: tuple[OciLayout, dict]) -> None:
    """The index lists linux/amd64 and linux/arm64/v8 image manifests."""
    _, manifests = built
    index = json.loads(manifests["multi"].data)
    assert index["mediaType"] == MEDIA_TYPE_OCI_INDEX
    platforms = [entry["platform"] for entry in index["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    media_types = {entry["mediaType"] for entry in index["manifests"]}
    assert media_types == {MEDIA_TYPE_OCI_MANIFEST}


def test_multi_platform_index_configs_match(built: tuple[OciLayout, dict]) -> None:
    """Each platform config has its arch, and non-native manifests add etc/platform."""
    layout, manifests = built
    native = images.elf_architecture(BUSYBOX_PATH.read_bytes())
    busybox_layer = json.loads(manifests["latest"].data)["layers"][0]
    for entry in json.loads(manifests["multi"].data)["manifests"]:
        manifest = read_json(layout, entry["digest"])
        config = read_json(layout, manifest["config"]["digest"])
        architecture = entry["platform"]["architecture"]
        assert config["architecture"] == architecture
        assert config.get("variant") == entry["platform"].get("variant")
        assert manifest["layers"][0] == busybox_layer
        assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
        if architecture == native:
            assert len(manifest["layers"]) == 1
            continue
        marker = layer_bytes(layout, manifest["layers"][1])
        text = tar_file_data(marker, "etc/platform")
        assert text == f"linux/{architecture}\n".encode()


# --- artifact ------------------------------------------------------------------


def test_artifact_subject_points_to_image(built: tuple[OciLayout, dict]) -> None:
    """The artifact's subject is the busybox manifest's descriptor."""
    _, manifests = built
    artifact = json.loads(manifests["sbom"].data)
    assert artifact["subject"] == manifests["latest"].descriptor()
    assert artifact["subject"]["digest"] == manifests["latest"].digest


def test_artifact_empty_config_and_layer(built: tuple[OciLayout, dict]) -> None:
    """The artifact has artifactType, the empty config, one SBOM layer, annotations."""
    layout, manifests = built
    artifact = json.loads(manifests["sbom"].data)
    assert artifact["mediaType"] == MEDIA_TYPE_OCI_MANIFEST
    assert artifact["artifactType"] == images.DEFAULT_ARTIFACT_TYPE
    assert artifact["config"] == Blob(MEDIA_TYPE_OCI_EMPTY, b"{}").descriptor()
    assert layout.read_blob(artifact["config"]["digest"]) == b"{}"
    [layer] = artifact["layers"]
    assert layer["mediaType"] == images.DEFAULT_ARTIFACT_TYPE
    sbom = read_json(layout, layer["digest"])
    assert sbom["spdxVersion"] == "SPDX-2.3"
    assert images.ANNOTATION_TITLE in layer["annotations"]
    assert images.ANNOTATION_CREATED in artifact["annotations"]


def test_artifact_without_tag_untagged_entry(tmp_path: Path) -> None:
    """artifact_with_subject without a tag lists the artifact without ref name."""
    layout = OciLayout(tmp_path)
    subject = layout.add_json({"schemaVersion": 2}, MEDIA_TYPE_OCI_MANIFEST)
    artifact = images.artifact_with_subject(
        layout, subject, artifact_type="application/vnd.example.signature"
    )
    assert layout.read_index()["manifests"] == [artifact.descriptor()]
    assert json.loads(artifact.data)["artifactType"] == (
        "application/vnd.example.signature"
    )


# --- random and large images ----------------------------------------------------


def test_random_blob_image_layer_sizes(built: tuple[OciLayout, dict]) -> None:
    """Each random layer contains one incompressible file of the requested size."""
    layout, manifests = built
    layers = json.loads(manifests["random"].data)["layers"]
    assert len(layers) == len(RANDOM_LAYER_SIZES)
    for index, (layer, size) in enumerate(zip(layers, RANDOM_LAYER_SIZES, strict=True)):
        members = tar_member_map(layer_bytes(layout, layer))
        member = members[f"random/layer-{index}.bin"]
        assert member.size == size
        assert layer["size"] >= size


def test_random_blob_image_seed_changes_bytes(tmp_path: Path) -> None:
    """random_blob_image repeats its bytes for a seed and changes them with the seed."""
    layout = OciLayout(tmp_path)
    first = images.random_blob_image(layout, "a", layer_sizes=[4096], seed=1)
    same = images.random_blob_image(layout, "b", layer_sizes=[4096], seed=1)
    other = images.random_blob_image(layout, "c", layer_sizes=[4096], seed=2)
    assert first.digest == same.digest
    assert first.digest != other.digest


def test_random_blob_image_rejects_negative_size(tmp_path: Path) -> None:
    """random_blob_image raises ValueError for a negative layer size."""
    with pytest.raises(ValueError, match="must not be negative"):
        images.random_blob_image(OciLayout(tmp_path), layer_sizes=[-1])


def test_large_image_default_source_size(built: tuple[OciLayout, dict]) -> None:
    """large_image of the stdlib gives 3 layers with 16 MiB to max_bytes of files."""
    layout, manifests = built
    layers = json.loads(manifests["large"].data)["layers"]
    assert len(layers) == 3
    file_bytes = 0
    for layer in layers:
        members = tar_members(layer_bytes(layout, layer))
        file_bytes += sum(member.size for member in members if member.isfile())
    assert 16 * MIB <= file_bytes <= LARGE_MAX_BYTES


def make_source_tree(root: Path) -> Path:
    """Create a small tree with a file, a subdirectory, a symlink and a FIFO."""
    source = root / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_bytes(b"a" * 100)
    (source / "sub" / "b.sh").write_bytes(b"#!/bin/sh\n")
    (source / "sub" / "b.sh").chmod(0o750)
    (source / "link").symlink_to("sub/b.sh")
    os.mkfifo(source / "fifo")
    return source


def large_layer_members(
    layout: OciLayout, manifest: Blob
) -> list[list[tarfile.TarInfo]]:
    layers = json.loads(manifest.data)["layers"]
    return [tar_members(layer_bytes(layout, layer)) for layer in layers]


def test_large_image_keeps_symlinks_skips_fifo(tmp_path: Path) -> None:
    """large_image keeps symlinks and modes, skips FIFOs and adds parent dirs."""
    source = make_source_tree(tmp_path)
    layout = OciLayout(tmp_path / "layout")
    manifest = images.large_image(layout, "t", source, layer_count=1)
    [members] = large_layer_members(layout, manifest)
    prefix = source.as_posix().lstrip("/")
    by_name = {member.name: member for member in members}
    assert by_name[f"{prefix}/link"].issym()
    assert by_name[f"{prefix}/link"].linkname == "sub/b.sh"
    assert by_name[f"{prefix}/sub/b.sh"].mode == 0o750
    assert f"{prefix}/fifo" not in by_name
    assert by_name[prefix.split("/")[0]].isdir()
    assert [member.name for member in members][-4:] == [
        f"{prefix}/a.txt",
        f"{prefix}/link",
        f"{prefix}/sub",
        f"{prefix}/sub/b.sh",
    ]


def test_large_image_skips_unreadable_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """large_image leaves out a file whose read raises PermissionError."""
    source = make_source_tree(tmp_path)
    original_read_bytes = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path.name == "a.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return original_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    layout = OciLayout(tmp_path / "layout")
    manifest = images.large_image(layout, "t", source, layer_count=1)
    [members] = large_layer_members(layout, manifest)
    names = {member.name for member in members}
    assert f"{source.as_posix().lstrip('/')}/a.txt" not in names
    assert f"{source.as_posix().lstrip('/')}/sub/b.sh" in names


def test_large_image_max_bytes_skips_big_file(tmp_path: Path) -> None:
    """large_image skips a file over max_bytes but keeps later files that fit."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "1-small").write_bytes(b"x" * 100)
    (source / "2-big").write_bytes(b"x" * 1000)
    (source / "3-small").write_bytes(b"x" * 100)
    layout = OciLayout(tmp_path / "layout")
    manifest = images.large_image(layout, "t", source, max_bytes=250, layer_count=1)
    [members] = large_layer_members(layout, manifest)
    files = [member.name.rsplit("/", 1)[1] for member in members if member.isfile()]
    assert files == ["1-small", "3-small"]


def test_large_image_splits_layers_with_parents(tmp_path: Path) -> None:
    """large_image cuts many files into layer_count layers, each with parents."""
    source = tmp_path / "src"
    for directory in range(4):
        (source / f"d{directory}").mkdir(parents=True)
        for number in range(5):
            (source / f"d{directory}" / f"f{number}").write_bytes(b"y" * 1000)
    layout = OciLayout(tmp_path / "layout")
    manifest = images.large_image(layout, "t", source, layer_count=3)
    layers = large_layer_members(layout, manifest)
    assert len(layers) == 3
    for members in layers:
        names = {member.name for member in members}
        for name in names:
            for parent in images.parent_names(name):
                assert parent in names, f"{parent} missing before {name}"
    file_counts = [sum(m.isfile() for m in members) for members in layers]
    assert sum(file_counts) == 20
    assert min(file_counts) >= 5


def test_large_image_rejects_empty_source(tmp_path: Path) -> None:
    """large_image raises ValueError when nothing under the source is readable."""
    with pytest.raises(ValueError, match="no readable entries"):
        images.large_image(OciLayout(tmp_path), "t", tmp_path / "missing")


def test_large_image_rejects_zero_layers(tmp_path: Path) -> None:
    """large_image raises ValueError for layer_count 0."""
    with pytest.raises(ValueError, match="layer_count"):
        images.large_image(OciLayout(tmp_path), "t", tmp_path, layer_count=0)
