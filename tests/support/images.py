"""Write OCI image layouts for tests, offline and reproducibly.

skopeo and podman read these layouts as ``oci:DIR:TAG``, and umoci as ``DIR:TAG``.
They skip Docker schema 2 manifests in an OCI layout, which is why
``export_dir_image`` exists. Every tar entry has uid/gid 0, no user or group name and
mtime 0, and every gzip stream has mtime 0, so the same inputs give the same digests
as long as the zlib version stays the same.

Only the standard library is used. The busybox images need ``/bin/busybox`` from
Debian's busybox-static package.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import platform
import random
import re
import stat
import struct
import sysconfig
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_EMPTY = "application/vnd.oci.empty.v1+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_DESCRIPTION = "org.opencontainers.image.description"

OCI_LAYOUT_VERSION = "1.0.0"
# Contents of the `version` file in a skopeo dir: transport directory, as written
# by skopeo 1.9.3.
DIR_TRANSPORT_VERSION = b"Directory Transport Version: 1.1\n"
DEFAULT_ARTIFACT_TYPE = "application/vnd.example.sbom+json"

# Fixed timestamps keep digests independent of when an image is built.
EPOCH_MTIME = 0
EPOCH_CREATED = "1970-01-01T00:00:00Z"
GZIP_LEVEL = 6

DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)

BUSYBOX_PATH = Path("/bin/busybox")
# Each name is an applet of Debian bookworm's busybox-static 1.35. A test checks
# them against `busybox --list` of the installed binary.
BUSYBOX_APPLETS = tuple(
    """
    [ ash awk basename cat chmod cp cut date dirname echo env false find grep head
    hostname id ln ls mkdir mv printf ps pwd rm sed sh sleep sort tail tar test
    touch tr true uname wc wget which
    """.split()  # noqa: SIM905 - a word list reads better than 40 quoted lines
)

# ELF e_machine values (EM_X86_64, EM_AARCH64, EM_RISCV and EM_PPC64 in glibc's
# elf.h) mapped to OCI architecture names.
ELF_MACHINE_ARCHITECTURES = {
    0x3E: "amd64",
    0xB7: "arm64",
    0xF3: "riscv64",
    0x15: "ppc64le",
}
PT_INTERP = 3

# platform.machine() values mapped to OCI architecture names.
MACHINE_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

SHA256_HEX = re.compile("[0-9a-f]{64}")
MIB = 1024 * 1024
DEFAULT_LARGE_SOURCE = Path(sysconfig.get_path("stdlib"))


def sha256_digest(data: bytes) -> str:
    """Return the OCI digest string ``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Serialize compactly in insertion order, so equal values give equal bytes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclasses.dataclass(frozen=True)
class Blob:
    """Content-addressed bytes and the media type they are referenced with."""

    media_type: str
    data: bytes = dataclasses.field(repr=False)
    digest: str = dataclasses.field(init=False)
    size: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", sha256_digest(self.data))
        object.__setattr__(self, "size", len(self.data))

    def descriptor(
        self,
        *,
        platform: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        artifact_type: str | None = None,
    ) -> dict[str, Any]:
        """Return the OCI descriptor; optional fields appear only when given."""
        result: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if artifact_type is not None:
            result["artifactType"] = artifact_type
        if platform is not None:
            result["platform"] = platform
        if annotations is not None:
            result["annotations"] = annotations
        return result


def as_descriptor(item: Blob | dict[str, Any]) -> dict[str, Any]:
    if isinstance(item, Blob):
        return item.descriptor()
    return item


@dataclasses.dataclass(frozen=True)
class Layer:
    """A stored layer blob and its diff_id, the digest of the uncompressed tar."""

    blob: Blob
    diff_id: str


class LayerTar:
    """Tar archive builder whose entries have fixed owner, group and mtime."""

    def __init__(self) -> None:
        self._entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
        self._names: set[str] = set()

    def add_directory(self, name: str, mode: int = 0o755) -> None:
        self._add(self._info(name, tarfile.DIRTYPE, mode))

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self._add(info, data)

    def add_symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self._add(info)

    def contains(self, name: str) -> bool:
        return name in self._names

    def to_bytes(self) -> bytes:
        """Return the archive with the entries in the order they were added."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in self._entries:
                tar.addfile(info, None if data is None else io.BytesIO(data))
        return buffer.getvalue()

    def _info(self, name: str, entry_type: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = entry_type
        info.mode = mode
        info.mtime = EPOCH_MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        if info.name in self._names:
            raise ValueError(f"duplicate tar entry {info.name!r}")
        self._names.add(info.name)
        self._entries.append((info, data))


class OciLayout:
    """An OCI image layout directory: ``oci-layout``, ``index.json`` and ``blobs/``.

    Opening an existing layout keeps the entries of its ``index.json``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        layout = {"imageLayoutVersion": OCI_LAYOUT_VERSION}
        (self.path / "oci-layout").write_bytes(canonical_json(layout))
        self._entries: list[dict[str, Any]] = self._read_entries()
        self._write_index()

    @property
    def blobs_dir(self) -> Path:
        return self.path / "blobs" / "sha256"

    @property
    def index_path(self) -> Path:
        return self.path / "index.json"

    def blob_path(self, digest: str) -> Path:
        algorithm, _, encoded = digest.partition(":")
        if algorithm != "sha256" or not SHA256_HEX.fullmatch(encoded):
            raise ValueError(f"invalid digest {digest!r}: expected sha256:<64 hex>")
        return self.blobs_dir / encoded

    def add_blob(self, data: bytes, media_type: str) -> Blob:
        """Store ``data`` under its digest unless a blob with that digest exists."""
        blob = Blob(media_type, data)
        path = self.blob_path(blob.digest)
        if not path.exists():
            path.write_bytes(data)
        return blob

    def add_json(self, value: Any, media_type: str) -> Blob:
        return self.add_blob(canonical_json(value), media_type)

    def add_layer(self, tar_bytes: bytes, media_type: str) -> Layer:
        """Store a layer, gzip-compressed when ``media_type`` ends with "gzip"."""
        data = tar_bytes
        if media_type.endswith("gzip"):
            data = gzip.compress(tar_bytes, compresslevel=GZIP_LEVEL, mtime=0)
        return Layer(self.add_blob(data, media_type), sha256_digest(tar_bytes))

    def add_manifest(
        self,
        config: Blob,
        layers: Sequence[Blob | dict[str, Any]],
        *,
        media_type: str = MEDIA_TYPE_OCI_MANIFEST,
        artifact_type: str | None = None,
        subject: Blob | None = None,
        annotations: dict[str, str] | None = None,
    ) -> Blob:
        """Store an image manifest. ``layers`` may be blobs or ready descriptors.

        A Docker schema 2 manifest raises ValueError with an artifact type or subject.
        """
        docker = media_type == MEDIA_TYPE_DOCKER_MANIFEST
        if docker and (artifact_type is not None or subject is not None):
            raise ValueError(
                "a Docker schema 2 manifest has no artifactType or subject"
            )
        manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
        if artifact_type is not None:
            manifest["artifactType"] = artifact_type
        manifest["config"] = config.descriptor()
        manifest["layers"] = [as_descriptor(layer) for layer in layers]
        if subject is not None:
            manifest["subject"] = subject.descriptor()
        if annotations is not None:
            manifest["annotations"] = annotations
        return self.add_json(manifest, media_type)

    def add_index(
        self,
        manifests: Sequence[dict[str, Any]],
        *,
        annotations: dict[str, str] | None = None,
    ) -> Blob:
        """Store an image index whose entries are the given descriptors."""
        index: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_INDEX,
            "manifests": list(manifests),
        }
        if annotations is not None:
            index["annotations"] = annotations
        return self.add_json(index, MEDIA_TYPE_OCI_INDEX)

    def tag(self, manifest: Blob, ref_name: str) -> None:
        """Point ``ref_name`` at ``manifest`` in index.json, moving an existing tag."""
        self._entries = [
            entry
            for entry in self._entries
            if entry.get("annotations", {}).get(ANNOTATION_REF_NAME) != ref_name
        ]
        annotations = {ANNOTATION_REF_NAME: ref_name}
        self._entries.append(manifest.descriptor(annotations=annotations))
        self._write_index()

    def add_untagged(self, manifest: Blob) -> None:
        """List ``manifest`` in index.json without a ref name, unless it is listed."""
        if any(entry["digest"] == manifest.digest for entry in self._entries):
            return
        self._entries.append(manifest.descriptor())
        self._write_index()

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def read_index(self) -> dict[str, Any]:
        return json.loads(self.index_path.read_bytes())

    def _read_entries(self) -> list[dict[str, Any]]:
        if not self.index_path.exists():
            return []
        return list(self.read_index().get("manifests", []))

    def _write_index(self) -> None:
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_INDEX,
            "manifests": self._entries,
        }
        self.index_path.write_bytes(canonical_json(index))


def host_architecture() -> str:
    """Return the OCI architecture name of this machine, e.g. "amd64"."""
    machine = platform.machine()
    return MACHINE_ARCHITECTURES.get(machine, machine)


def image_config(
    architecture: str,
    diff_ids: Sequence[str],
    *,
    variant: str | None = None,
    cmd: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Return an image config for linux with one history entry per layer."""
    config: dict[str, Any] = {"Env": list(DEFAULT_ENV)}
    if cmd is not None:
        config["Cmd"] = list(cmd)
    result: dict[str, Any] = {
        "created": EPOCH_CREATED,
        "architecture": architecture,
        "os": "linux",
    }
    if variant is not None:
        result["variant"] = variant
    result["config"] = config
    result["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    history = {"created": EPOCH_CREATED, "created_by": "tests/support/images.py"}
    result["history"] = [history for _ in diff_ids]
    return result


def add_image(
    layout: OciLayout,
    layers: Sequence[Layer],
    architecture: str,
    *,
    variant: str | None = None,
    cmd: Sequence[str] | None = None,
) -> Blob:
    """Store the config and the OCI manifest of an image made of ``layers``."""
    diff_ids = [layer.diff_id for layer in layers]
    config_value = image_config(architecture, diff_ids, variant=variant, cmd=cmd)
    config = layout.add_json(config_value, MEDIA_TYPE_OCI_CONFIG)
    return layout.add_manifest(config, [layer.blob for layer in layers])


# --- busybox -----------------------------------------------------------------


def elf_architecture(binary: bytes) -> str:
    """Return the OCI architecture of a 64-bit little-endian, statically linked ELF.

    Raise ValueError for any other file. A dynamically linked binary is rejected
    because it cannot run in an image that contains no shared libraries.
    """
    if binary[:4] != b"\x7fELF" or len(binary) < 64 or binary[4:6] != b"\x02\x01":
        raise ValueError("not a 64-bit little-endian ELF file")
    (machine,) = struct.unpack_from("<H", binary, 0x12)
    if machine not in ELF_MACHINE_ARCHITECTURES:
        raise ValueError(f"unsupported ELF machine {machine:#x}")
    (program_headers_offset,) = struct.unpack_from("<Q", binary, 0x20)
    entry_size, entry_count = struct.unpack_from("<HH", binary, 0x36)
    for index in range(entry_count):
        offset = program_headers_offset + index * entry_size
        try:
            (segment_type,) = struct.unpack_from("<I", binary, offset)
        except struct.error:
            raise ValueError("truncated ELF file") from None
        if segment_type == PT_INTERP:
            raise ValueError("dynamically linked ELF (it has a PT_INTERP segment)")
    return ELF_MACHINE_ARCHITECTURES[machine]


def read_busybox(path: Path = BUSYBOX_PATH) -> bytes:
    """Read the busybox binary and check that it can run on its own."""
    try:
        binary = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: install the Debian package busybox-static"
        ) from None
    try:
        elf_architecture(binary)
    except ValueError as error:
        raise ValueError(
            f"{path} is not a usable busybox ({error}): install busybox-static"
        ) from None
    return binary


def busybox_layer_tar(binary: bytes) -> bytes:
    """Build the rootfs tar: ``bin/busybox``, applet symlinks, ``etc/`` and ``tmp/``."""
    tar = LayerTar()
    tar.add_directory("bin")
    tar.add_file("bin/busybox", binary, mode=0o755)
    for applet in BUSYBOX_APPLETS:
        tar.add_symlink(f"bin/{applet}", "busybox")
    tar.add_directory("etc")
    tar.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tar.add_file("etc/group", b"root:x:0:\n")
    tar.add_directory("root", mode=0o700)
    tar.add_directory("tmp", mode=0o1777)
    return tar.to_bytes()


def add_busybox_manifest(
    layout: OciLayout, arch: str | None = None, busybox: Path = BUSYBOX_PATH
) -> Blob:
    """Store an untagged busybox image and return its manifest."""
    binary = read_busybox(busybox)
    architecture = elf_architecture(binary) if arch is None else arch
    layer = layout.add_layer(busybox_layer_tar(binary), MEDIA_TYPE_OCI_LAYER_GZIP)
    return add_image(layout, [layer], architecture, cmd=["sh"])


def busybox_image(
    layout: OciLayout,
    tag: str = "latest",
    arch: str | None = None,
    busybox: Path = BUSYBOX_PATH,
) -> Blob:
    """Store and tag a busybox image whose Cmd is ["sh"], and return its manifest.

    ``arch`` defaults to the binary's own architecture. Any other value only labels
    the config, so the image will not run on that architecture.
    """
    manifest = add_busybox_manifest(layout, arch, busybox)
    layout.tag(manifest, tag)
    return manifest


def docker_schema2_image(
    layout: OciLayout, tag: str = "docker", busybox: Path = BUSYBOX_PATH
) -> Blob:
    """Store and tag the busybox image as a Docker schema 2 manifest.

    skopeo cannot read this manifest through ``oci:``, so pass it to
    ``export_dir_image`` and give skopeo the resulting ``dir:`` directory.
    """
    binary = read_busybox(busybox)
    layer = layout.add_layer(busybox_layer_tar(binary), MEDIA_TYPE_DOCKER_LAYER_GZIP)
    config_value = image_config(elf_architecture(binary), [layer.diff_id], cmd=["sh"])
    config = layout.add_json(config_value, MEDIA_TYPE_DOCKER_CONFIG)
    manifest = layout.add_manifest(
        config, [layer.blob], media_type=MEDIA_TYPE_DOCKER_MANIFEST
    )
    layout.tag(manifest, tag)
    return manifest


def export_dir_image(layout: OciLayout, manifest: Blob, directory: Path | str) -> Path:
    """Copy ``manifest`` and the blobs it references into skopeo's ``dir:`` format.

    skopeo resolves ``oci:DIR:TAG`` only to OCI manifests and indexes (checked in
    skopeo 1.9.3), so a Docker schema 2 image reaches it as ``dir:DIRECTORY``. The
    manifest of an index instance is written as ``<hex>.manifest.json``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "version").write_bytes(DIR_TRANSPORT_VERSION)
    (out / "manifest.json").write_bytes(manifest.data)
    value = json.loads(manifest.data)
    for child in value.get("manifests", []):
        if child["mediaType"] == MEDIA_TYPE_OCI_INDEX:
            raise ValueError(f"nested index {child['digest']} is not supported")
        child_data = layout.read_blob(child["digest"])
        hex_digest = child["digest"].partition(":")[2]
        (out / f"{hex_digest}.manifest.json").write_bytes(child_data)
        copy_image_blobs(layout, json.loads(child_data), out)
    if "manifests" not in value:
        copy_image_blobs(layout, value, out)
    return out


def copy_image_blobs(layout: OciLayout, manifest: dict[str, Any], out: Path) -> None:
    """Copy the config and layer blobs of an image manifest, named by hex digest."""
    for descriptor in [manifest["config"], *manifest["layers"]]:
        digest = descriptor["digest"]
        (out / digest.partition(":")[2]).write_bytes(layout.read_blob(digest))


# --- image index and artifact ------------------------------------------------

# (architecture, variant) pairs of multi_platform_index.
INDEX_PLATFORMS = (("amd64", None), ("arm64", "v8"))


def platform_marker_layer(layout: OciLayout, architecture: str) -> Layer:
    """Store a small layer with ``etc/platform`` naming the architecture."""
    tar = LayerTar()
    tar.add_directory("etc")
    tar.add_file("etc/platform", f"linux/{architecture}\n".encode())
    return layout.add_layer(tar.to_bytes(), MEDIA_TYPE_OCI_LAYER_GZIP)


def multi_platform_index(
    layout: OciLayout, tag: str = "multi", busybox: Path = BUSYBOX_PATH
) -> Blob:
    """Store and tag an image index with a linux/amd64 and a linux/arm64 manifest.

    Both manifests share the busybox layer. The manifest whose architecture
    matches the busybox binary runs. Each other manifest also gets an
    ``etc/platform`` layer, and is valid but does not run.
    """
    binary = read_busybox(busybox)
    native = elf_architecture(binary)
    busybox_layer = layout.add_layer(
        busybox_layer_tar(binary), MEDIA_TYPE_OCI_LAYER_GZIP
    )
    descriptors = []
    for architecture, variant in INDEX_PLATFORMS:
        layers = [busybox_layer]
        if architecture != native:
            layers.append(platform_marker_layer(layout, architecture))
        manifest = add_image(layout, layers, architecture, variant=variant, cmd=["sh"])
        platform_value = {"architecture": architecture, "os": "linux"}
        if variant is not None:
            platform_value["variant"] = variant
        descriptors.append(manifest.descriptor(platform=platform_value))
    index = layout.add_index(
        descriptors, annotations={ANNOTATION_CREATED: EPOCH_CREATED}
    )
    layout.tag(index, tag)
    return index


def sbom_document(subject: Blob) -> dict[str, Any]:
    """Return a minimal SPDX 2.3 document that names ``subject`` by digest."""
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": "moorage-test-sbom",
        "documentNamespace": f"https://example.com/spdx/{subject.digest}",
        "creationInfo": {"created": EPOCH_CREATED, "creators": ["Tool: images.py"]},
        "packages": [
            {
                "name": "busybox",
                "SPDXID": "SPDXRef-Package-busybox",
                "downloadLocation": "NOASSERTION",
            }
        ],
    }


def artifact_with_subject(
    layout: OciLayout,
    subject: Blob,
    artifact_type: str = DEFAULT_ARTIFACT_TYPE,
    tag: str | None = None,
) -> Blob:
    """Store an artifact manifest that refers to ``subject`` and return it.

    The manifest has the empty config and one layer, a JSON SBOM stored with
    ``artifact_type`` as its media type. Without ``tag`` the manifest is listed in
    index.json without a ref name.
    """
    empty_config = layout.add_blob(b"{}", MEDIA_TYPE_OCI_EMPTY)
    sbom = layout.add_json(sbom_document(subject), artifact_type)
    sbom_descriptor = sbom.descriptor(annotations={ANNOTATION_TITLE: "sbom.spdx.json"})
    annotations = {
        ANNOTATION_CREATED: EPOCH_CREATED,
        ANNOTATION_DESCRIPTION: "Test SBOM for the subject image",
    }
    manifest = layout.add_manifest(
        empty_config,
        [sbom_descriptor],
        artifact_type=artifact_type,
        subject=subject,
        annotations=annotations,
    )
    if tag is None:
        layout.add_untagged(manifest)
    else:
        layout.tag(manifest, tag)
    return manifest


# --- images of real files and of random bytes --------------------------------


@dataclasses.dataclass(frozen=True)
class TreeEntry:
    """A file-system entry read for a layer, named by its path without the leading /."""

    name: str
    kind: bytes
    mode: int
    data: bytes = dataclasses.field(default=b"", repr=False)
    target: str = ""


def walk_tree(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Yield ``root`` and everything under it depth first, in sorted name order.

    Symlinks are yielded and not followed. A directory that cannot be listed is
    skipped with its contents.
    """
    try:
        status = root.lstat()
        children = sorted(os.listdir(root)) if stat.S_ISDIR(status.st_mode) else []
    except OSError:
        return
    yield root, status
    for child in children:
        yield from walk_tree(root / child)


def read_entry(path: Path, status: os.stat_result) -> TreeEntry | None:
    """Read one entry, or return None for a socket, FIFO, device or unreadable file.

    NOTE: hard links are read as separate regular files, so their data is stored
    once per name.
    """
    name = path.as_posix().lstrip("/")
    mode = stat.S_IMODE(status.st_mode)
    try:
        if stat.S_ISDIR(status.st_mode):
            return TreeEntry(name, tarfile.DIRTYPE, mode)
        if stat.S_ISLNK(status.st_mode):
            return TreeEntry(name, tarfile.SYMTYPE, 0o777, target=os.readlink(path))
        if stat.S_ISREG(status.st_mode):
            return TreeEntry(name, tarfile.REGTYPE, mode, data=path.read_bytes())
    except OSError:
        return None
    return None


def collect_tree(root: Path, max_bytes: int) -> list[TreeEntry]:
    """Read the entries under ``root``, skipping files that would pass ``max_bytes``.

    Files that still fit are read after a skipped one, so one large file early in
    the sorted order does not end the tree.
    """
    entries: list[TreeEntry] = []
    total = 0
    for path, status in walk_tree(root):
        if stat.S_ISREG(status.st_mode) and total + status.st_size > max_bytes:
            continue
        entry = read_entry(path, status)
        if entry is None or not entry.name:
            continue
        total += len(entry.data)
        entries.append(entry)
    return entries


def split_into_layers(
    entries: Sequence[TreeEntry], layer_count: int
) -> list[list[TreeEntry]]:
    """Cut ``entries`` in order into at most ``layer_count`` runs of similar size."""
    total = sum(len(entry.data) for entry in entries)
    target = total / layer_count
    chunks: list[list[TreeEntry]] = [[]]
    written = 0
    for entry in entries:
        boundary = target * len(chunks)
        if chunks[-1] and written >= boundary and len(chunks) < layer_count:
            chunks.append([])
        chunks[-1].append(entry)
        written += len(entry.data)
    return chunks


def parent_names(name: str) -> list[str]:
    """Return the ancestors of a relative path, outermost first: a/b/c gives a, a/b."""
    parts = name.split("/")
    return ["/".join(parts[:count]) for count in range(1, len(parts))]


def tree_layer_tar(
    entries: Sequence[TreeEntry], directories: dict[str, TreeEntry]
) -> bytes:
    """Build a tar of ``entries`` that also contains each entry's parent directories.

    A parent that was not read (above the source directory) gets mode 0755.
    """
    tar = LayerTar()
    for entry in entries:
        for parent in parent_names(entry.name):
            if not tar.contains(parent):
                parent_entry = directories.get(parent)
                mode = parent_entry.mode if parent_entry else 0o755
                tar.add_directory(parent, mode)
        if tar.contains(entry.name):
            continue
        if entry.kind == tarfile.DIRTYPE:
            tar.add_directory(entry.name, entry.mode)
        elif entry.kind == tarfile.SYMTYPE:
            tar.add_symlink(entry.name, entry.target)
        else:
            tar.add_file(entry.name, entry.data, entry.mode)
    return tar.to_bytes()


def large_image(
    layout: OciLayout,
    tag: str = "large",
    source_dir: Path = DEFAULT_LARGE_SOURCE,
    *,
    max_bytes: int = 48 * MIB,
    layer_count: int = 3,
) -> Blob:
    """Store and tag an image of the real files under ``source_dir``.

    Entries are read in sorted order, and a file that would take the file data
    past ``max_bytes`` is skipped. Entries keep their absolute path (without the
    leading /), permission bits and symlink targets, and are cut into at most
    ``layer_count`` layers of similar size. The default source is the running
    Python's standard library.
    """
    if layer_count < 1:
        raise ValueError(f"layer_count must be at least 1, got {layer_count}")
    entries = collect_tree(Path(os.path.abspath(source_dir)), max_bytes)
    if not entries:
        raise ValueError(f"no readable entries under {source_dir}")
    directories = {e.name: e for e in entries if e.kind == tarfile.DIRTYPE}
    layers = [
        layout.add_layer(tree_layer_tar(chunk, directories), MEDIA_TYPE_OCI_LAYER_GZIP)
        for chunk in split_into_layers(entries, layer_count)
    ]
    manifest = add_image(layout, layers, host_architecture())
    layout.tag(manifest, tag)
    return manifest


def random_layer_tar(index: int, size: int, seed: int) -> bytes:
    """Build a tar with ``random/layer-<index>.bin``: ``size`` pseudo-random bytes."""
    # Test data must repeat for a seed, so a seeded non-cryptographic generator fits.
    generator = random.Random(f"{seed}:{index}")  # noqa: S311
    tar = LayerTar()
    tar.add_directory("random")
    tar.add_file(f"random/layer-{index}.bin", generator.randbytes(size))
    return tar.to_bytes()


def random_blob_image(
    layout: OciLayout,
    tag: str = "random",
    layer_sizes: Sequence[int] = (MIB,),
    seed: int = 0,
) -> Blob:
    """Store and tag an image with one file of pseudo-random bytes per layer.

    The bytes do not compress, so each gzip layer blob is a little larger than
    ``layer_sizes[i]`` because of the tar headers and gzip framing.
    """
    if any(size < 0 for size in layer_sizes):
        raise ValueError(f"layer sizes must not be negative, got {list(layer_sizes)}")
    layers = [
        layout.add_layer(random_layer_tar(index, size, seed), MEDIA_TYPE_OCI_LAYER_GZIP)
        for index, size in enumerate(layer_sizes)
    ]
    manifest = add_image(layout, layers, host_architecture())
    layout.tag(manifest, tag)
    return manifest
