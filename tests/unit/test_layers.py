"""The dependency rules of ARCHITECTURE.md, checked on the import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "moorage"

# Each package (by path prefix) and the moorage modules it must not import.
FORBIDDEN = {
    "db": ("moorage.api", "moorage.auth", "moorage.storage", "moorage.services"),
    "storage/drivers": (
        "moorage.api",
        "moorage.auth",
        "moorage.db",
        "moorage.services",
    ),
    "storage": ("moorage.api", "moorage.auth", "moorage.services"),
    "auth": ("moorage.api", "moorage.storage", "moorage.services"),
    "audit": ("moorage.api", "moorage.auth", "moorage.storage", "moorage.services"),
    "backup": ("moorage.api", "moorage.auth", "moorage.cli"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _modules(prefix: str) -> list[Path]:
    return sorted((PACKAGE / prefix).rglob("*.py"))


@pytest.mark.parametrize("prefix", sorted(FORBIDDEN))
def test_layer_imports_point_inward(prefix: str) -> None:
    """No module imports from a layer above its own."""
    files = _modules(prefix)
    assert files, f"no modules under {prefix}"
    for path in files:
        for name in _imports(path):
            bad = [banned for banned in FORBIDDEN[prefix] if name.startswith(banned)]
            assert not bad, f"{path.relative_to(PACKAGE)} imports {name}"
