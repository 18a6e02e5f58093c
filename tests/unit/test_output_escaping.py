"""Showing user-controlled values in Rich output."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from moorage.cli.output import Table, shown, visible


def render(renderable: object) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=200, force_terminal=False).print(renderable)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain name", "plain name"),
        ("ünï", "ünï"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("tab\tnew\nline", "tab\\x09new\\x0aline"),
        ("\x7f\x9b", "\\x7f\\x9b"),
        ("evil\u202egnp.exe", "evil\\u202egnp.exe"),
    ],
)
def test_visible_escapes_controls(text: str, expected: str) -> None:
    assert visible(text) == expected


def test_table_cells_are_not_markup() -> None:
    table = Table("name")
    table.add_row('[bold]x[/bold] [host."https://h:5000"]\x1b[31m')
    output = render(table)
    assert '[bold]x[/bold] [host."https://h:5000"]\\x1b[31m' in output
    assert "\x1b" not in output


def test_shown_survives_print() -> None:
    output = render(f"customer {shown('[red]x[/red]')}")
    assert output == "customer [red]x[/red]\n"
