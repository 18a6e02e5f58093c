"""Parse and validate pushed manifests without changing a byte of them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from moorage.db.registry_store import NewManifest
from moorage.digests import Digest, digest_of, parse_digest
from moorage.errors import (
    DigestInvalidError,
    ManifestInvalidError,
    ManifestTooLargeError,
    UnsupportedError,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES

# Layers that clients fetch from elsewhere (their `urls`); they need not exist here.
_FOREIGN_LAYER_PREFIXES = (
    "application/vnd.docker.image.rootfs.foreign.",
    "application/vnd.oci.image.layer.nondistributable.",
)


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    record: NewManifest
    digest: Digest


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def parse_manifest(
    body: bytes, content_type: str | None, algorithm: str, max_bytes: int
) -> ParsedManifest:
    """Validate a manifest and list what it references.

    Raises ManifestTooLargeError or ManifestInvalidError, naming the problem.
    """
    if len(body) > max_bytes:
        raise ManifestTooLargeError(
            f"manifest is {len(body)} bytes; the limit is {max_bytes}",
            detail={"size": len(body), "limit": max_bytes},
        )
    document = _load_json(body)
    media_type = _media_type(document, content_type)
    if document.get("schemaVersion") != 2:
        raise ManifestInvalidError("schemaVersion must be 2")
    subject = _optional_descriptor(document, "subject")
    annotations = document.get("annotations")
    if annotations is not None and not _is_string_map(annotations):
        raise ManifestInvalidError("annotations must map strings to strings")
    artifact_type = document.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalidError("artifactType must be a string")

    if media_type in IMAGE_MANIFEST_TYPES:
        blob_references, foreign_references, config_type = _image_references(document)
        manifest_references: list[str] = []
        if artifact_type is None and media_type == OCI_MANIFEST:
            artifact_type = config_type
    else:
        blob_references = []
        foreign_references = []
        manifest_references = [
            descriptor["digest"] for descriptor in _descriptors(document, "manifests")
        ]

    if artifact_type is not None and _CONTROL_CHARACTER.search(artifact_type):
        # A media type never has one, and PostgreSQL cannot store a NUL.
        raise ManifestInvalidError(
            f"artifact type {artifact_type[:100]!r} contains a control character"
        )

    digest = digest_of(body, algorithm)
    record = NewManifest(
        digest=str(digest),
        media_type=media_type,
        content=body,
        artifact_type=artifact_type,
        subject_digest=None if subject is None else subject["digest"],
        # Only the referrers API reads this plaintext copy, and it lists only
        # manifests that have a subject. Other manifests' annotations stay in
        # the content alone, which encryption at rest seals.
        annotations_json=(
            None if annotations is None or subject is None else json.dumps(annotations)
        ),
        blob_references=tuple(dict.fromkeys(blob_references)),
        manifest_references=tuple(dict.fromkeys(manifest_references)),
        foreign_references=tuple(dict.fromkeys(foreign_references)),
    )
    return ParsedManifest(record, digest)


def _load_json(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ManifestInvalidError(f"manifest is not valid JSON: {error}") from None
    except RecursionError:
        # json.loads recurses once per nesting level and gives up at the
        # interpreter's recursion limit (1000 by default).
        raise ManifestInvalidError("manifest is nested too deeply") from None
    if not isinstance(document, dict):
        raise ManifestInvalidError("manifest must be a JSON object")
    return document


def _media_type(document: dict[str, Any], content_type: str | None) -> str:
    declared = document.get("mediaType")
    header = (content_type or "").split(";", 1)[0].strip() or None
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalidError("mediaType must be a string")
    if declared and header and declared != header:
        raise ManifestInvalidError(
            f"Content-Type {header} does not match the manifest's mediaType {declared}"
        )
    media_type = declared or header or _guess_media_type(document)
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalidError(
            f"unsupported manifest media type {media_type!r}; supported: "
            + ", ".join(sorted(MANIFEST_TYPES))
        )
    return media_type


def _guess_media_type(document: dict[str, Any]) -> str:
    return OCI_INDEX if "manifests" in document else OCI_MANIFEST


def _image_references(document: dict[str, Any]) -> tuple[list[str], list[str], str]:
    """Return the blobs that must be in the repository, the foreign layers
    (which need not be) and the config's media type."""
    config = _optional_descriptor(document, "config")
    if config is None:
        raise ManifestInvalidError("image manifest has no config descriptor")
    references = [config["digest"]]
    foreign = []
    for layer in _descriptors(document, "layers"):
        if str(layer.get("mediaType", "")).startswith(_FOREIGN_LAYER_PREFIXES):
            foreign.append(layer["digest"])
        else:
            references.append(layer["digest"])
    return references, foreign, config["mediaType"]


def _descriptors(document: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = document.get(key)
    if value is None:
        raise ManifestInvalidError(f"manifest has no {key!r} list")
    if not isinstance(value, list):
        raise ManifestInvalidError(f"{key!r} must be a list of descriptors")
    return [
        _check_descriptor(item, f"{key}[{index}]") for index, item in enumerate(value)
    ]


def _optional_descriptor(document: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = document.get(key)
    return None if value is None else _check_descriptor(value, key)


def _check_descriptor(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestInvalidError(f"{where} must be a descriptor object")
    if not isinstance(value.get("mediaType"), str):
        raise ManifestInvalidError(f"{where} has no mediaType")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalidError(f"{where} has no valid size")
    digest = value.get("digest")
    if not isinstance(digest, str):
        raise ManifestInvalidError(f"{where} has no digest")
    try:
        parse_digest(digest)
    except (DigestInvalidError, UnsupportedError):
        raise ManifestInvalidError(
            f"{where} has an invalid digest {digest[:200]!r}"
        ) from None
    return value


def _is_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    )
