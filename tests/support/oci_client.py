"""A minimal OCI client over httpx: push and pull small images for audit tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx

from tests.support.images import (
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_MANIFEST,
    Blob,
    canonical_json,
)


@dataclass(frozen=True)
class SmallImage:
    config: Blob
    layer: Blob
    manifest: Blob


def small_image(layer_size: int = 4096) -> SmallImage:
    """Build a one-layer image with random content (not runnable)."""
    config = Blob(
        MEDIA_TYPE_OCI_CONFIG, canonical_json({"random": os.urandom(8).hex()})
    )
    layer = Blob(MEDIA_TYPE_OCI_LAYER_GZIP, os.urandom(layer_size))
    manifest = Blob(
        MEDIA_TYPE_OCI_MANIFEST,
        canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [layer.descriptor()],
            }
        ),
    )
    return SmallImage(config, layer, manifest)


def push_blob(client: httpx.Client, repository: str, blob: Blob) -> None:
    response = client.post(
        f"/v2/{repository}/blobs/uploads/",
        params={"digest": blob.digest},
        content=blob.data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text


def push_image(
    client: httpx.Client, repository: str, tag: str, image: SmallImage
) -> None:
    """Push the blobs and then the manifest under `tag`."""
    push_blob(client, repository, image.config)
    push_blob(client, repository, image.layer)
    response = client.put(
        f"/v2/{repository}/manifests/{tag}",
        content=image.manifest.data,
        headers={"Content-Type": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 201, response.text


def pull_image(client: httpx.Client, repository: str, tag: str) -> int:
    """Fetch the manifest and each blob; return the bytes received."""
    response = client.get(
        f"/v2/{repository}/manifests/{tag}",
        headers={"Accept": MEDIA_TYPE_OCI_MANIFEST},
    )
    assert response.status_code == 200, response.text
    total = len(response.content)
    manifest = response.json()
    for descriptor in [manifest["config"], *manifest["layers"]]:
        blob = client.get(f"/v2/{repository}/blobs/{descriptor['digest']}")
        assert blob.status_code == 200, blob.text
        total += len(blob.content)
    return total
