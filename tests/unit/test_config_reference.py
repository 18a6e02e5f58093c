"""docs/configuration.md contains the output of `moorage config reference`."""

from __future__ import annotations

from pathlib import Path

from moorage.config import settings_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_page_matches_reference() -> None:
    """Every row of the settings table matches the settings' own descriptions,
    so the page cannot drift from the code."""
    expected = [
        line for line in settings_reference().splitlines() if line.startswith("| `")
    ]
    documented = [
        line for line in DOC.read_text().splitlines() if line.startswith("| `")
    ]
    assert documented == expected
