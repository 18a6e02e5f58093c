"""Every key the registry uses in a storage driver, in one place.

Layout:

    blobs/<algorithm>/<first two hex characters>/<hex>   committed content
    uploads/<upload id>/data                             an upload in progress
    trash/<upload id>                                    upload data whose digest
                                                         was stored already, deleted
                                                         after the response
    garbage/<algorithm>/<hex>.<random>                   a blob file that garbage
                                                         collection took, deleted
                                                         after its row
"""

from __future__ import annotations

from moorage.digests import Digest

BLOBS_PREFIX = "blobs"
UPLOADS_PREFIX = "uploads"
TRASH_PREFIX = "trash"
GARBAGE_PREFIX = "garbage"


def blob_path(digest: Digest) -> str:
    return f"{BLOBS_PREFIX}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def upload_dir(upload_id: str) -> str:
    return f"{UPLOADS_PREFIX}/{upload_id}"


def upload_data_path(upload_id: str) -> str:
    return f"{upload_dir(upload_id)}/data"


def trash_path(upload_id: str) -> str:
    return f"{TRASH_PREFIX}/{upload_id}"


def blob_digest_of(path: str) -> str | None:
    """Return the digest a committed blob's key names, or None for another key."""
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != BLOBS_PREFIX:
        return None
    return f"{parts[1]}:{parts[3]}"


def upload_id_of(path: str) -> str | None:
    """Return the upload id in an upload's data key, or None for another key."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != UPLOADS_PREFIX or parts[2] != "data":
        return None
    return parts[1]


def garbage_path(digest: Digest, token: str) -> str:
    return f"{GARBAGE_PREFIX}/{digest.algorithm}/{digest.hex}.{token}"


def garbage_digest_of(path: str) -> str | None:
    """Return the digest of the blob whose file `garbage_path` names, or None."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != GARBAGE_PREFIX or "." not in parts[2]:
        return None
    return f"{parts[1]}:{parts[2].split('.', 1)[0]}"
