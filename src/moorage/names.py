"""Grammar of repository names, tags and references (OCI distribution spec 1.1)."""

from __future__ import annotations

import re

from moorage.errors import NameInvalidError, TagInvalidError

# One path component: lowercase alphanumerics joined by '.', '_', '__' or dashes.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_PATTERN = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_PATTERN = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")

# The CNCF distribution registry limits names to 255 characters; clients such as
# docker enforce the same limit, so longer names could never be pulled anyway.
MAX_NAME_LENGTH = 255


def validate_name(name: str) -> str:
    """Return `name` when it is a valid repository name; raise NameInvalidError."""
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalidError(
            f"repository name is {len(name)} characters long; the limit is "
            f"{MAX_NAME_LENGTH}",
            detail={"name": name[:MAX_NAME_LENGTH]},
        )
    if not NAME_PATTERN.fullmatch(name):
        raise NameInvalidError(
            "invalid repository name: use lowercase letters, digits and the "
            "separators '.', '_', '__', '-' and '/'",
            detail={"name": name},
        )
    return name


def validate_tag(tag: str) -> str:
    """Return `tag` when it matches the tag grammar; raise TagInvalidError."""
    if not TAG_PATTERN.fullmatch(tag):
        raise TagInvalidError(
            "invalid tag: up to 128 characters of letters, digits, '_', '.' and '-',"
            " not starting with '.' or '-'",
            detail={"tag": tag[:200]},
        )
    return tag


def namespace_of(name: str) -> str:
    """Return the first path component of a repository name."""
    return name.split("/", 1)[0]
