"""Write the images of some namespaces to a tar archive of an OCI image layout.

The archive contains `oci-layout`, `index.json` and `blobs/sha256/...` as the OCI
image specification's image layout describes them, so `skopeo copy
oci-archive:FILE:REF` and `umoci` (on the unpacked directory) read it. Each
tag becomes an `index.json` entry whose `org.opencontainers.image.ref.name` is
`REPOSITORY:TAG`, for example `acme/app:1.0`. Manifests that no tag names and
no index of the same repository includes (such as referrers pushed by digest)
get an entry without a ref name. Every entry carries the repository's name in
the `REPOSITORY_ANNOTATION` annotation.

Blobs are read through the registry's storage driver, so encrypted blobs come
out decrypted and authenticated, and each one's digest is checked while it is
copied. The tar is written to `FILE.partial` (mode 0600) and renamed to FILE
when it is complete; memory use does not grow with blob size.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from moorage.db.registry_store import NamespaceContents, NamespaceManifest
from moorage.digests import new_hasher, parse_digest
from moorage.errors import MoorageError
from moorage.storage.encryption.format import IntegrityError
from moorage.storage.registry import Registry

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# Names the repository an index.json entry came from, since ref names of
# untagged entries are absent.
REPOSITORY_ANNOTATION = "io.moorage.repository"
# Names the Docker schema 2 manifest or manifest list that an index.json
# entry's OCI index was written for (see `_oci_wrapper`).
WRAPPED_ANNOTATION = "io.moorage.wrapped-manifest"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_BLOCK = tarfile.BLOCKSIZE


class ArchiveError(MoorageError):
    """the archive could not be written"""


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    """Counts of what an archive contains."""

    repositories: int
    tags: int
    manifests: int
    blobs: int
    blob_bytes: int


def index_entries(contents: NamespaceContents) -> list[dict[str, Any]]:
    """Return the `index.json` descriptors: one per tag, then one per manifest
    that no tag and no index of its repository reaches."""
    entries = []
    for manifest in contents.manifests:
        for tag in manifest.tags:
            entries.append(_descriptor(manifest, f"{manifest.repository}:{tag}"))
        if not manifest.tags and not manifest.in_index:
            entries.append(_descriptor(manifest, None))
    return entries


def _descriptor(manifest: NamespaceManifest, ref_name: str | None) -> dict[str, Any]:
    annotations = {REPOSITORY_ANNOTATION: manifest.repository}
    if ref_name is not None:
        annotations[REF_NAME_ANNOTATION] = ref_name
    return {
        "mediaType": manifest.media_type,
        "digest": manifest.digest,
        "size": manifest.size,
        "annotations": annotations,
    }


async def write_archive(
    registry: Registry,
    contents: NamespaceContents,
    target: Path,
    progress: Callable[[int], None] | None = None,
) -> ArchiveReport:
    """Write every manifest and blob of `contents` to `target` as an OCI
    image layout in a tar archive; `progress` is called with bytes written."""
    partial = target.with_name(target.name + ".partial")
    try:
        # NOTE: the tar is written with blocking writes in the event loop. The
        # command that calls this runs nothing else meanwhile.
        stream = await asyncio.to_thread(open, partial, "xb", opener=_owner_only)
    except OSError as error:
        raise ArchiveError(f"cannot write {partial}: {error.strerror}") from None
    try:
        writer = _TarWriter(stream, progress)
        report = await _write_layout(registry, contents, writer)
        writer.finish()
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        os.replace(partial, target)
    except BaseException as error:
        stream.close()
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise ArchiveError(f"cannot write {partial}: {error}") from None
        raise
    return report


def _owner_only(path: str, flags: int) -> int:
    # The archive contains the customer's images decrypted, so only the user who
    # runs the command may read it. "x" also keeps another run's file intact.
    return os.open(path, flags, 0o600)


async def _write_layout(
    registry: Registry, contents: NamespaceContents, writer: _TarWriter
) -> ArchiveReport:
    writer.directory("blobs/")
    writer.directory("blobs/sha256/")
    written: set[str] = set()
    blob_bytes = 0
    for blob in contents.blobs:
        if blob.shredded:
            raise ArchiveError(
                f"blob {blob.digest} is no longer readable: its owner's key was "
                "shredded"
            )
        await _copy_blob(registry, blob.digest, blob.size, writer)
        written.add(blob.digest)
        blob_bytes += blob.size

    docker_lists: dict[str, bytes] = {}
    for manifest in contents.manifests:
        if manifest.digest in written:
            continue
        record = await registry.get_manifest(manifest.repository, manifest.digest)
        _check_digest(manifest.digest, record.content)
        writer.file(_blob_name(manifest.digest), record.content)
        written.add(manifest.digest)
        if manifest.media_type == DOCKER_MANIFEST_LIST:
            docker_lists[manifest.digest] = record.content

    entries = index_entries(contents)
    for digest, wrapper in _wrap_docker_entries(entries, docker_lists).items():
        writer.file(_blob_name(digest), wrapper)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    }
    writer.file("index.json", json.dumps(index, indent=2).encode() + b"\n")
    writer.file("oci-layout", OCI_LAYOUT)
    tags = sum(len(manifest.tags) for manifest in contents.manifests)
    return ArchiveReport(
        len(contents.repositories),
        tags,
        len(written) - len(contents.blobs),
        len(contents.blobs),
        blob_bytes,
    )


async def _copy_blob(
    registry: Registry, digest: str, size: int, writer: _TarWriter
) -> None:
    """Stream one blob into the tar, checking its length and digest."""
    parsed = parse_digest(digest)
    hasher = new_hasher(parsed.algorithm)
    writer.begin(_blob_name(digest), size)
    copied = 0
    try:
        async for chunk in await registry.read_blob(digest, 0, size):
            hasher.update(chunk)
            copied += len(chunk)
            if copied > size:
                break
            writer.data(chunk)
    except IntegrityError as error:
        raise ArchiveError(f"blob {digest} is damaged in storage: {error}") from None
    if copied != size or hasher.hexdigest() != parsed.hex:
        raise ArchiveError(
            f"blob {digest} read back with a different size or digest; the stored "
            "copy is damaged"
        )
    writer.end(size)


def _wrap_docker_entries(
    entries: list[dict[str, Any]], docker_lists: dict[str, bytes]
) -> dict[str, bytes]:
    """Point each entry of a Docker manifest or list to an OCI index written for
    it, in place; return those indexes by digest."""
    wrappers: dict[str, bytes] = {}
    for position, entry in enumerate(entries):
        if entry["mediaType"] in (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST):
            wrapper = _oci_wrapper(entry, docker_lists.get(entry["digest"]))
            entries[position] = _wrapper_descriptor(entry, wrapper)
            wrappers[entries[position]["digest"]] = wrapper
    return wrappers


def _oci_wrapper(entry: dict[str, Any], docker_list: bytes | None) -> bytes:
    """Return an OCI image index that leads to a Docker schema 2 manifest or
    to the children of a Docker manifest list.

    skopeo (1.9.3) resolves a ref name in an OCI layout only to an OCI
    manifest or index, and reports "no descriptor found" for a Docker one. An
    OCI index may list Docker manifests, so skopeo copies the image through
    it with the stored manifest's bytes and digest.
    """
    if docker_list is None:
        children = [
            {
                "mediaType": entry["mediaType"],
                "digest": entry["digest"],
                "size": entry["size"],
            }
        ]
    else:
        # NOTE: no test pushes a Docker manifest list; skopeo's reading of this
        # index of its children is checked for a Docker manifest only.
        children = json.loads(docker_list)["manifests"]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
    return json.dumps(index, sort_keys=True).encode()


def _wrapper_descriptor(entry: dict[str, Any], wrapper: bytes) -> dict[str, Any]:
    annotations = dict(entry["annotations"])
    annotations[WRAPPED_ANNOTATION] = entry["digest"]
    return {
        "mediaType": OCI_INDEX,
        "digest": "sha256:" + hashlib.sha256(wrapper).hexdigest(),
        "size": len(wrapper),
        "annotations": annotations,
    }


def _check_digest(digest: str, content: bytes) -> None:
    parsed = parse_digest(digest)
    hasher = new_hasher(parsed.algorithm)
    hasher.update(content)
    if hasher.hexdigest() != parsed.hex:
        raise ArchiveError(f"manifest {digest} read back with a different digest")


def _blob_name(digest: str) -> str:
    parsed = parse_digest(digest)
    return f"blobs/{parsed.algorithm}/{parsed.hex}"


class _TarWriter:
    """Writes tar members one by one, with the data streamed in between."""

    def __init__(self, stream: IO[bytes], progress: Callable[[int], None] | None):
        self.stream = stream
        self.progress = progress
        self.mtime = int(time.time())

    def directory(self, name: str) -> None:
        info = self._info(name, 0)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        self.stream.write(info.tobuf(tarfile.PAX_FORMAT))

    def file(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self.data(data)
        self.end(len(data))

    def begin(self, name: str, size: int) -> None:
        self.stream.write(self._info(name, size).tobuf(tarfile.PAX_FORMAT))

    def data(self, chunk: bytes | memoryview) -> None:
        self.stream.write(chunk)
        if self.progress is not None:
            self.progress(len(chunk))

    def end(self, size: int) -> None:
        remainder = size % _BLOCK
        if remainder:
            self.stream.write(b"\0" * (_BLOCK - remainder))

    def finish(self) -> None:
        self.stream.write(b"\0" * (2 * _BLOCK))

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        info.mtime = self.mtime
        return info
