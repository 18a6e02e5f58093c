"""The token scope grammar of the CNCF distribution token specification.

    scope        := resourcetype ":" resourcename ":" action [ "," action ]*
    resourcetype := name [ "(" classname ")" ]      e.g. repository(plugin)

Several scopes may arrive in several `scope` parameters or space-separated in
one. A resource name may itself contain colons (a registry host with a port), so
the type ends at the first colon and the actions start after the last.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_TYPE_PATTERN = re.compile(r"([a-z0-9]+)(?:\([a-z0-9]+\))?")
_ACTION_PATTERN = re.compile(r"[a-z*]+")


@dataclass(frozen=True, slots=True)
class Scope:
    type: str
    name: str
    actions: frozenset[str]

    def to_claim(self) -> dict[str, object]:
        return {"type": self.type, "name": self.name, "actions": sorted(self.actions)}

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Parse scope parameters; malformed scopes are skipped, as distribution does."""
    parsed: list[Scope] = []
    for value in values:
        for item in value.split():
            scope = _parse_one(item)
            if scope is not None:
                parsed.append(scope)
    return _merge(parsed)


def _parse_one(item: str) -> Scope | None:
    type_part, separator, rest = item.partition(":")
    name, separator2, actions_part = rest.rpartition(":")
    if not separator or not separator2 or not name:
        return None
    type_match = _TYPE_PATTERN.fullmatch(type_part)
    if type_match is None:
        return None
    actions = frozenset(
        action
        for action in actions_part.split(",")
        if _ACTION_PATTERN.fullmatch(action)
    )
    return Scope(type_match.group(1), name, actions)


def _merge(scopes: list[Scope]) -> list[Scope]:
    """Combine scopes on the same resource, keeping the first-seen order."""
    merged: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        merged.setdefault((scope.type, scope.name), set()).update(scope.actions)
    return [
        Scope(kind, name, frozenset(actions))
        for (kind, name), actions in merged.items()
    ]


def format_scope(type_: str, name: str, actions: Iterable[str]) -> str:
    return f"{type_}:{name}:{','.join(actions)}"
