"""Show values that users control (names, user agents, messages) in the terminal.

Rich reads `[...]` in printed strings as markup, and a terminal acts on escape
sequences in anything printed. A customer name such as `[bold]x` or a user agent
carrying `ESC [2J` would otherwise restyle or clear the administrator's screen.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from rich import table
from rich.markup import escape
from rich.text import Text

# Format characters that reorder or hide text on display (Unicode bidirectional
# overrides and isolates, RFC 9839 "problematic code points"), shown as escapes
# like control characters.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def visible(text: str) -> str:
    """Replace control characters and bidirectional controls with `\\x..` or
    `\\u....` escapes, so that the terminal shows them instead of acting on them."""
    if text.isprintable():
        return text
    return "".join(_escaped(character) for character in text)


def _escaped(character: str) -> str:
    if character in _BIDI_CONTROLS or unicodedata.category(character) == "Cc":
        code = ord(character)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return character


def shown(value: object) -> str:
    """Return `value` as text for an f-string passed to `Console.print`: control
    characters escaped and markup brackets escaped."""
    return escape(visible(str(value)))


def lines_cell(*lines: str) -> Text:
    """Return a table cell of one or more lines, each shown as it is (control
    characters escaped, see `visible`)."""
    return Text("\n").join(Text(visible(line)) for line in lines)


class Table(table.Table):
    """A Rich table whose string cells are shown as they are, never as markup."""

    def add_row(self, *renderables: Any, **options: Any) -> None:
        cells = [
            Text(visible(cell)) if isinstance(cell, str) else cell
            for cell in renderables
        ]
        super().add_row(*cells, **options)
