"""Access decisions: which actions a principal may take on which repository.

Default deny. A customer account gets its role on every namespace its customer
owns, plus the grants made to it or to its whole customer. Vendor accounts get
their vendor role everywhere. A login with a personal access token gets the
intersection of that, the token's role, and the token's repository patterns.

Grant patterns:
    products          the namespace `products`: every repository under it
    products/*        the same, written as a glob
    products/app      exactly that repository
    products/app-*    a glob; `*` matches any characters, `/` included
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase

from moorage.db.registry_store import RepositoryFilter

PULL = "pull"
PUSH = "push"
DELETE = "delete"

CUSTOMER_ROLES: dict[str, frozenset[str]] = {
    "reader": frozenset({PULL}),
    "writer": frozenset({PULL, PUSH}),
    "maintainer": frozenset({PULL, PUSH, DELETE}),
    # An owner may also manage its customer's accounts; for the registry API it
    # is a maintainer.
    "owner": frozenset({PULL, PUSH, DELETE}),
}
VENDOR_ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset({PULL, PUSH, DELETE}),
    "auditor": frozenset({PULL}),
}


@dataclass(frozen=True, slots=True)
class Grant:
    pattern: str
    role: str
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated account and everything needed to decide its access."""

    account_id: int
    login: str
    kind: str
    customer_id: int | None
    customer_slug: str | None
    role: str | None
    token_generation: int
    namespaces: Sequence[str] = ()
    grants: Sequence[Grant] = field(default_factory=tuple)
    # Set when the caller logged in with a personal access token: its id, and
    # the role that caps what the token may do (never more than the account
    # may). `token_repositories` are the grant patterns the token is limited
    # to, or None when it has no limit beyond the role.
    personal_token_id: int | None = None
    ceiling: str | None = None
    token_repositories: Sequence[str] | None = None

    @property
    def is_vendor(self) -> bool:
        return self.customer_id is None

    def actions_on(self, repository: str, now: datetime) -> frozenset[str]:
        """Return the actions this principal may take on a repository now."""
        if self.token_repositories is not None and not any(
            pattern_matches(pattern, repository) for pattern in self.token_repositories
        ):
            return frozenset()
        actions = self._account_actions_on(repository, now)
        if self.ceiling is not None:
            actions &= CUSTOMER_ROLES.get(self.ceiling, frozenset())
        return actions

    def _account_actions_on(self, repository: str, now: datetime) -> frozenset[str]:
        if self.is_vendor:
            return VENDOR_ROLES.get(self.role or "", frozenset())
        allowed: set[str] = set()
        namespace = repository.split("/", 1)[0]
        if namespace in self.namespaces and "/" in repository:
            allowed |= CUSTOMER_ROLES.get(self.role or "", frozenset())
        for grant in self.grants:
            if grant.until is not None and grant.until <= now:
                continue
            if pattern_matches(grant.pattern, repository):
                allowed |= CUSTOMER_ROLES.get(grant.role, frozenset())
        return frozenset(allowed)

    def pull_filter(self, now: datetime) -> RepositoryFilter:
        """Return the catalog filter: repositories this principal may pull."""
        if self.ceiling is not None and PULL not in CUSTOMER_ROLES.get(
            self.ceiling, ()
        ):
            return RepositoryFilter()
        within = (
            None
            if self.token_repositories is None
            else tuple(as_glob(pattern) for pattern in self.token_repositories)
        )
        if self.is_vendor:
            return RepositoryFilter(
                everything=PULL in VENDOR_ROLES.get(self.role or "", ()),
                within=within,
            )
        patterns: list[str] = []
        if PULL in CUSTOMER_ROLES.get(self.role or "", ()):
            patterns.extend(f"{namespace}/*" for namespace in self.namespaces)
        for grant in self.grants:
            if grant.until is not None and grant.until <= now:
                continue
            if PULL in CUSTOMER_ROLES.get(grant.role, ()):
                patterns.append(as_glob(grant.pattern))
        return RepositoryFilter(patterns=tuple(patterns), within=within)


def as_glob(pattern: str) -> str:
    """Return the glob a grant pattern stands for: a bare namespace means `ns/*`."""
    if "/" not in pattern and "*" not in pattern:
        return f"{pattern}/*"
    return pattern


def pattern_matches(pattern: str, repository: str) -> bool:
    return fnmatchcase(repository, as_glob(pattern))


def pattern_reaches_namespace(pattern: str, namespace: str) -> bool:
    """Return whether a grant pattern matches any repository in `namespace`.

    `pattern_matches` tests one name, so this runs the pattern's glob over the
    prefix `namespace/` and checks that some of the glob is left to match the
    rest of a name. `*` matches `/` too, so `ac*`, `*/app` and even `*x` reach
    every namespace: `umbrella/x` matches `*x`.
    """
    glob = as_glob(pattern)
    # Positions in `glob` that the characters read so far can end at.
    positions = _past_stars(glob, {0})
    for character in f"{namespace}/":
        following: set[int] = set()
        for position in positions:
            if position == len(glob):
                continue
            if glob[position] == "*":
                following.add(position)
            elif glob[position] == character:
                following.add(position + 1)
        positions = _past_stars(glob, following)
    # A name needs at least one character after `namespace/`, so some of the
    # glob must be left. For a pattern that `admin.validate_pattern` accepts,
    # a valid repository name can then complete the match.
    return any(position < len(glob) for position in positions)


def _past_stars(glob: str, positions: set[int]) -> set[int]:
    """Add the positions reached by letting each `*` match nothing."""
    reached = set(positions)
    for position in positions:
        while position < len(glob) and glob[position] == "*":
            position += 1
            reached.add(position)
    return reached
