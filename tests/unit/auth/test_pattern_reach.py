"""pattern_reaches_namespace: whether a grant pattern matches any repository in
a namespace, checked against pattern_matches over every short name there."""

from __future__ import annotations

from itertools import product

import pytest

from moorage.admin import validate_pattern
from moorage.auth.access import pattern_matches, pattern_reaches_namespace
from moorage.names import NAME_PATTERN

PATTERNS = [
    "umbrella",
    "umbrella/*",
    "umbrella/app",
    "umbrella/a-*",
    "umbrella-*",
    "umbrella.x/*",
    "umbrell",
    "umb*",
    "u*a/*",
    "*",
    "*/app",
    "*x",
    "*a",
    "*la",
    "*la/x",
    "*rella*",
    "x*",
    "umbrella*",
    "*-x",
    "u*-x",
    "acme/*",
    "um*/a/b",
]


def _names_in(namespace: str) -> list[str]:
    """Return every valid repository name in `namespace` of up to four more
    characters, from an alphabet that covers the patterns above."""
    alphabet = "abxlp/-."
    names = []
    for length in range(1, 5):
        for letters in product(alphabet, repeat=length):
            name = f"{namespace}/{''.join(letters)}"
            if NAME_PATTERN.fullmatch(name):
                names.append(name)
    return names


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reach_agrees_with_matching(pattern: str) -> None:
    validate_pattern(pattern)
    names = _names_in("umbrella")
    matched = [name for name in names if pattern_matches(pattern, name)]
    reaches = pattern_reaches_namespace(pattern, "umbrella")
    assert reaches == bool(matched), matched[:3]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("umbrella/*", True),
        ("umbrella", True),
        ("umb*", True),
        ("*x", True),
        ("*/app", True),
        ("umbrella-*", False),
        ("umbrell", False),
        ("acme/*", False),
        ("x*", False),
    ],
)
def test_reach_examples(pattern: str, expected: bool) -> None:
    assert pattern_reaches_namespace(pattern, "umbrella") is expected
